"""`extract --ray` on a real local Ray cluster gives the rows the local path gives."""

from __future__ import annotations

import pytest
import torch

from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import FolderImages
from sae_modules.activations.ray_extract import run_ray_extraction
from sae_modules.activations.shards import iter_shards
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower
from tests import activations_fixtures as fx

pytestmark = pytest.mark.slow


def _rows(out) -> dict[str, torch.Tensor]:
    shards = list(iter_shards(out))
    return {k: torch.cat([s[k] for s in shards]) for k in ("activations", "image_index", "token_index")}


def test_ray_extraction_equals_local_extraction(local_ray, tmp_path):
    model_dir = tmp_path / "clip"
    fx.clip_vision().save_pretrained(model_dir)
    fx.write_images(tmp_path / "images" / "a", 4, seed=1)
    fx.write_images(tmp_path / "images" / "b", 3, seed=2)
    source = FolderImages(tmp_path / "images")
    plan = ExtractionPlan(
        model=str(model_dir), layer=-2, tokens=TokenSelection.parse("random:2"), batch_size=2, shard_size=5
    )

    manifest = run_ray_extraction(
        str(model_dir), None, "cpu", source, tmp_path / "ray_out", plan, workers=1, progress=False
    )
    local = run_extraction(
        load_tower(str(model_dir), device="cpu"), source, tmp_path / "local", plan, progress=False
    )

    assert manifest.complete and manifest.count == local.count == 14
    assert manifest.labels == ["a"] * 4 + ["b"] * 3
    assert [e.count for e in manifest.shards] == [5, 5, 4]
    ray_rows, local_rows = _rows(tmp_path / "ray_out"), _rows(tmp_path / "local")
    assert torch.equal(ray_rows["image_index"], local_rows["image_index"])
    assert torch.equal(ray_rows["token_index"], local_rows["token_index"])
    torch.testing.assert_close(ray_rows["activations"], local_rows["activations"], rtol=0, atol=1e-6)
