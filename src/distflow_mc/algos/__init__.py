"""RL algorithms as pure tensor functions: advantages, policy/value losses, KL estimators.
No collectives here: callers hand in the samples of whole groups."""
