"""Math answers in `\\boxed{}`, compared by math-verify (symbolic equivalence: 1/2 = 0.5,
\\frac{\\sqrt{2}}{2} = 1/\\sqrt{2}, ...)."""

from __future__ import annotations

from math_verify import parse, verify


def score(response: str, ground_truth: str, extra_info: dict) -> float:
    gold = ground_truth if "$" in ground_truth or "\\boxed" in ground_truth else f"${ground_truth}$"
    # math-verify's own timeouts use signals (main thread only); the caller bounds the time.
    answer = parse(response, parsing_timeout=None)
    if not answer:
        return 0.0
    return float(verify(parse(gold, parsing_timeout=None), answer, timeout_seconds=None))
