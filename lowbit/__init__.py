"""lowbit: post-training compression of large language models, block by block."""
__version__ = "0.1.0"
