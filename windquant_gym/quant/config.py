"""QuantConfig: everything that determines the quantization table, frozen and versioned."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple

from ..errors import ConfigError
from .bitwidths import ACTION_BITS, GRIDS, N_ACTIONS
from .rotation import ROTATIONS
from .units import positive_int

#: Relative (activation-weighted) reconstruction error above which an action falls back to
#: the next higher precision, per action index. Chosen from the error distribution of all
#: 720 units of SmolLM2-135M at chunk 256 with 3% protection (see README, "Fallback"): each
#: sits well above that bit width's worst unit there, so on healthy weights nothing falls
#: back and only pathological units (constant rows, extreme outliers) do.
DEFAULT_FALLBACK_THRESHOLDS: Tuple[float, ...] = (math.inf, 0.01, 0.08, 0.25, 0.6, 0.8, 1.0)

_LOSSES = ("activation", "plain")
#: How codes are chosen once the scales are fitted (see :mod:`windquant_gym.quant.fitting`).
COMPENSATIONS = ("none", "gptq")
#: Which error of a unit the allocators and the env's features read (``QuantTable.rel_error``).
ERROR_METRICS = ("activation", "output")
#: What happens to each row's scale once its codes are chosen (see :func:`.fitting.refit_scales`).
SCALE_REFITS = ("none", "output")
#: How a unit's INT8-protected weights are chosen (see :data:`.fitting.SALIENCY_COLUMNS`).
SALIENT_METRICS = ("activation", "obs")
#: Version 1 configs (before ``compensation``/``damping``/``error_metric``) meant these.
_VERSION_1 = {"compensation": "none", "damping": 0.01, "error_metric": "activation"}
CONFIG_VERSION = 2


def _real(value) -> "float | None":
    """``value`` as a float, or None when it is not a real number (strings and bools included)."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class QuantConfig:
    """How units are cut and fitted. Part of every table's and plan's fingerprint."""

    chunk_size: int = 256
    """Input columns per unit (G). A last, narrower chunk is allowed."""
    salient_rate: float = 0.03
    """Fraction of each unit's weights, by ``|W_ij| * s_j``, kept in INT8 and left out of the fit."""
    fit_steps: int = 10
    """Adam steps on each row's scale multiplier (paper C.2: 10). 0 keeps the initial scale."""
    fit_lr: float = 0.1
    """Adam learning rate of the scale multiplier ``r`` (alpha = alpha0 * r, r starts at 1)."""
    fit_loss: str = "activation"
    """'activation': ``||(W - Q) diag(s)||^2`` (AWQ-style); 'plain': ``||W - Q||^2``."""
    fallback_thresholds: Tuple[float, ...] = DEFAULT_FALLBACK_THRESHOLDS
    """Per action index: relative error (in ``fit_loss``'s metric) above which the unit takes
    the next higher precision. Index 0 (skip) must be inf."""
    compensation: str = "gptq"
    """'gptq': each column's rounding error is compensated on the unit's later columns through
    the inverse of the unit's block of the calibration Hessian (GPTQ, in activation order;
    units stay independent). 'none': every weight rounded on its own (the paper)."""
    damping: float = 0.01
    """GPTQ's damping: ``H + damping * mean(diag H) * I`` before inverting."""
    error_metric: str = "output"
    """The unit error allocators and features read: 'output', ``mean_t ||(W - Q) x_t||^2`` on the
    calibration tokens (what compensation minimises); 'activation', ``||(W - Q) diag(s)||^2``
    with ``s = mean |x|`` (AWQ-style; the paper-era metric)."""
    hessian_blocks: int = 0
    """Token blocks of a statistics set measured apart from the proxy, for the activation scales and
    the Hessian blocks (``hessian_seq_len`` tokens each; drawn from the calibration text, disjoint
    from the proxy's blocks and from the validation split: :func:`windquant_gym.data.statistics_blocks`).
    0: both come from the proxy's own blocks (the paper; the presets before issue 26)."""
    hessian_seq_len: int = 256
    """Tokens per block of the statistics set (only read when ``hessian_blocks > 0``)."""
    scale_refit: str = "none"
    """'output': once a row's codes are chosen (by compensation or rounding), its scale is set to
    the least-squares one for those codes, ``alpha = q^T H r / q^T H q`` (the output error's
    minimum), and kept only where the stored (fp16) scale lowers that row's output error.
    'none': the scale fitted before the codes are chosen (the paper)."""
    grid: str = "symmetric"
    """The operators of the 2-, 3- and 4-bit actions: 'symmetric', the paper's (no zero point:
    SEQ at 2 bit, signed LSQ at 3 and 4); 'asymmetric', affine grids ``Q = alpha * (k - z)``,
    ``k in [0, 2^b - 1]``, with a zero point ``z`` per row of a unit (fp16, 16 more storage bits
    per row; GPTQ's, AWQ's and HQQ's form at these widths). 8 bit, ternary and binary stay.
    See :data:`windquant_gym.quant.bitwidths.GRIDS`."""
    rotation: str = "none"
    """'hadamard': each unit is fitted in a rotated frame, ``W_u R`` with ``R`` a fixed randomized
    Hadamard matrix of the unit's width, and restored as ``Q R^T`` (incoherence processing, as
    QuIP and QuaRot do it, but inside a unit, so units stay independent; the packed model applies
    ``R`` to each unit's inputs). Stores nothing more: ``R`` is fixed by the width. Needs the
    calibration's Hessian blocks. 'none': the paper's frame. See :mod:`.rotation`."""
    salient_metric: str = "activation"
    """Which ``salient_rate`` of a unit's weights are kept in INT8. 'activation': the largest
    ``|W_ij| s_j`` (AWQ's saliency, the paper's C.3). 'obs': the largest ``|W_ij| / sqrt([H^-1]_jj)``
    (the optimal-brain-surgeon cost SparseGPT prunes by, ``H`` damped as for GPTQ): a column
    the unit's other columns can stand in for is cheaper to lose than its own ``s_j`` says. Needs
    the calibration's Hessian blocks."""
    version: int = CONFIG_VERSION
    """Bumped when what the table holds for the same fields changes (2: compensation,
    damping, error_metric; a version-1 dict reads as compensation 'none', metric 'activation')."""

    def __post_init__(self) -> None:
        chunk_size = positive_int(self.chunk_size, "chunk_size", "the paper uses 256")
        salient_rate = _real(self.salient_rate)
        if salient_rate is None or not (0.0 <= salient_rate < 0.5):
            raise ConfigError(
                f"salient_rate must be a number in [0, 0.5), got {self.salient_rate!r}; the paper uses 0.03 (3%)."
            )
        if not isinstance(self.fit_steps, int) or isinstance(self.fit_steps, bool) or self.fit_steps < 0:
            raise ConfigError(f"fit_steps must be an integer >= 0, got {self.fit_steps!r}; the paper uses 10.")
        fit_lr = _real(self.fit_lr)
        if fit_lr is None or not (fit_lr > 0 and math.isfinite(fit_lr)):
            raise ConfigError(f"fit_lr must be a positive finite number, got {self.fit_lr!r}; the default is 0.1.")
        if self.fit_loss not in _LOSSES:
            raise ConfigError(f"fit_loss must be one of {_LOSSES}, got {self.fit_loss!r}.")
        if self.compensation not in COMPENSATIONS:
            raise ConfigError(
                f"compensation must be one of {COMPENSATIONS}, got {self.compensation!r}; 'none' is the paper's fit."
            )
        damping = _real(self.damping)
        if damping is None or not (0.0 < damping < math.inf):
            raise ConfigError(f"damping must be a positive finite number, got {self.damping!r}; GPTQ uses 0.01.")
        if self.error_metric not in ERROR_METRICS:
            raise ConfigError(f"error_metric must be one of {ERROR_METRICS}, got {self.error_metric!r}.")
        if not isinstance(self.hessian_blocks, int) or isinstance(self.hessian_blocks, bool) or self.hessian_blocks < 0:
            raise ConfigError(
                f"hessian_blocks must be an integer >= 0, got {self.hessian_blocks!r}; 0 measures the statistics on the "
                "proxy's blocks, e.g. 64 (with hessian_seq_len 256) on 16k tokens of their own."
            )
        hessian_seq_len = positive_int(self.hessian_seq_len, "hessian_seq_len", "e.g. 256")
        if hessian_seq_len < 2:
            raise ConfigError(f"hessian_seq_len must be at least 2 tokens, got {self.hessian_seq_len!r}; e.g. 256.")
        if self.scale_refit not in SCALE_REFITS:
            raise ConfigError(
                f"scale_refit must be one of {SCALE_REFITS}, got {self.scale_refit!r}; 'none' is the paper's fit."
            )
        if not isinstance(self.grid, str) or self.grid not in GRIDS:
            raise ConfigError(f"grid must be one of {sorted(GRIDS)}, got {self.grid!r}; 'symmetric' is the paper's operators.")
        if not isinstance(self.salient_metric, str) or self.salient_metric not in SALIENT_METRICS:
            raise ConfigError(
                f"salient_metric must be one of {SALIENT_METRICS}, got {self.salient_metric!r}; 'activation' is the paper's."
            )
        if not isinstance(self.rotation, str) or self.rotation not in ROTATIONS:
            raise ConfigError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}; 'none' is the paper's frame.")
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"QuantConfig version must be {CONFIG_VERSION}, got {self.version!r}; build configs from their "
                "fields, or read saved ones with QuantConfig.from_dict (it upgrades version 1)."
            )
        try:
            thresholds = tuple(float(t) for t in self.fallback_thresholds)
        except (TypeError, ValueError):
            thresholds = ()
        if (
            len(thresholds) != N_ACTIONS
            or thresholds[0] != math.inf
            or any(not (t > 0) for t in thresholds)  # also refuses NaN
        ):
            raise ConfigError(
                f"fallback_thresholds needs {N_ACTIONS} positive values, one per action {list(ACTION_BITS)}, "
                f"the first (skip) inf; got {self.fallback_thresholds!r}. Use math.inf to disable fallback."
            )
        object.__setattr__(self, "chunk_size", chunk_size)
        object.__setattr__(self, "fallback_thresholds", thresholds)
        object.__setattr__(self, "salient_rate", salient_rate)
        object.__setattr__(self, "damping", damping)
        object.__setattr__(self, "hessian_seq_len", hessian_seq_len)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        # JSON has no inf; keep it readable and round-trippable.
        data["fallback_thresholds"] = [("inf" if math.isinf(t) else t) for t in self.fallback_thresholds]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"Unknown QuantConfig fields {sorted(unknown)}; known fields are {sorted(known)}.")
        data = dict(data)
        # Saved configs always carry their version; a dict without one (a preset's YAML) is current.
        version = data.get("version", CONFIG_VERSION)
        if version not in (1, CONFIG_VERSION):
            raise ConfigError(
                f"QuantConfig version {version!r} is not one this windquant_gym reads (1, {CONFIG_VERSION}); "
                "upgrade windquant_gym to read newer configs."
            )
        if version == 1:
            extra = set(_VERSION_1) & set(data)
            if extra:
                raise ConfigError(f"A version-1 QuantConfig has no fields {sorted(extra)}; set version {CONFIG_VERSION}.")
            data.update(_VERSION_1, version=CONFIG_VERSION)
        if "fallback_thresholds" in data:
            data["fallback_thresholds"] = tuple(float(t) for t in data["fallback_thresholds"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))
