"""What a run reads besides the weights (the model's config, the tokenizer, the data files,
the agent's tools), loaded and checked on every rank before any collective: a missing
file, an unknown data source, a file with no usable row or a sequence longer than the model
takes stops every rank on its own, with a message naming the setting."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distflow_mc.agent.loop import AgentLoop
from distflow_mc.agent.parser import get_parser
from distflow_mc.agent.tools import Tool, load_tools
from distflow_mc.config.schema import Config, Engine, SharedPrefix
from distflow_mc.data.dataset import RowSource
from distflow_mc.data.images import ImageInputs
from distflow_mc.data.loader import PromptLoader
from distflow_mc.data.tiny import ensure_task
from distflow_mc.models.gpt import use_transformer_engine
from distflow_mc.models.hf_config import HFArch, has_vision, read_hf_config
from distflow_mc.parallel.layout import Layouts
from distflow_mc.rewards.compute import check_sources

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    tokenizer: PreTrainedTokenizerBase
    agent: AgentLoop | None  # when rollout.agent.tools is set
    loader: PromptLoader | None  # on rollout emitters
    val_loader: PromptLoader | None  # on rollout emitters, when validation is on


def load_inputs(config: Config, layouts: Layouts, rank: int) -> Inputs:
    """The embedded task is made first if asked for (once per machine, under a file lock);
    then every input is checked, on every rank alike."""
    if config.model.embedded_task:
        ensure_task(Path(config.model.path).parent)
    tools = check_inputs(config)
    tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer or config.model.path)
    agent = AgentLoop(config.rollout.agent, tokenizer, tools) if tools is not None else None
    loader, val_loader = loaders(config, tokenizer, layouts, rank, tools)
    return Inputs(tokenizer, agent, loader, val_loader)


def loaders(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    layouts: Layouts,
    rank: int,
    tools: dict[str, Tool] | None,
) -> tuple[PromptLoader | None, PromptLoader | None]:
    """The training and validation loaders of a rollout emitter (None elsewhere). Every
    rank builds them first and checks that each file has usable rows, so a file with none
    stops every rank before any model is built."""
    rolls = rank in layouts.rollout.ranks  # else a train rank under SEPARATE: it checks only
    dp, size = layouts.rollout.coords(rank)["dp"] if rolls else 0, layouts.rollout.dp
    d, path = config.data, config.model.path
    images = ImageInputs.of(path, tokenizer, d.max_image_pixels) if has_vision(path) else None
    built = [PromptLoader(d, tokenizer, dp, size, config.trainer.seed, tools=tools, images=images)]
    built[0].check_usable("data.train_files")
    if config.trainer.val_every and config.data.val_files:
        built.append(validation_loader(config, tokenizer, dp, size, tools, images))
        built[1].check_usable("data.val_files")
    if rank not in layouts.rollout.emitters():
        return None, None
    return built[0], built[1] if len(built) > 1 else None


def check_inputs(config: Config) -> dict[str, Tool] | None:
    """The model and tokenizer directories exist, every data_source of the training and
    validation files has a scorer, and the agent's tools and parser load: checked on every
    rank before any model is built, so no rank meets a missing file or an unknown source
    mid-run. Returns the agent's tools (None: single-turn rollouts)."""
    d = config.data
    needed = [("model.path", config.model.path, "config.json")]
    if d.tokenizer is not None:
        needed.append(("data.tokenizer", d.tokenizer, "tokenizer_config.json"))
    for key, path, file in needed:
        if not (Path(path) / file).is_file():
            raise ValueError(
                f"{key}={path}: no {file} there; a local Hugging Face directory is expected"
                " (nothing is downloaded)"
            )
    arch = read_hf_config(config.model.path)
    if arch.vision is not None:
        check_vision(config)
    check_lengths(config, arch)
    for key, files in (("data.train_files", d.train_files), ("data.val_files", d.val_files)):
        if files:
            check_sources(config.reward, RowSource(files).data_sources(), f"{key} {files}")
    agent = config.rollout.agent
    if not agent.tools:
        return None
    get_parser(agent.parser)
    tools = load_tools(agent.tools)
    unknown = sorted(set(agent.tool_timeouts) - set(tools))
    if unknown:
        raise ValueError(
            f"rollout.agent.tool_timeouts names {unknown}, not tools of rollout.agent.tools"
            f" ({', '.join(tools)})"
        )
    return tools


def check_vision(config: Config) -> None:
    """What a vision-language model (Qwen2.5-VL) runs with so far: the rest refused by
    name, before any model is built."""
    c, t = config, config.trainer
    refused = [
        (c.parallel.cp > 1, "parallel.cp", " > 1 (each CP rank would need its chunks' images)"),
        (c.parallel.sequence_parallel, "parallel.sequence_parallel", "=true"),
        (t.sequence_packing, "trainer.sequence_packing", "=true"),
        (t.shared_prefix is SharedPrefix.ALWAYS, "trainer.shared_prefix", "=ALWAYS"),
        (c.rollout.stream, "rollout.stream", "=true"),
        (c.rollout.partial, "rollout.partial", "=true"),
        (c.rollout.engine is Engine.SGLANG, "rollout.engine", "=SGLANG"),
        (use_transformer_engine(c.model.layer_spec.value), "model.layer_spec", " on TE's spec"),
    ]
    for bad, key, what in refused:
        if bad:
            raise ValueError(
                f"{key}{what} is not built for vision-language models yet (model.path="
                f"{c.model.path}; issue #27)"
            )


def check_lengths(config: Config, arch: HFArch) -> None:
    """The longest sequence a rollout can make fits the model's positions: ValueError with
    the numbers when it does not; where it relies on the model's RoPE scaling (positions
    past the original context), say so once."""
    d, r = config.data, config.rollout
    if r.agent.tools:
        longest, settings = r.agent.max_total_tokens, "rollout.agent.max_total_tokens"
    else:
        longest = d.max_prompt_length + r.max_new_tokens
        settings = (
            f"data.max_prompt_length + rollout.max_new_tokens = {d.max_prompt_length} +"
            f" {r.max_new_tokens}"
        )
    limit = arch.max_position_embeddings
    if longest > limit:
        raise ValueError(
            f"{settings} = {longest} tokens exceeds max_position_embeddings={limit} of"
            f" model.path={config.model.path}: lower them (the model was not trained on"
            " positions past it)"
        )
    scaling = arch.rope_scaling
    if scaling is not None and longest > scaling.original_max_position_embeddings:
        log.info(
            "sequences of up to %d tokens (%s) reach past the model's original context of %d;"
            " its llama3 RoPE scaling (factor %s) covers up to %d",
            longest,
            settings,
            scaling.original_max_position_embeddings,
            scaling.factor,
            limit,
        )


def validation_loader(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    dp_rank: int,
    dp_size: int,
    tools: dict[str, Tool] | None = None,
    images: ImageInputs | None = None,
) -> PromptLoader:
    """The whole held-out set as one step, in file order, split over the rollout ranks."""
    rows = RowSource(config.data.val_files).num_rows
    val = replace(
        config.data,
        train_files=config.data.val_files,
        batch_size=rows - rows % dp_size,
        shuffle=False,
        prefetch=False,
    )
    seed = config.trainer.seed
    return PromptLoader(val, tokenizer, dp_rank, dp_size, seed, tools=tools, images=images)
