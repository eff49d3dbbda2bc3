"""Named errors. Every message states the offending value and how to fix it.

Modelled on ``gymnasium.error``: one base class so users can catch everything we raise,
and subclasses of the matching builtin so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class WindQuantError(Exception):
    """Base class of every error raised on purpose by windquant_gym."""


class ConfigError(WindQuantError, ValueError):
    """A configuration value is out of range or inconsistent."""


class UnknownNameError(WindQuantError, KeyError):
    """A preset model or corpus name that windquant_gym does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(WindQuantError, ImportError):
    """An optional package is needed; the message names the pip command."""


class ModelStructureError(WindQuantError, ValueError):
    """The model has no quantizable Linear layers in decoder blocks, or bad weights."""


class DataError(WindQuantError, ValueError):
    """Text is missing, empty, or too short for the requested token blocks, or the
    calibration statistics computed from it are unusable (NaN, Inf)."""


class TableMismatchError(WindQuantError, ValueError):
    """A plan or cached table does not belong to this model or configuration."""


class OutputExistsError(WindQuantError, FileExistsError):
    """An output folder already holds files and overwriting was not asked for."""


class IncompleteExportError(WindQuantError, FileNotFoundError):
    """A packed-export folder lacks a file it needs."""


class PlanNotFoundError(WindQuantError, FileNotFoundError):
    """A plan file that does not exist."""


class ExportFormatError(WindQuantError, ValueError):
    """A packed export (or the data to pack) is malformed, corrupt, or of another format version."""


class RunFailedError(WindQuantError, RuntimeError):
    """A sweep's training run exited with an error or was killed; the message names its log."""


class InsufficientMemoryError(WindQuantError, MemoryError):
    """The estimate of what a model's problem needs exceeds the memory available; the message
    names the parts and the fixes (raised before anything large is allocated)."""


class CacheWarning(UserWarning):
    """A cache file was damaged (truncated, half-written, another format) and is rebuilt; the
    message names the file."""


class NativeKernelWarning(UserWarning):
    """The packed model's native decode kernel could not be built (no C compiler, or it
    failed); ``PackedLinear`` decodes with tensor ops, same results, slower."""
