#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels that the lent GPU machine lacks (it
# has torch, transformers, safetensors, pyarrow, tensorboard, tqdm, pytest and hypothesis,
# for Python 3.12, and no package index) into .whl/ (git-ignored), for scripts/gpu_check.sh.
# megatron-core's wheel is built for the GPU machine's Python; antlr4's runtime exists
# only as a source release and is pure Python, so it is built into a wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    megatron-core==0.16.1 hydra-core==1.3.2 omegaconf==2.3.0 \
    math-verify==0.9.0 latex2sympy2_extended==1.11.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
