"""The embedded agent task: answer with the secret digit only the lookup tool knows.
1 for the right digit first; otherwise 0.3 for having looked the key up and 0.2 for a
digit first (shaping a random model towards the call and towards digits). Reads the
trajectory the agent loop passes in extra_info."""

from __future__ import annotations


def score(response: str, ground_truth: str, extra_info: dict) -> float:
    first = response.lstrip()[:1]
    if first == ground_truth:
        return 1.0
    trajectory = extra_info.get("trajectory", {})
    looked_up = any(
        m["role"] == "tool" and not m["content"].startswith("error")
        for m in trajectory.get("messages", [])
    )
    return 0.3 * looked_up + 0.2 * first.isdigit()
