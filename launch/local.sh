#!/usr/bin/env bash
# One-node launch: every local GPU (or NPROC CPU ranks) runs the same entrypoint.
#   launch/local.sh algo=grpo model=qwen2_5_0_5b
#   NPROC=2 launch/local.sh experiment=cpu_tiny_grpo trainer.dry_run=true
# Extra Hydra overrides pass through; `-m` sweeps work too.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m distflow_mc.main "$@"
