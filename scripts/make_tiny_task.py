"""Make the embedded CPU tasks: tokenizers, tiny random Llama-style models, parquet data.

    python scripts/make_tiny_task.py [ROOT]     # default: data/ (DISTFLOW_DATA_DIR)

Deterministic: the same files every time. experiment=cpu_tiny_grpo / cpu_tiny_ppo use the
copy task, experiment=cpu_tiny_agent the agent task.
"""

from __future__ import annotations

import os
import sys

from distflow_mc.data.tiny import make_task

if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DISTFLOW_DATA_DIR", "data")
    print(f"embedded task written to {make_task(root)}")
