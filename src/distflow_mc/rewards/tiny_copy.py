"""The embedded CPU task: repeat the digit of the prompt. 1 for the right digit first,
0.2 for another digit first (shaping a random model towards digits), 0 otherwise."""

from __future__ import annotations


def score(response: str, ground_truth: str, extra_info: dict) -> float:
    first = response.lstrip()[:1]
    if first == ground_truth:
        return 1.0
    return 0.2 if first.isdigit() else 0.0
