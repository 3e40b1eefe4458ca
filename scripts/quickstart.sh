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
# mimalloc (the cmeel-mimalloc wheel) for the job: lower peak RSS and fewer page faults in the update than glibc
# (bench/README.md "memory"); ALP_ALLOCATOR=glibc keeps glibc. The start-up log names the allocator in use.
if [ "${ALP_ALLOCATOR:-mimalloc}" = mimalloc ]; then
  lib="$(python -c 'from alp_agent.train.hardware import mimalloc_library as m; print(m() or "")')"
  [ -n "$lib" ] && export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec alp-agent train --config configs/quickstart.yaml "$@"
