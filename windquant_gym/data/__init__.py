from .sampling import eval_windows, sample_token_blocks, token_stream
from .texts import CORPORA, load_texts

__all__ = ["CORPORA", "load_texts", "sample_token_blocks", "eval_windows", "token_stream"]
