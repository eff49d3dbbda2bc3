"""windquant_gym: learned mixed-precision quantization of LLMs (WINDQuant) as a Gymnasium env."""

from .calibration import Calibration, calibrate
from .data import load_texts, sample_token_blocks
from .errors import (
    CacheWarning,
    ConfigError,
    DataError,
    ExportFormatError,
    PlanNotFoundError,
    IncompleteExportError,
    InsufficientMemoryError,
    MissingDependencyError,
    ModelStructureError,
    NativeKernelWarning,
    OutputExistsError,
    TableMismatchError,
    RunFailedError,
    UnknownNameError,
    WindQuantError,
)
from .envs import (
    ENV_ID, ActionCostObservation, CurriculumWrapper, LossRewardConfig, PrecisionRules, ProxyLossReward, RewardConfig,
    TargetSampler, WindQuantEnv,
)
from .eval import mean_nll, perplexity
from .export import PackedLinear, export_plan, load_quantized, load_tokenizer, packed_size
from .models import load_model
from .problem import QuantProblem
from .compute.process import keep_freed_memory
from .quant import (
    ACTION_BITS,
    QuantConfig,
    QuantTable,
    Unit,
    WeightAssembler,
    build_table,
    find_units,
    quantized_weights,
)

__version__ = "0.1.0"

__all__ = [
    "ACTION_BITS", "QuantConfig", "QuantTable", "QuantProblem", "Unit", "WeightAssembler",
    "build_table", "calibrate", "Calibration", "find_units", "quantized_weights",
    "load_model", "load_texts", "sample_token_blocks", "mean_nll", "perplexity",
    "WindQuantError", "ConfigError", "DataError", "MissingDependencyError", "ModelStructureError",
    "TableMismatchError", "UnknownNameError", "OutputExistsError", "IncompleteExportError", "ExportFormatError", "PlanNotFoundError",
    "RunFailedError", "InsufficientMemoryError", "CacheWarning", "NativeKernelWarning",
    "export_plan", "load_quantized", "load_tokenizer", "packed_size", "PackedLinear", "keep_freed_memory",
    "ENV_ID", "CurriculumWrapper", "WindQuantEnv", "RewardConfig", "PrecisionRules",
    "ActionCostObservation", "ProxyLossReward", "LossRewardConfig", "TargetSampler",
]
