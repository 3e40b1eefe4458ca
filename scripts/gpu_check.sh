#!/usr/bin/env bash
# End-to-end GPU check (< 5 minutes on one H100): a random Qwen2.5-0.5B-sized model built offline, vLLM in bf16 on
# CUDA in its own process, the float32 trainer on the same GPU, 3 asynchronous training batches, then a check that
# the engine holds the trainer's final weights. Prints timings and a last line "gpu_check: PASS" or "... FAIL <why>";
# everything else lands in the output folder (results.json, metrics.jsonl, the random model).
#
#   ALP_VLLM=cuda bash scripts/setup.sh        # once: CUDA vLLM into .venv (needs the network)
#   bash scripts/gpu_check.sh                  # output: runs/gpu_check (GPU_CHECK_OUT=... to change)
#   bash scripts/gpu_check.sh --dry-run        # config and memory plan only, no GPU needed
#   bash scripts/gpu_check.sh engine.placement=inprocess run.async_rollout=false   # any config override
#
#   bash scripts/gpu_check.sh --tokenizer DIR engine.backend=transformers engine.placement=inprocess   # no vLLM
#
# Exit code 0 = PASS, 1 = FAIL, 2 = bad config. On a GPU once (H200, 2026-11-30, no vLLM there): the transformers
# variant crashed in the tail metrics after its first update (fixed since, not yet rerun on a GPU); the vLLM path has
# never run on a GPU. The test suite runs --dry-run and the CPU variants (--size tiny --allow-cpu, both backends).
# Next GPU session: the script in results/gpu_check/README.md ("Next GPU session"): tests/alp_agent/
# test_device_mixing.py on cuda:0, then this check three ways (as above; sigma0=auto + bf16; grpo + kl_coef).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m alp_agent.app.gpu_check --out "${GPU_CHECK_OUT:-runs/gpu_check}" "$@"
