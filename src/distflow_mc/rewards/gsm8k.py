"""GSM8K-style final answers: '#### 42' (the dataset's own marker) or else the last number
in the response, compared numerically with the ground truth."""

from __future__ import annotations

import re

_MARKED = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract(response: str) -> str | None:
    marked = _MARKED.findall(response)
    found = marked or _NUMBER.findall(response)
    return found[-1].replace(",", "") if found else None


def score(response: str, ground_truth: str, extra_info: dict) -> float:
    answer = extract(response)
    if answer is None:
        return 0.0
    try:
        return float(abs(float(answer) - float(str(ground_truth).replace(",", ""))) < 1e-6)
    except ValueError:
        return float(answer == str(ground_truth).strip())
