"""The Python tool's sandbox contains what a model's code can do: a fork bomb, an endless
loop, a huge allocation, a network call, an output flood, a sleep; the host carries on."""

from __future__ import annotations

import os

from distflow_mc.agent.sandbox import Limits, run_python
from distflow_mc.agent.tools import PythonExecutor

LIMITS = Limits(wall_s=5, cpu_s=2, memory_mb=256)


def test_a_plain_program_runs():
    out = run_python("import math\nprint(math.factorial(20))", LIMITS)
    assert out.ok and out.stdout.strip() == str(2432902008176640000)


def test_fork_bomb_is_contained():
    children_before = _children()
    out = run_python("import os\nwhile True:\n    os.fork()", LIMITS)
    assert not out.ok and "not allowed" in out.stderr
    out = run_python("import subprocess\nsubprocess.run(['sleep', '100'])", LIMITS)
    assert not out.ok and "not allowed" in out.stderr
    assert _children() == children_before


def test_endless_loop_is_stopped_by_the_cpu_limit():
    out = run_python("while True:\n    pass", LIMITS)
    assert not out.ok and not out.timed_out and out.exit_code != 0


def test_sleeping_past_the_wall_clock_is_killed():
    out = run_python("import time\ntime.sleep(100)", Limits(wall_s=1, cpu_s=2))
    assert out.timed_out and out.exit_code is None


def test_huge_allocation_fails_inside():
    out = run_python("x = bytearray(8 * 1024**3)\nprint('allocated')", LIMITS)
    assert not out.ok and "MemoryError" in out.stderr and "allocated" not in out.stdout


def test_no_network():
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "s.settimeout(2)\n"
        "s.connect(('127.0.0.1', 9))\n"
        "print('connected')\n"
    )
    out = run_python(code, LIMITS)
    assert not out.ok and "connected" not in out.stdout
    assert "not allowed" in out.stderr  # the audit hook refuses it first
    # below the hook: the interfaces of its own network namespace, where the kernel gives one
    out = run_python("print(open('/proc/net/dev').read())", LIMITS)
    interfaces = {line.split(":")[0].strip() for line in out.stdout.splitlines()[2:] if line}
    assert out.ok and interfaces
    if out.network_namespace:
        assert interfaces <= {"lo"}, interfaces


def test_output_flood_is_capped():
    out = run_python("while True:\n    print('x' * 10000)", LIMITS)
    assert not out.ok and len(out.stdout) <= LIMITS.output_bytes + 100


def test_python_tool_reports_errors_as_text():
    tool = PythonExecutor(memory_mb=256)
    assert tool({"code": "print(6 * 7)"}, 5.0).strip() == "42"
    assert "ZeroDivisionError" in tool({"code": "1 / 0"}, 5.0)
    assert "stopped" in tool({"code": "import time\ntime.sleep(10)"}, 1.0)


def _children() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/task"))
