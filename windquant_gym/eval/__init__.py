from .perplexity import mean_nll, perplexity

__all__ = ["mean_nll", "perplexity"]
