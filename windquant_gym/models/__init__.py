from .loading import PRESETS, load_model, resolve_device
from .tiny import byte_tokenizer, tiny_llama

__all__ = ["PRESETS", "load_model", "resolve_device", "byte_tokenizer", "tiny_llama"]
