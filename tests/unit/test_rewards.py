"""Rule-based scorers, custom rewards, and failures that must not stop or hang a rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distflow_mc.config.schema import RewardConfig
from distflow_mc.rewards import fmt, gsm8k, math, tiny_copy
from distflow_mc.rewards.compute import BUILT_IN, RewardComputer, check_sources
from tests.conftest import ROOT


def test_gsm8k_final_answer():
    assert gsm8k.score("so 3 + 4 = 7\n#### 7", "7", {}) == 1.0
    assert gsm8k.score("we get 1,234 apples", "1234", {}) == 1.0
    assert gsm8k.score("first 5 then 8", "5", {}) == 0.0  # the last number counts
    assert gsm8k.score("no idea", "5", {}) == 0.0


def test_math_boxed_equivalence():
    assert math.score("so the answer is \\boxed{\\frac{1}{2}}", "0.5", {}) == 1.0
    assert math.score("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", {}) == 1.0
    assert math.score("\\boxed{3}", "2", {}) == 0.0
    # geo3k's answers (verl's vision-language example), by their data_source
    assert BUILT_IN["hiyouga/geometry3k"]("x = \\boxed{2\\sqrt{221}}", "2 \\sqrt{221}", {}) == 1.0


def test_format_and_tiny_copy():
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    assert fmt.score("<think>hm</think> <answer>4</answer>", pattern, {}) == 1.0
    assert fmt.score("4", pattern, {}) == 0.0
    assert [tiny_copy.score(r, "7", {}) for r in ("7", " 7x", "3", "a")] == [1.0, 1.0, 0.2, 0.0]


def always_half(response, ground_truth, extra_info):
    return 0.5


def boom(response, ground_truth, extra_info):
    raise RuntimeError("scorer bug")


def sleepy(response, ground_truth, extra_info):
    time.sleep(float(response))
    return 1.0


def test_custom_reward_by_dotted_path():
    computer = RewardComputer(RewardConfig(fn="tests.unit.test_rewards.always_half"))
    assert computer(["x", "y"], ["anything", "else"], ["", ""], [{}, {}]).rewards == [0.5, 0.5]


def test_raising_reward_gives_error_score():
    computer = RewardComputer(RewardConfig(fn="tests.unit.test_rewards.boom", error_score=-1.0))
    scores = computer(["x"], ["d"], [""], [{}])
    assert (scores.rewards, scores.errors) == ([-1.0], 1)


def test_slow_reward_times_out_without_hanging():
    """The stuck scorer's worker is killed; every other sample gets its own full budget
    (a sample after the stuck one is not scored as an error for lack of waiting)."""
    computer = RewardComputer(RewardConfig(fn="tests.unit.test_rewards.sleepy", timeout_s=1.0))
    start = time.monotonic()
    scores = computer(["0", "30", "0.5", "0.5"], ["d"] * 4, [""] * 4, [{}] * 4)
    assert time.monotonic() - start < 10
    assert scores.timeouts == 1 and scores.errors == 0
    assert scores.rewards == [1.0, 0.0, 1.0, 1.0]
    assert computer(["0"], ["d"], [""], [{}]).rewards == [1.0]  # a fresh pool afterwards
    computer.close()


def hangs_on_x(response, ground_truth, extra_info):
    if response == "x":
        time.sleep(3600)
    if response == "exit":
        os._exit(3)
    return 1.0


@pytest.mark.parametrize(("workers", "samples"), [(1, 3), (4, 8)])
def test_stuck_samples_spend_their_budgets_together(workers, samples):
    """Every sample hangs: each worker spends one budget per sample of its share, all
    workers at once, so a call costs timeout x ceil(samples / workers), not one budget plus
    a fresh pool per sample."""
    budget = 0.5
    computer = RewardComputer(
        RewardConfig(fn="tests.unit.test_rewards.hangs_on_x", timeout_s=budget), workers
    )
    start = time.monotonic()
    scores = computer(["x"] * samples, ["d"] * samples, [""] * samples, [{}] * samples)
    elapsed = time.monotonic() - start
    assert scores.timeouts == samples and scores.errors == 0
    assert scores.rewards == [0.0] * samples and computer.failed_sources == ["d"]
    rounds = -(-samples // workers)
    assert rounds * budget <= elapsed < (rounds + 3) * budget  # one each: 1 + samples
    computer.close()


def test_stuck_and_crashing_scorers_leave_the_others_their_scores(caplog):
    """Stuck samples time out together; a scorer that ends its process scores an error;
    every other sample of the same shares keeps its score."""
    computer = RewardComputer(RewardConfig(fn="tests.unit.test_rewards.hangs_on_x", timeout_s=1))
    responses = ["x", "a", "x", "b", "exit", "c", "d", "x"]
    start = time.monotonic()
    scores = computer(responses, ["d"] * 8, [""] * 8, [{}] * 8)
    assert time.monotonic() - start < 3  # one budget, spent by three workers at once
    assert scores.rewards == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert (scores.timeouts, scores.errors) == (3, 1)
    assert "4 of 8 rewards scored reward.error_score=0.0: 3 timed out" in caplog.text
    assert "1 failed (e.g. RuntimeError: the scoring process died (exit code 3))" in caplog.text
    assert computer(["a"] * 5, ["d"] * 5, [""] * 5, [{}] * 5).rewards == [1.0] * 5
    computer.close()


def not_a_number(response, ground_truth, extra_info):
    return {"nan": float("nan"), "inf": float("inf"), "text": "high"}.get(response, 1.0)


def test_non_finite_rewards_score_as_errors(caplog):
    computer = RewardComputer(
        RewardConfig(fn="tests.unit.test_rewards.not_a_number", error_score=-1.0)
    )
    scores = computer(["nan", "inf", "text", "ok"], ["src"] * 4, [""] * 4, [{}] * 4)
    assert scores.rewards == [-1.0, -1.0, -1.0, 1.0] and scores.errors == 3
    assert "3 of 4 rewards scored reward.error_score=-1.0: 0 timed out" in caplog.text
    assert "3 failed (e.g. nan); data_source 'src' (3)" in caplog.text
    computer.close()


def test_stuck_scorer_never_keeps_the_process_alive(tmp_path):
    """A scorer that never returns: the process still exits promptly (a thread would be
    joined at interpreter exit and hang it)."""
    script = (
        "from distflow_mc.config.schema import RewardConfig\n"
        "from distflow_mc.rewards.compute import RewardComputer\n"
        "c = RewardComputer(RewardConfig(fn='tests.unit.test_rewards.sleepy', timeout_s=0.5))\n"
        "print(c(['1000'], ['d'], [''], [{}]).timeouts)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr


def test_unknown_data_source_names_the_setting():
    with pytest.raises(ValueError, match=r"no reward for data_source \['mystery'\].*reward\.fn"):
        check_sources(RewardConfig(), {"mystery", "gsm8k"}, "train.parquet")
    check_sources(RewardConfig(fn="tests.unit.test_rewards.always_half"), {"mystery"}, "x")
    with pytest.raises(ValueError, match=r"reward\.fn: module 'nope' does not import"):
        RewardComputer(RewardConfig(fn="nope.fn"))


def test_tiny_lookup_reads_the_trajectory():
    from distflow_mc.rewards import tiny_lookup

    looked = {"trajectory": {"messages": [{"role": "tool", "content": "7"}]}}
    failed = {"trajectory": {"messages": [{"role": "tool", "content": "error: bad key"}]}}
    assert tiny_lookup.score("7", "7", {}) == 1.0
    assert tiny_lookup.score("3", "7", looked) == 0.5
    assert tiny_lookup.score("3", "7", failed) == 0.2
    assert tiny_lookup.score("x", "7", looked) == 0.3
