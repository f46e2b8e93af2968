"""Training vectors from activation shards: a held-out split, and an endless shuffled stream.

The stream is a pure function of (seed, position): every epoch permutes the shards with a
generator seeded by (seed, epoch), groups consecutive shards into a memory-bounded buffer and
permutes the vectors inside each buffer with a generator seeded by (seed, epoch, buffer). Step s
reads vectors [s·B, (s+1)·B) of the concatenated epochs, so a resumed run sees exactly the
batches an uninterrupted one would have, and each epoch covers every training vector once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sae_modules.activations.shards import ShardEntry, ShardError, ShardManifest, load_shard


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one shard: the unit the splits and the shuffle work on."""

    entry: ShardEntry
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def split_holdout(
    manifest: ShardManifest, holdout_shards: int, holdout: float | None
) -> tuple[list[Piece], list[Piece]]:
    """(training pieces, held-out pieces): the end of the manifest order is held out.

    `holdout` (a fraction of vectors) may cut a shard in two; otherwise the last
    `holdout_shards` whole shards are held out.
    """
    pieces = [Piece(e, 0, e.count) for e in manifest.shards if e.count > 0]
    if holdout is not None:
        n_held = max(1, round(holdout * manifest.count))
        train, held, remaining = [], [], manifest.count - n_held
        for piece in pieces:
            cut = min(max(remaining, 0), piece.count)
            if cut:
                train.append(Piece(piece.entry, 0, cut))
            if cut < piece.count:
                held.append(Piece(piece.entry, cut, piece.count))
            remaining -= piece.count
    else:
        split = len(pieces) - holdout_shards
        train, held = pieces[: max(split, 0)], pieces[max(split, 0) :]
    if not train:
        raise ShardError(
            f"no training vectors left: the manifest has {len(pieces)} non-empty shard(s) and "
            f"{sum(p.count for p in held)} vectors are held out (lower holdout_shards or set holdout)"
        )
    return train, held


def _generator(*seeds: int) -> torch.Generator:
    """A torch generator seeded from a stable mix of integers (independent streams per tuple)."""
    state = np.random.SeedSequence([s % 2**63 for s in seeds]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ShardReader:
    """Loads pieces as float32 [n, d_in], checking each shard file's hash once per process."""

    def __init__(self, directory: Path, manifest: ShardManifest, verify: bool) -> None:
        self.directory, self.manifest, self.verify = directory, manifest, verify
        self._verified: set[str] = set()

    def load(self, pieces: Sequence[Piece]) -> Tensor:
        parts = []
        for piece in pieces:
            check = self.verify and piece.entry.file not in self._verified
            acts = load_shard(self.directory, piece.entry, verify=check)["activations"]
            self._verified.add(piece.entry.file)
            if acts.ndim != 2 or acts.shape[1] != self.manifest.d_in:
                raise ShardError(
                    f"shard {piece.entry.file} holds activations of shape {list(acts.shape)}, "
                    f"the manifest says d_in={self.manifest.d_in}"
                )
            parts.append(acts[piece.start : piece.stop].to(torch.float32))
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def batches(self, pieces: Sequence[Piece], batch_size: int) -> Iterator[Tensor]:
        """Pieces in order, one shard in memory at a time (the held-out evaluation)."""
        for piece in pieces:
            yield from self.load([piece]).split(batch_size)


class ShardStream:
    """The endless, reproducibly shuffled stream of training batches."""

    def __init__(
        self, reader: ShardReader, pieces: Sequence[Piece], batch_size: int, seed: int, buffer_vectors: int
    ) -> None:
        self.reader, self.pieces = reader, list(pieces)
        self.batch_size, self.seed, self.buffer_vectors = batch_size, seed, buffer_vectors
        self.n_vectors = sum(p.count for p in self.pieces)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, vector offset within the epoch) where step `step` starts reading."""
        return divmod(step * self.batch_size, self.n_vectors)

    def epoch_groups(self, epoch: int) -> list[list[Piece]]:
        """This epoch's shard order, cut into buffers of at most `buffer_vectors` (≥ one piece each)."""
        order = torch.randperm(len(self.pieces), generator=_generator(self.seed, epoch)).tolist()
        groups: list[list[Piece]] = []
        size = 0
        for i in order:
            piece = self.pieces[i]
            if groups and size + piece.count <= self.buffer_vectors:
                groups[-1].append(piece)
                size += piece.count
            else:
                groups.append([piece])
                size = piece.count
        return groups

    def buffers(self, epoch: int, skip: int = 0) -> Iterator[Tensor]:
        """One epoch as shuffled buffers ([n, d_in] each), starting `skip` vectors in.

        Buffers wholly before `skip` are not read from disk.
        """
        for g, group in enumerate(self.epoch_groups(epoch)):
            size = sum(p.count for p in group)
            if skip >= size:
                skip -= size
                continue
            vectors = self.reader.load(group)
            yield vectors[torch.randperm(size, generator=_generator(self.seed, epoch, g))][skip:]
            skip = 0

    def batches(self, start_step: int = 0) -> Iterator[Tensor]:
        """Batches for steps start_step, start_step + 1, ... (never ends; batches span epochs)."""
        epoch, skip = self.position(start_step)
        carry: Tensor | None = None
        while True:
            for vectors in self.buffers(epoch, skip):
                if carry is not None:
                    need = self.batch_size - len(carry)
                    carry = torch.cat([carry, vectors[:need]])
                    vectors = vectors[need:]
                    if len(carry) < self.batch_size:
                        del vectors
                        continue
                    yield carry
                    carry = None
                full = len(vectors) // self.batch_size * self.batch_size
                if full:
                    yield from vectors[:full].split(self.batch_size)
                if full < len(vectors):
                    carry = vectors[full:].clone()
                del vectors  # free this buffer before the next one is read
            epoch, skip = epoch + 1, 0
