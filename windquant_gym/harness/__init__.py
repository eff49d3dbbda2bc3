"""Benchmark any allocator on WindQuant-v0: the one episode loop (:mod:`.episodes`), held-out
perplexity, the leaderboard, the ``windquant bench`` command and the peer quantizers."""

from .episodes import EpisodeResult, as_allocator, heldout_perplexity, run_allocator
from .leaderboard import aggregate, format_table, write_leaderboard
from .zeroshot import zero_shot  # needs lm-eval only when called

__all__ = ["EpisodeResult", "as_allocator", "heldout_perplexity", "run_allocator", "aggregate", "format_table", "write_leaderboard", "zero_shot"]
