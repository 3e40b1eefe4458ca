#!/usr/bin/env bash
# The README's first command: install everything, then train the embedded default (SmolLM2-135M-Instruct, vLLM on the
# CPU, synthetic math tool env, Seq-ALP) and print the held-out accuracy before and after. Extra arguments are
# config overrides, e.g. `bash scripts/quickstart.sh run.iterations=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${ALP_VENV:-.venv}/bin/activate"
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-ERROR}"  # vLLM CPU start-up warnings are noise here
export TORCH_CPP_LOG_LEVEL="${TORCH_CPP_LOG_LEVEL:-ERROR}"  # C++ warnings (vLLM's NUMA binding) before torch loads
# ALP_ALLOCATOR=mimalloc runs the job under mimalloc (the cmeel-mimalloc wheel): 0.3-0.5 GiB lower peak RSS but a
# ~1.25x slower update than glibc with the job's tuning (bench/README.md "allocators"): for machines short of memory.
if [ "${ALP_ALLOCATOR:-glibc}" = mimalloc ]; then
  lib="$(python -c 'from alp_agent.train.hardware import mimalloc_library as m; print(m() or "")')"
  [ -n "$lib" ] && export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec alp-agent train --config configs/quickstart.yaml "$@"
