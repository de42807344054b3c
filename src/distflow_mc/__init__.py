"""distflow_mc: fully distributed RL post-training for LLMs, after DistFlow (arXiv 2507.13833)."""

__version__ = "0.1.0"
