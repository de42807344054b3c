"""Rollout engines (transformers on CPU, SGLang on GPU), weight sync, mismatch guard."""
