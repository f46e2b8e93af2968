"""The geometric median of a batch (Weiszfeld's iteration): the paper's trainers start b_dec there,
a centre that outlying activations (huge-norm tokens) pull far less than the mean."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """argmin_m Σ_i ‖x_i − m‖ for points [N, d], as dictionary_learning computes it: start at the
    mean, reweight by 1/distance, stop when a step moves less than `tol` or after `max_iter` steps."""
    guess = points.mean(dim=0)
    for _ in range(max_iter):
        previous = guess
        weights = 1 / torch.linalg.vector_norm(points - guess, dim=1)
        weights /= weights.sum()
        guess = (weights.unsqueeze(1) * points).sum(dim=0)
        if torch.linalg.vector_norm(guess - previous) < tol:
            break
    return guess
