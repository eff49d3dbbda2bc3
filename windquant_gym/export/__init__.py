"""Packed export of a plan: real low-bit files whose size matches the storage accounting,
and the loader that rebuilds a Hugging Face model from them.

* :mod:`.packing` packs small integers into bytes (bit streams, 5 trits per byte);
* :mod:`.formats` maps each action to its code alphabet and packer (a lookup table);
* :mod:`.layout` names the files and tensors and records each module's layout;
* :mod:`.codec` packs and unpacks one module;
* :mod:`.writer` (:func:`export_plan`), :mod:`.reader` (:func:`load_quantized`),
  :mod:`.size` (:func:`packed_size`);
* :mod:`.packed_linear` (:class:`PackedLinear`: the quantized Linear that stays packed where
  it runs), :mod:`.torch_unpack` (its unpackers), :mod:`.hf_quantizer` (transformers'
  ``from_pretrained`` door: ``quant_method: windquant``).
"""

from .formats import CODE_FORMATS, PACKERS, CodeFormat
from .hf_quantizer import WindQuantConfig, WindQuantHfQuantizer, register_with_transformers
from .layout import FORMAT, PACKED_FILE, PLAN_FILE, REQUIRED_FILES, ModuleLayout
from .packed_linear import PackedLinear
from .packing import BitPacker, RadixPacker, field_bits, pack_fields, unpack_fields
from .reader import load_quantized, load_tokenizer, read_packed_weights
from .size import PackedSize, packed_size
from .writer import check_model_matches_table, export_plan

__all__ = [
    "CODE_FORMATS", "PACKERS", "CodeFormat", "FORMAT", "PACKED_FILE", "PLAN_FILE", "REQUIRED_FILES",
    "PackedLinear", "WindQuantConfig", "WindQuantHfQuantizer", "register_with_transformers", "load_tokenizer",
    "ModuleLayout", "BitPacker", "RadixPacker", "field_bits", "pack_fields", "unpack_fields",
    "load_quantized", "read_packed_weights", "PackedSize", "packed_size", "check_model_matches_table", "export_plan",
]

register_with_transformers()
