"""Hugging Face transformers engine: the CPU default, also runs on a GPU.

All prompts of the rank (n samples each) decode together in one left-padded batch with a
KV cache (transformers' `generate`); log-probs come from the raw logits of each step. With
`keep` (rollout.stream_chunk's pieces), the keys and values of the rows a call cuts at its
token limit wait for the next call: a row that comes back as its prompt and response goes
on from them, not encoded again (what SGLang's prefix cache does for it). A vision-language
checkpoint (Qwen2.5-VL) generates with its prompts' images: they are encoded with the
prompt, once for its n samples, each token at its three positions (models/vision.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from distflow_mc.models.vision import row_positions
from distflow_mc.rollout.engine import Bucket, Generation, Images, SamplingParams

_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _target(params: dict[str, torch.Tensor], name: str) -> tuple[str, Any]:
    """The parameter (name, index into it) that HF checkpoint tensor `name` fills (a
    vision-language model keeps its text model under model.language_model and its vision
    tower under model.visual, transformers 5's placement of the checkpoint's names)."""
    for candidate in (name, re.sub(r"^model\.", "model.language_model.", name), f"model.{name}"):
        if candidate in params:
            return candidate, slice(None)
    match = _EXPERT.fullmatch(name)
    if match and f"{match[1]}.gate_up_proj" in params:  # [E, 2I, h]: gate rows, then up
        e, fused = int(match[2]), f"{match[1]}.gate_up_proj"
        if match[3] == "down_proj":
            return f"{match[1]}.down_proj", e
        half = params[fused].shape[1] // 2
        return fused, (e, slice(0, half) if match[3] == "gate_proj" else slice(half, None))
    raise ValueError(f"weight sync: the rollout model has no parameter '{name}'")


class Interrupt(Protocol):
    """rollout.partial: new weights are waiting (`pending`, checked at each token boundary),
    and putting them into the engine (`apply`)."""

    def pending(self) -> bool: ...

    def apply(self) -> None: ...


class _Cut(StoppingCriteria):
    """Stops every row of a `generate` call at the first token boundary where `interrupt`
    has weights pending (never without one); says whether it did."""

    def __init__(self, interrupt: Interrupt | None) -> None:
        self.interrupt, self.fired = interrupt, False

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.fired = self.fired or (self.interrupt is not None and self.interrupt.pending())
        return torch.full((len(input_ids),), self.fired, dtype=torch.bool, device=input_ids.device)


class HFEngine:
    def __init__(
        self,
        model_dir: str | Path,
        pad_token_id: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """The architecture comes from `model_dir`'s config.json; the weights arrive through
        `update_weights` (from the actor), like every later update."""
        config = AutoConfig.from_pretrained(model_dir)
        self.vision = getattr(config, "vision_config", None)
        auto = AutoModelForImageTextToText if self.vision is not None else AutoModelForCausalLM
        self.model = auto.from_config(config, dtype=dtype).to(device).eval()
        self.device, self.pad = device, pad_token_id
        self.loaded: set[str] = set()
        self.adopted: set[str] = set()  # parameters that are a tensor given to update_weights
        self.asleep = False
        # rows the last call cut (`keep`): sequence -> per layer, its keys and values [heads,
        # tokens but the last, dim]
        self.kept: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Tensors in HF checkpoint names; per-expert MoE tensors also land in the fused
        expert parameters transformers 5 keeps in memory. A whole, contiguous tensor of the
        parameter's shape, dtype and device is adopted, not copied: the engine then reads
        the actor's own weights where the layouts agree (TP=1 on this rank: all but the
        split QKV), and keeps the rest without a second copy. Until the next update the
        engine reads those tensors as they are; the step syncs right after the optimizer,
        before anything generates."""
        self.wake()
        self.kept = {}  # keys and values of the old weights
        params = dict(self.model.named_parameters())
        for bucket in buckets:
            for name, tensor in bucket:
                target, where = _target(params, name)
                param = params[target]
                whole = where == slice(None) and tensor.is_contiguous()
                if whole and (tensor.shape, tensor.dtype, tensor.device) == (
                    param.shape,
                    param.dtype,
                    param.device,
                ):
                    param.data = tensor
                    self.loaded.add(target)
                    self.adopted.add(target)
                    continue
                if target in self.adopted:  # never write into a tensor it was given
                    param.data = param.data.clone()
                    self.adopted.discard(target)
                param[where].copy_(tensor.to(param.device, param.dtype))
                self.loaded.add(target)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        missing = set(params) - self.loaded - tied
        if missing:
            raise ValueError(f"weight sync left parameters unset: {sorted(missing)[:5]}")

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        interrupt: Interrupt | None = None,
        keep: bool = False,
        images: Sequence[Images | None] | None = None,
    ) -> Generation:
        """Responses and log-probs stay on the engine's device (the batch's from here on).
        Rows the call before cut with `keep` go on from their keys and values; with `keep`
        the rows this call cuts at `params.max_new_tokens` are kept for the next. A
        vision-language model takes each prompt's `images` (None: a text-only prompt).

        With `interrupt` (rollout.partial), generation stops at the token boundary after
        `interrupt.pending()` turns true, `interrupt.apply()` puts new weights in, and the
        unfinished samples go on from their tokens so far (re-encoded with the new weights),
        each token's log-prob from the weights that drew it; `segments` counts each sample's
        tokens per weight version."""
        if not prompts or not params.n:
            return Generation()
        self.wake()
        cut_before, self.kept = self.kept, {}  # (the call before's cut rows)
        ids, mask = self._left_padded(prompts)  # each prompt once, then its n rows
        if self.vision is not None:
            if keep or interrupt is not None:
                raise ValueError(
                    "a vision-language engine does not keep rows or take weights mid-call yet"
                )
            cache = self._prefill_images(prompts, ids, mask, params.n, images)
        elif images is not None:
            raise ValueError("images given to an engine whose model has no vision tower")
        else:
            cache = self._prefill(prompts, ids, mask, params.n, cut_before)
        ids, mask = ids.repeat_interleave(params.n, 0), mask.repeat_interleave(params.n, 0)
        index = [r // params.n for r in range(len(ids))]
        cut = _Cut(interrupt)
        new, logp, lengths, stopped, cache = self._decode(
            ids, mask, cache, params, params.max_new_tokens, 0, cut
        )
        if not (cut.fired and new.shape[1] < params.max_new_tokens and not stopped.all()):
            if keep:
                self._keep([prompts[i] for i in index], new, stopped, cache)
            kept = torch.arange(new.shape[1], device=new.device) < lengths[:, None]
            counts = lengths.tolist()
            return Generation(
                prompt_index=index,
                response_ids=list(new[kept].split(counts)),  # one split, not a slice per row
                logprobs=list(logp[kept].split(counts)),
                finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
            )
        # a weight update crossed the generation: each unfinished row goes on, segment after
        # segment, from its prompt and its tokens so far
        rows = len(ids)
        tokens: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        logps: list[list[torch.Tensor]] = [[] for _ in range(rows)]
        segments: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        active, budget, part = list(range(rows)), params.max_new_tokens, 0
        while True:
            counts = lengths.tolist()
            for j, (r, n, stop) in enumerate(zip(active, counts, stopped.tolist(), strict=True)):
                tokens[r].append(new[j, :n])
                logps[r].append(logp[j, :n])
                segments[r].append(n)
                done[r] = stop
            budget -= new.shape[1]
            active = [r for r in active if not done[r]]
            if not (cut.fired and active and budget > 0):
                break
            interrupt.apply()
            part += 1
            ids, mask = self._left_padded(
                [list(prompts[r // params.n]) + torch.cat(tokens[r]).tolist() for r in active]
            )
            cut = _Cut(interrupt)
            new, logp, lengths, stopped, _ = self._decode(
                ids, mask, None, params, budget, part, cut
            )
        for seg in segments:  # rows that stopped early drew nothing under later weights
            seg += [0] * (part + 1 - len(seg))
        return Generation(
            prompt_index=index,
            response_ids=[torch.cat(t) for t in tokens],
            logprobs=[torch.cat(lp) for lp in logps],
            finish_reasons=["stop" if d else "length" for d in done],
            segments=segments,
        )

    def _left_padded(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device
        lengths = torch.tensor([len(x) for x in seqs], device=dev)
        longest = max(map(len, seqs))
        ids = torch.full((len(seqs), longest), self.pad, dtype=torch.int64, device=dev)
        mask = torch.arange(longest, device=dev) >= longest - lengths[:, None]
        ids[mask] = torch.tensor([t for x in seqs for t in x], dtype=torch.int64, device=dev)
        return ids, mask.long()

    def _decode(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        cache: DynamicCache | None,
        params: SamplingParams,
        budget: int,
        part: int,
        cut: _Cut,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache]:
        """One `generate` call of at most `budget` tokens: the new tokens [rows, T], their
        log-probs, each row's kept length (through its stop token), whether it stopped, and
        the cache (every token's keys and values but the last's)."""
        greedy = params.temperature == 0
        # every setting that shapes the distribution is explicit: transformers fills unset
        # ones from its global defaults (top_k=50), which would sample from another
        # distribution than the log-probs below (and the trainer) assume
        # (greedy decoding reads none of them, and transformers warns when they are set)
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": 0 if params.top_k < 0 else params.top_k,
        }
        config = GenerationConfig(
            max_new_tokens=budget,
            do_sample=not greedy,
            **({} if greedy else sampling),
            eos_token_id=list(params.stop_token_ids) or None,
            pad_token_id=self.pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
        extra = {"stopping_criteria": StoppingCriteriaList([cut])} if cut.interrupt else {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(params.seed + 1_000_003 * part)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config, cache=cache, **extra
            )
        new = out.sequences[:, ids.shape[1] :]
        logits = torch.stack(out.logits, dim=1).float()
        logp = torch.log_softmax(logits / (1.0 if greedy else params.temperature), dim=-1)
        token_logp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        stops = torch.tensor(params.stop_token_ids, dtype=new.dtype, device=new.device)
        is_stop = torch.isin(new, stops)
        stopped = is_stop.any(dim=1)
        lengths = torch.where(stopped, is_stop.int().argmax(dim=1) + 1, new.shape[1])
        return new, token_logp, lengths, stopped, out.cache

    def _prefill(
        self,
        prompts: Sequence[Sequence[int]],
        ids: torch.Tensor,
        mask: torch.Tensor,
        n: int,
        kept: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]],
    ) -> DynamicCache | None:
        """Each row's keys and values but its last token's (generation's first step reads
        it): the rows the call before cut (`kept`) from theirs, the others computed, each
        distinct prompt once and repeated for its n samples. None: nothing to share, the
        generation encodes the prompts itself."""
        rows = [tuple(p) for p in prompts]
        found = [kept.get(r) for r in rows]
        todo = list(dict.fromkeys(r for r, f in zip(rows, found, strict=True) if f is None))
        if ids.shape[1] < 2 or (n == 1 and len(todo) == len(rows)):
            return None
        if len(todo) == len(rows):  # distinct prompts, nothing kept: one forward in place
            cache = self._encode(ids[:, :-1], mask[:, :-1])
            cache.batch_repeat_interleave(n)
            return cache
        computed = dict(zip(todo, self._heads(todo), strict=True))
        entries = [f if f is not None else computed[r] for r, f in zip(rows, found, strict=True)]
        width, shapes = ids.shape[1] - 1, next(e for e in entries if e)
        layers = []
        for layer, (k0, v0) in enumerate(shapes):
            keys = k0.new_zeros(len(rows), k0.shape[0], width, k0.shape[2])
            values = v0.new_zeros(len(rows), v0.shape[0], width, v0.shape[2])
            for i, entry in enumerate(entries):  # right-aligned, as the rows are
                if entry:
                    k, v = entry[layer]
                    keys[i, :, width - k.shape[1] :] = k
                    values[i, :, width - v.shape[1] :] = v
            layers.append((keys.repeat_interleave(n, 0), values.repeat_interleave(n, 0)))
        return DynamicCache(layers, config=self.model.config)

    def _prefill_images(
        self,
        prompts: Sequence[Sequence[int]],
        ids: torch.Tensor,
        mask: torch.Tensor,
        n: int,
        images: Sequence[Images | None] | None,
    ) -> DynamicCache | None:
        """A vision-language model's rows (prompts, or trajectories so far), each with its
        prompt's images, encoded once for their n samples but their last token, every token
        at its three positions (text: one in all three; images: frame, row and column of
        their merged grid; image tokens after the images', generated ones, are text); the
        positions the generation then gives (the mask's count) are moved on by each row's
        delta, as transformers moves them after its own prefill."""
        config = self.model.config
        token, merge = config.image_token_id, self.vision.spatial_merge_size
        given = list(images) if images is not None else [None] * len(prompts)
        # (counted on the host, a loop over runs of tokens; moved to the engine's device)
        none = torch.zeros(0, 3, dtype=torch.int64, device="cpu")
        grids = [im.grid_thw.cpu() if im is not None else none for im in given]
        positions = torch.zeros(3, *ids.shape, dtype=torch.int64, device="cpu")
        where = torch.zeros(ids.shape, dtype=torch.bool, device="cpu")
        deltas = []
        for r, (p, grid) in enumerate(zip(prompts, grids, strict=True)):
            pos, is_image = row_positions(torch.tensor(p, device="cpu"), grid, token, merge)
            positions[:, r, ids.shape[1] - len(p) :] = pos.T
            where[r, ids.shape[1] - len(p) :] = is_image
            deltas.append(int(pos.max()) + 1 - len(p))
        # (per generated row: a prompt's n rows follow it)
        rows = torch.tensor(deltas, device=ids.device).repeat_interleave(n)[:, None]
        self.model.model.rope_deltas = rows
        if ids.shape[1] < 2:
            return None
        embeds = self.model.get_input_embeddings()(ids[:, :-1])
        pictures = [im for im in given if im is not None]
        if pictures:  # the images' tokens take the vision tower's output, as transformers'
            pixels = torch.cat([im.pixel_values for im in pictures]).to(self.device)
            grid = torch.cat(grids).to(self.device)
            parts = self.model.model.get_image_features(pixels, grid).pooler_output
            features = torch.cat(list(parts)).to(embeds.dtype)
            embeds = embeds.masked_scatter(where[:, :-1, None].to(self.device), features)
        cache = DynamicCache(config=config)
        self.model(
            inputs_embeds=embeds,
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :, :-1].to(self.device),
            cache=cache,
        )
        cache.batch_repeat_interleave(n)
        return cache

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> DynamicCache:
        """The keys and values of left-padded rows, positions as generation makes them."""
        cache = DynamicCache(config=self.model.config)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
        return cache

    def _heads(
        self, seqs: list[tuple[int, ...]]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Per sequence, its keys and values but its last token's, cut to its own tokens
        (None: a one-token sequence has none)."""
        heads = [s[:-1] for s in seqs if len(s) > 1]
        if not heads:
            return [None] * len(seqs)
        cache = self._encode(*self._left_padded(heads))
        out, j = [], 0
        for s in seqs:
            if len(s) < 2:
                out.append(None)
                continue
            size = len(s) - 1
            out.append([(x.keys[j, :, -size:], x.values[j, :, -size:]) for x in cache.layers])
            j += 1
        return out

    def _keep(
        self,
        rows: list[Sequence[int]],
        new: torch.Tensor,
        stopped: torch.Tensor,
        cache: DynamicCache,
    ) -> None:
        """The keys and values of every row that ran to the call's limit, for the next
        call (a sliding-window cache is not kept: its rows are not right-aligned)."""
        if any(cache.is_sliding):
            return
        for r in (~stopped).nonzero().flatten().tolist():
            seq = (*rows[r], *new[r].tolist())
            size = len(seq) - 1
            self.kept[seq] = [
                (x.keys[r, :, -size:].clone(), x.values[r, :, -size:].clone()) for x in cache.layers
            ]

    def sleep(self) -> None:
        """Idempotent; on a GPU the weights wait in host memory while the trainer runs."""
        if not self.asleep and self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.asleep = True

    def wake(self) -> None:
        if self.asleep and self.device.type == "cuda":
            self.model.to(self.device)
        self.asleep = False

    def shutdown(self) -> None:
        del self.model
