from .accounting import effective_bits, n_protected, storage_bits
from .apply import WeightAssembler, borrowed_weights, quantized_weights
from .bitwidths import ACTION_BITS, BIT_WIDTHS, N_ACTIONS, SKIP_ACTION, action_index
from .config import QuantConfig
from .build import build_table
from .table import QuantTable
from .units import Unit, find_decoder_layers, find_units

__all__ = [
    "ACTION_BITS", "BIT_WIDTHS", "N_ACTIONS", "SKIP_ACTION", "action_index",
    "QuantConfig", "QuantTable", "build_table", "Unit", "find_units", "find_decoder_layers",
    "WeightAssembler", "borrowed_weights", "quantized_weights", "effective_bits", "storage_bits", "n_protected",
]
