"""Tool-call parsers: the text of a model's turn -> the calls it makes. Chosen by
`rollout.agent.parser`: a built-in name or the dotted path of a function like these."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from distflow_mc.agent.tools import Call
from distflow_mc.dag.validate import import_fn

Parser = Callable[[str], tuple[list[Call], list[str]]]  # text -> (calls, parse errors)

_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def hermes(text: str) -> tuple[list[Call], list[str]]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as many as the turn has:
    the format of Qwen2.5 / Qwen3 chat templates (and Hermes-style models). Arguments may
    also come as a JSON string. A body that is not such an object, or an unclosed tag, is
    a parse error (the turn's other calls still run)."""
    calls, errors = [], []
    for body, close in _HERMES.findall(text):
        if not close:
            errors.append("a <tool_call> is not closed by </tool_call>")
            continue
        try:
            value = json.loads(body)
            arguments = value.get("arguments", {}) if isinstance(value, dict) else None
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            errors.append(f"the tool call is not valid JSON ({e.msg}): {body.strip()[:200]}")
            continue
        named = isinstance(value, dict) and isinstance(value.get("name"), str)
        if not named or not isinstance(arguments, dict):
            errors.append(f"a tool call needs a string 'name' and object 'arguments': {body[:200]}")
            continue
        calls.append(Call(value["name"], arguments))
    return calls, errors


BUILT_IN: dict[str, Parser] = {"hermes": hermes}


def get_parser(name: str) -> Parser:
    if name in BUILT_IN:
        return BUILT_IN[name]
    try:
        return import_fn(name)
    except ValueError as e:
        raise ValueError(
            f"rollout.agent.parser='{name}': not one of {sorted(BUILT_IN)} and {e}"
        ) from e
