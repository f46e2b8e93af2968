"""The shuffled shard stream: coverage, per-epoch reshuffling, position-reproducibility, splits."""

from __future__ import annotations

import torch
from train_fixtures import write_shards

from sae_modules.activations.shards import read_manifest
from sae_modules.train.data import Piece, ShardReader, ShardStream, split_holdout


def _id_shards(tmp_path, n=60, shard_size=10):
    """Vectors whose first coordinate is their global index, so batches can be traced back."""
    acts = torch.zeros(n, 4)
    acts[:, 0] = torch.arange(n, dtype=torch.float32)
    acts[:, 1] = 1.0
    write_shards(tmp_path, acts, shard_size)
    return read_manifest(tmp_path)


def _stream(tmp_path, manifest, pieces, batch_size, buffer_vectors=20, seed=0):
    return ShardStream(ShardReader(tmp_path, manifest, verify=True), pieces, batch_size, seed, buffer_vectors)


def _ids(batches, n_batches):
    return torch.cat([next(batches)[:, 0] for _ in range(n_batches)]).long()


def test_every_epoch_covers_each_vector_once_in_a_new_order(tmp_path):
    manifest = _id_shards(tmp_path)
    pieces, _ = split_holdout(manifest, holdout_shards=0, holdout=None)
    stream = _stream(tmp_path, manifest, pieces, batch_size=6)
    ids = _ids(stream.batches(0), 30)  # 3 epochs of 60 vectors
    epochs = ids.view(3, 60)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(60))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # each 20-vector buffer mixes two whole shards, and the shard order changes every epoch
    buffers = [[frozenset((b // 10).tolist()) for b in epoch.split(20)] for epoch in epochs]
    assert all(len(shards) == 2 for epoch in buffers for shards in epoch)
    assert buffers[0] != buffers[1] and buffers[1] != buffers[2]
    orders = [[p.entry.file for g in stream.epoch_groups(e) for p in g] for e in range(3)]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    # a different seed gives a different order
    other = _ids(_stream(tmp_path, manifest, pieces, batch_size=6, seed=1).batches(0), 10)
    assert not torch.equal(other, epochs[0])


def test_batches_from_any_step_match_the_uninterrupted_stream(tmp_path):
    manifest = _id_shards(tmp_path)
    pieces, _ = split_holdout(manifest, holdout_shards=0, holdout=None)
    stream = _stream(tmp_path, manifest, pieces, batch_size=7)  # 60 % 7 != 0: batches straddle epochs
    full = _ids(stream.batches(0), 20)
    for start in (1, 8, 9, 13):
        resumed = _ids(_stream(tmp_path, manifest, pieces, batch_size=7).batches(start), 20 - start)
        assert torch.equal(resumed, full[start * 7 :])
    assert stream.position(9) == (1, 3)


def test_holdout_split_by_shards_and_by_fraction(tmp_path):
    manifest = _id_shards(tmp_path)
    train, held = split_holdout(manifest, holdout_shards=2, holdout=None)
    assert [p.entry.file for p in held] == ["shard-00004.safetensors", "shard-00005.safetensors"]
    assert sum(p.count for p in train) == 40
    train, held = split_holdout(manifest, holdout_shards=1, holdout=0.25)  # 15 vectors: cuts shard 4
    assert held[0] == Piece(manifest.shards[4], 5, 10) and sum(p.count for p in held) == 15
    assert train[-1] == Piece(manifest.shards[4], 0, 5) and sum(p.count for p in train) == 45
    reader = ShardReader(tmp_path, manifest, verify=True)
    held_ids = torch.cat(list(reader.batches(held, 4)))[:, 0].long()
    assert held_ids.tolist() == list(range(45, 60))


class _CountingReader(ShardReader):
    """Records how many vectors each read brings into memory."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.loads: list[int] = []

    def load(self, pieces):
        self.loads.append(sum(p.count for p in pieces))
        return super().load(pieces)


def test_stream_reads_at_most_one_buffer_at_a_time(tmp_path):
    manifest = _id_shards(tmp_path)
    pieces, _ = split_holdout(manifest, holdout_shards=0, holdout=None)
    reader = _CountingReader(tmp_path, manifest, True)
    stream = ShardStream(reader, pieces, batch_size=8, seed=0, buffer_vectors=25)
    _ids(stream.batches(0), 3 * 60 // 8)
    assert max(reader.loads) == 20 and sum(reader.loads) == 3 * 60
