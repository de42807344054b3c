#!/usr/bin/env bash
# Every GPU check in one run, well under 10 minutes on one H100/H200: the GPU tests
# (tests/gpu: the embedded GRPO, PPO and vision-language runs on CUDA, the SGLang
# engine), the model benchmark (tokens/s and MFU for the Qwen2.5-0.5B shapes, bf16) and
# long context (a training step of the 0.5B shapes on 8K-32K tokens, and of 4 layers at
# Qwen2.5-7B's widths on 32K, under each trainer.recompute: peak GPU memory and tokens/s;
# one GPU cannot run CP, which needs a rank per chunk pair).
#
# The GPU machine has torch and transformers but not megatron-core, hydra, sglang or
# transformer-engine, and no package index: run scripts/fetch_gpu_wheels.sh first where
# pip works, and bring .whl/ along. What cannot be installed there is skipped, and said.
# Results go to $OUT (default gpu_check_out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/distflow_site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/distflow_site:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" \
        || { echo "megatron-core missing: run scripts/fetch_gpu_wheels.sh and carry .whl"; exit 1; }
    for pkg in sglang transformer_engine; do
        python3 -c "import $pkg" 2>/dev/null && echo "$pkg: installed" \
            || echo "$pkg: not installed here: its checks are skipped (local layer spec, HF engine)"
    done
} 2>&1 | tee "$OUT/env.txt"
status=0
python3 -m pytest -q -rs -s -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests.txt" \
    || status=1
(cd "$OUT" && python3 "$OLDPWD/scripts/bench_model.py" --size qwen0.5b --dtype bf16 --tp 1 \
    --steps 10 --warmup 3) 2>&1 | tee "$OUT/bench_model.txt" || status=1
(cd "$OUT" && python3 "$OLDPWD/scripts/bench_long_context.py" --size qwen0.5b \
    --dtype bfloat16 --lengths 8192 16384 32768 --cp 1 --recompute none selective full \
    --repeats 1) 2>&1 | tee "$OUT/bench_long_context.txt" || status=1
(cd "$OUT" && python3 "$OLDPWD/scripts/bench_long_context.py" --size qwen7b_4layers \
    --dtype bfloat16 --lengths 32768 --cp 1 --recompute none selective full --repeats 1) \
    2>&1 | tee "$OUT/bench_long_context_7b.txt" || status=1
exit $status
