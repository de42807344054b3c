"""Tools an agent can call: a small protocol, the built-ins, and a runner that calls them
concurrently with time budgets. A tool that raises, hangs, is given bad arguments or
returns something that is not text gives an error message in the conversation; nothing a
tool does ends the rank."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import math
import operator
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import jsonschema

from distflow_mc.agent.sandbox import Limits, run_python
from distflow_mc.dag.validate import import_fn


@runtime_checkable
class Tool(Protocol):
    """`__call__` may be a coroutine function or a plain one; it gets the parsed arguments
    and its time budget in seconds and returns text (or something JSON can write)."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object

    def __call__(self, arguments: dict[str, Any], budget_s: float) -> Any | Awaitable[Any]: ...


def schema(tool: Tool) -> dict[str, Any]:
    """The OpenAI function schema chat templates render (`tools=[...]`)."""
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def arguments_schema(**properties: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of an arguments object with these properties, all required."""
    return {"type": "object", "properties": properties, "required": list(properties)}


@dataclass
class Call:
    name: str
    arguments: dict[str, Any]


@dataclass
class Result:
    text: str  # what goes into the conversation
    error: str | None = None  # unknown_tool, bad_arguments, raised, bad_output, timeout

    @property
    def timed_out(self) -> bool:
        return self.error == "timeout"


def load_tools(paths: Sequence[str]) -> dict[str, Tool]:
    """Tools by dotted path: a Tool instance, or a class / function that makes one or a
    list of them (an environment's tool set). ValueError names the path at fault."""
    tools: dict[str, Tool] = {}
    for path in paths:
        try:
            made = import_fn(path)
        except ValueError as e:
            raise ValueError(f"rollout.agent.tools: {e}") from e
        if isinstance(made, type) or not isinstance(made, Tool):
            try:
                made = made()
            except Exception as e:
                raise ValueError(
                    f"rollout.agent.tools: '{path}' made no tool: {type(e).__name__}: {e}"
                ) from e
        for tool in made if isinstance(made, list) else [made]:
            if not isinstance(tool, Tool):
                raise ValueError(
                    f"rollout.agent.tools: '{path}' gave {type(tool).__name__}, not a tool"
                    " (name, description, parameters, __call__(arguments, budget_s))"
                )
            if tool.name in tools:
                raise ValueError(f"rollout.agent.tools: two tools are named '{tool.name}'")
            try:
                jsonschema.validators.validator_for(tool.parameters).check_schema(tool.parameters)
            except jsonschema.SchemaError as e:
                raise ValueError(
                    f"rollout.agent.tools: '{tool.name}' parameters: {e.message}"
                ) from e
            tools[tool.name] = tool
    return tools


def run_calls(
    calls: Sequence[tuple[Call, dict[str, Tool]]],
    budget_s: float,
    max_chars: int,
    budgets: Mapping[str, float] | None = None,
) -> list[Result]:
    """Run every call (with the tools its trajectory was offered) concurrently, each with
    its tool's entry in `budgets`, else `budget_s` seconds; results in order, each cut to
    `max_chars`."""
    return asyncio.run(gather_calls(calls, budget_s, max_chars, budgets)) if calls else []


async def gather_calls(
    calls: Sequence[tuple[Call, dict[str, Tool]]],
    budget_s: float,
    max_chars: int,
    budgets: Mapping[str, float] | None = None,
) -> list[Result]:
    """run_calls on a running event loop."""
    budgets = budgets or {}
    return await asyncio.gather(
        *(_run(c, tools, budgets.get(c.name, budget_s), max_chars) for c, tools in calls)
    )


async def _run(call: Call, tools: dict[str, Tool], budget_s: float, max_chars: int) -> Result:
    tool = tools.get(call.name)
    if tool is None:
        have = ", ".join(tools)
        return Result(f"error: unknown tool '{call.name}' (have: {have})", "unknown_tool")
    # what jsonschema.validate does, less its check of the schema (done once, at load)
    validator = jsonschema.validators.validator_for(tool.parameters)(tool.parameters)
    error = jsonschema.exceptions.best_match(validator.iter_errors(call.arguments))
    if error is not None:
        return Result(f"error: bad arguments for {call.name}: {error.message}", "bad_arguments")
    try:
        if inspect.iscoroutinefunction(tool.__call__):
            coro = tool(call.arguments, budget_s)
        else:
            coro = _in_daemon_thread(tool, call.arguments, budget_s)
        value = await asyncio.wait_for(coro, budget_s)
    except TimeoutError:
        return Result(f"error: {call.name} ran past its {budget_s:g} s budget", "timeout")
    except Exception as e:  # a tool's bug is the conversation's business, not the rank's
        return Result(f"error: {call.name} raised {type(e).__name__}: {e}", "raised")
    if not isinstance(value, str):
        try:
            value = json.dumps(value)
        except (TypeError, ValueError):
            return Result(f"error: {call.name} returned {type(value).__name__}", "bad_output")
    return Result(value if len(value) <= max_chars else value[:max_chars] + " ...(cut)")


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future:
    """A plain tool in its own daemon thread: one that hangs is abandoned at its budget
    and never holds the process at exit (a thread pool's workers would)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target() -> None:
        try:
            value, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting side
            value, error = None, e
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle, future, value, error)

    threading.Thread(target=target, daemon=True, name="tool").start()
    return future


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # given up on at its budget
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_LARGEST = 10**100


class Calculator:
    name = "calculator"
    description = "Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses."
    parameters: ClassVar[dict[str, Any]] = arguments_schema(
        expression={"type": "string", "description": "e.g. (17 + 4) * 3"}
    )

    def __call__(self, arguments: dict[str, Any], budget_s: float) -> str:
        try:
            value = self._eval(ast.parse(arguments["expression"], mode="eval").body)
        except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
            return f"error: {type(e).__name__}: {e}"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    def _eval(self, node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 256:
                raise ValueError("exponent larger than 256")
            value = _OPS[type(node.op)](left, right)
            if isinstance(value, complex) or abs(value) > _LARGEST or value != value:
                raise ValueError("result out of range")
            if isinstance(value, float) and math.isinf(value):
                raise OverflowError("result out of range")
            return value
        raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


class PythonExecutor:
    """Runs the code in the sandbox (`agent/sandbox.py`): its stdout, or its error."""

    name = "python"
    description = "Run a Python program and return what it prints. No network, no files kept."
    parameters: ClassVar[dict[str, Any]] = arguments_schema(
        code={"type": "string", "description": "a complete program"}
    )

    def __init__(self, memory_mb: int = 512) -> None:
        self.memory_mb = memory_mb

    def __call__(self, arguments: dict[str, Any], budget_s: float) -> str:
        cpu_s = max(1, math.ceil(budget_s))
        limits = Limits(wall_s=budget_s, cpu_s=cpu_s, memory_mb=self.memory_mb)
        out = run_python(arguments["code"], limits)
        if out.timed_out:
            return f"error: the program ran past {budget_s:g} s and was stopped\n{out.stdout}"
        if out.exit_code != 0:
            last = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.exit_code}"]
            return f"{out.stdout}error: {last[0]}"
        return out.stdout
