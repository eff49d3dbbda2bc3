from .divergence import DEFAULT_TOPK, TopKReference
from .perplexity import TokenLosses, block_nlls, mean_nll, perplexity, token_losses, topk_reference

__all__ = ["DEFAULT_TOPK", "TopKReference", "TokenLosses", "block_nlls", "mean_nll", "perplexity", "token_losses", "topk_reference"]
