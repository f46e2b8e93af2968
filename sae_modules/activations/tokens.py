"""Which token vectors of a block's output [B, T, D] become training rows.

Position 0 is CLS in both transformers and open_clip towers; 1..P are patches. Random picks are
seeded by (seed, image index), never by batch position, so a resumed or re-batched run picks
the same tokens as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from sae_modules.activations.errors import ExtractError

Mode = Literal["all", "cls", "patches", "mean", "random"]
MEAN_TOKEN = -1
SPEC_HELP = "all | cls | patches | mean | random:K"


@dataclass(frozen=True)
class TokenSelection:
    """all: every token; cls: position 0; patches: 1..P; mean: the patch mean (token_index -1);
    random:K: K distinct patches per image."""

    mode: Mode
    k: int = 0

    @classmethod
    def parse(cls, spec: str) -> TokenSelection:
        name, _, count = spec.strip().partition(":")
        if name in ("all", "cls", "patches", "mean") and not count:
            return cls(name)
        if name == "random" and count.isdigit() and int(count) > 0:
            return cls("random", int(count))
        raise ExtractError(f"--tokens: {spec!r} is not a token selection ({SPEC_HELP}, K > 0)")

    def __str__(self) -> str:
        return f"random:{self.k}" if self.mode == "random" else self.mode

    def per_image(self, n_tokens: int) -> int:
        """Rows each image yields; checks the selection fits a tower of `n_tokens` tokens."""
        n_patches = n_tokens - 1
        if self.mode == "random" and self.k > n_patches:
            raise ExtractError(
                f"--tokens: random:{self.k} asks for more than the tower's {n_patches} patches"
            )
        return {"all": n_tokens, "cls": 1, "patches": n_patches, "mean": 1, "random": self.k}[self.mode]

    def positions(self, n_tokens: int, image_index: int, seed: int) -> Tensor:
        """Token positions picked for one image (sorted), or [MEAN_TOKEN] for mean pooling."""
        if self.mode == "all":
            return torch.arange(n_tokens)
        if self.mode == "cls":
            return torch.tensor([0])
        if self.mode == "patches":
            return torch.arange(1, n_tokens)
        if self.mode == "mean":
            return torch.tensor([MEAN_TOKEN])
        rng = np.random.default_rng([seed, image_index])
        picked = np.sort(rng.choice(n_tokens - 1, size=self.k, replace=False)) + 1
        return torch.from_numpy(picked).long()

    def select(
        self, hidden: Tensor, image_indices: Sequence[int], seed: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """hidden [B, T, D] of images `image_indices` -> (rows [n, D], image_index [n], token_index [n])."""
        n_tokens = hidden.shape[1]
        self.per_image(n_tokens)
        positions = [self.positions(n_tokens, int(i), seed) for i in image_indices]
        if self.mode == "mean":
            rows = hidden[:, 1:].mean(dim=1)
        else:
            batch = torch.cat([torch.full_like(p, b) for b, p in enumerate(positions)])
            rows = hidden[batch.to(hidden.device), torch.cat(positions).to(hidden.device)]
        image_index = torch.cat(
            [torch.full_like(p, int(i)) for i, p in zip(image_indices, positions, strict=True)]
        )
        return rows, image_index, torch.cat(positions)
