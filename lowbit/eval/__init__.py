"""Evaluation of compressed models: perplexity (and task accuracy)."""
from lowbit.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
