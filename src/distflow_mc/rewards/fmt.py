"""Format reward: 1 when the response matches a regular expression (the ground truth, or
`extra_info["format_regex"]`), e.g. '<think>.*</think>\\s*<answer>.*</answer>'."""

from __future__ import annotations

import re


def score(response: str, ground_truth: str, extra_info: dict) -> float:
    pattern = extra_info.get("format_regex", ground_truth)
    return float(re.fullmatch(pattern, response.strip(), flags=re.DOTALL) is not None)
