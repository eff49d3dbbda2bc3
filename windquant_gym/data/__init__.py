from .sampling import eval_windows, sample_token_blocks, statistics_blocks, token_stream, validation_blocks
from .texts import CORPORA, load_texts

__all__ = ["CORPORA", "load_texts", "sample_token_blocks", "statistics_blocks", "validation_blocks", "eval_windows",
           "token_stream"]
