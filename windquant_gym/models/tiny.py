"""A tiny random Llama and a byte-level tokenizer, built locally for fast tests."""

from __future__ import annotations

import torch

#: Byte-level vocabulary (256 bytes) plus end-of-text.
TINY_VOCAB = 257


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over raw bytes: needs no download, round-trips any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """Two decoder layers, hidden 128, intermediate 320 (so chunk 256 leaves a ragged 64),
    4 heads, 2 KV heads. Same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=TINY_VOCAB - 1,
        eos_token_id=TINY_VOCAB - 1,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()
