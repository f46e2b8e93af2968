"""`vlm-steer train --workers 2`: Ray Train DDP on CPU (gloo) gives the in-process result."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import sparse_activations, write_shards

from sae_modules.train import TrainConfig, train_sae

pytestmark = pytest.mark.slow


def test_two_ray_workers_train_the_same_sae_as_one_process(local_ray, tmp_path):
    write_shards(tmp_path / "shards", sparse_activations(3 * 128), shard_size=128)
    # per-vector TopK without AuxK: splitting a batch over ranks and averaging gradients is exact
    config = TrainConfig(
        shards=tmp_path / "shards",
        out=tmp_path / "local",
        architecture="topk",
        n_latents=32,
        k=2,
        auxk_alpha=0.0,
        batch_size=32,
        steps=12,
        lr=1e-2,
        warmup_steps=2,
        checkpoint_every=6,
        log_every=4,
        threads=1,
        progress=False,
    )
    local = train_sae(config)
    distributed = train_sae(config.model_copy(update={"out": tmp_path / "ray", "workers": 2}))
    assert distributed == (tmp_path / "ray" / "sae").resolve()
    expected = load_file(local / "sae.safetensors")
    for name, value in load_file(distributed / "sae.safetensors").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "ray" / "train_log.jsonl").read_text().splitlines()]
    local_rows = [
        json.loads(line) for line in (tmp_path / "local" / "train_log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for row, local_row in zip(rows, local_rows):  # figures summed over both ranks match one process
        for key in ("loss", "fvu", "l0", "dead_fraction", "samples"):
            assert row[key] == pytest.approx(local_row[key], rel=1e-3, abs=1e-6), key
