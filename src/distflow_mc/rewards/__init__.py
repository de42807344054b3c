"""Rule-based reward scorers keyed by `data_source`, and custom rewards by dotted path."""
