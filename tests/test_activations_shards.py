"""The shard contract: round trip, atomic resume, corruption detection, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from sae_modules.activations.shards import (
    ShardError,
    ShardManifest,
    ShardWriter,
    iter_shards,
    load_shard,
    read_manifest,
)


def _manifest(**overrides) -> ShardManifest:
    fields = dict(
        model="tiny", layer=-2, tokens="random:2", d_in=4, images=["a.png", "b.png", "c.png"], seed=0
    )
    return ShardManifest(**(fields | overrides))


def _rows(image: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acts = torch.arange(n * 4, dtype=torch.float32).reshape(n, 4) + 100 * image
    return acts, torch.full((n,), image), torch.arange(n)


def test_round_trip_splits_rows_into_shards(tmp_path):
    writer = ShardWriter(tmp_path, _manifest(), shard_size=3)
    for image in range(3):
        writer.add(*_rows(image, 2))
    writer.finish()

    manifest = read_manifest(tmp_path)
    assert manifest.complete and manifest.count == 6
    assert [e.count for e in manifest.shards] == [3, 3]
    loaded = list(iter_shards(tmp_path))
    acts = torch.cat([s["activations"] for s in loaded])
    expected = torch.cat([_rows(i, 2)[0] for i in range(3)])
    assert torch.equal(acts, expected)
    assert torch.cat([s["image_index"] for s in loaded]).tolist() == [0, 0, 1, 1, 2, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_dtype_is_the_manifest_dtype(tmp_path):
    writer = ShardWriter(tmp_path, _manifest(dtype="bfloat16"), shard_size=10)
    writer.add(*_rows(0, 2))
    writer.finish()
    shard = load_shard(tmp_path, read_manifest(tmp_path).shards[0])
    assert shard["activations"].dtype == torch.bfloat16
    assert shard["image_index"].dtype == torch.int64


def test_resume_position_counts_vectors_of_the_last_image_across_shards(tmp_path):
    writer = ShardWriter(tmp_path, _manifest(), shard_size=2)
    writer.add(*_rows(0, 1))
    writer.add(*_rows(1, 4))  # image 1 spans shards 0 and 1 and is split into shard 2's buffer
    del writer  # killed: the buffered row is lost

    resumed = ShardWriter(tmp_path, _manifest(), shard_size=2)
    assert resumed.resume_position() == (1, 3)
    assert not resumed.complete


def test_corrupted_shard_is_detected_and_redone_on_resume(tmp_path):
    writer = ShardWriter(tmp_path, _manifest(), shard_size=2)
    for image in range(3):
        writer.add(*_rows(image, 2))
    writer.finish()
    manifest = read_manifest(tmp_path)
    file = tmp_path / manifest.shards[1].file
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF
    file.write_bytes(bytes(data))

    with pytest.raises(ShardError, match="shard-00001.safetensors is corrupted"):
        load_shard(tmp_path, manifest.shards[1])
    with pytest.warns(UserWarning, match="corrupted"):
        resumed = ShardWriter(tmp_path, _manifest(), shard_size=2)
    assert not resumed.complete
    assert [e.file for e in resumed.manifest.shards] == ["shard-00000.safetensors"]
    assert resumed.resume_position() == (0, 2)


def test_resume_refuses_a_different_job(tmp_path):
    ShardWriter(tmp_path, _manifest(), shard_size=2)
    with pytest.raises(ShardError, match="differs in: layer"):
        ShardWriter(tmp_path, _manifest(layer=3), shard_size=2)


def test_bad_manifest_and_rows_give_clear_errors(tmp_path):
    with pytest.raises(ShardError, match="not an activation shard directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "vlm-steer-activations/1", "model": "m"}))
    with pytest.raises(ShardError, match="fields: layer"):
        read_manifest(tmp_path)
    writer = ShardWriter(tmp_path / "new", _manifest(), shard_size=2)
    with pytest.raises(ShardError, match=r"must be \[n, 4\]"):
        writer.add(torch.zeros(2, 5), torch.zeros(2), torch.zeros(2))
