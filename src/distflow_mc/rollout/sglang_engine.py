"""SGLang offline engine (optional extra, GPU only). Imported only when selected."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from distflow_mc.rollout.engine import Bucket, Generation, SamplingParams


def check_available() -> None:
    """Raise on every rank, before any collective, when SGLang cannot run here."""
    if importlib.util.find_spec("sglang") is None:
        raise ValueError("rollout.engine=SGLANG needs sglang: pip install -e '.[sglang]'")
    if not torch.cuda.is_available():
        raise ValueError("rollout.engine=SGLANG needs a GPU; use rollout=hf on CPU")


class SGLangEngine:
    """One engine per rollout TP group, on the group's leader rank; SGLang runs its own TP
    workers on the group's GPUs (one node), starting at `base_gpu_id`."""

    def __init__(
        self,
        model_dir: str | Path,
        tp: int,
        base_gpu_id: int,
        seed: int,
        mem_fraction: float,
        colocated: bool,
    ) -> None:
        check_available()
        import sglang

        self.engine = sglang.Engine(
            model_path=str(model_dir),
            tp_size=tp,
            base_gpu_id=base_gpu_id,
            random_seed=seed,
            mem_fraction_static=mem_fraction,
            enable_memory_saver=colocated,  # release/resume around training
            skip_tokenizer_init=True,  # token ids in, token ids out
        )
        self.asleep = False

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, keep: bool = False
    ) -> Generation:
        """`keep` (rollout.stream_chunk's pieces) asks nothing more: SGLang's radix cache
        keeps every sequence's prefix, and a row that comes back goes on from it."""
        greedy = params.temperature == 0
        sampling = {
            "temperature": 0.0 if greedy else params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            # neutral, not the checkpoint's generation_config.json: the trainer assumes
            # sampling from softmax(logits / T) (within top-p/top-k when set)
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "max_new_tokens": params.max_new_tokens,
            "stop_token_ids": list(params.stop_token_ids),
            "skip_special_tokens": False,
        }
        rows = [list(p) for p in prompts for _ in range(params.n)]
        if not rows:
            return Generation()
        self.wake()
        # one seed per sample, derived from the step's seed: a resumed run draws the same
        per_row = [{**sampling, "sampling_seed": params.seed + i} for i in range(len(rows))]
        outputs = self.engine.generate(input_ids=rows, sampling_params=per_row, return_logprob=True)
        gen = Generation()
        for i, out in enumerate(outputs):
            meta = out["meta_info"]
            gen.prompt_index.append(i // params.n)
            gen.response_ids.append(
                torch.tensor(out["output_ids"], dtype=torch.int64, device="cpu")
            )
            gen.logprobs.append(
                torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]], device="cpu")
            )
            gen.finish_reasons.append(
                "stop" if meta["finish_reason"]["type"] == "stop" else "length"
            )
        return gen

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        self.wake()
        for bucket in buckets:
            self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False)
        self.engine.flush_cache()

    # SGLang's resume raises (and takes its scheduler down) when nothing was released, so
    # the state is tracked here and both calls are idempotent.
    def sleep(self) -> None:
        if not self.asleep:
            self.engine.release_memory_occupation(tags=["weights", "kv_cache"])
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.engine.resume_memory_occupation(tags=["weights", "kv_cache"])
            self.asleep = False

    def shutdown(self) -> None:
        self.engine.shutdown()
