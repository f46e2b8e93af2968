"""Sparse encode/decode for the TopK family: the encoder matmul stays dense, everything after it
touches only the selected (vector, latent) entries.

Why: at 16k latents and k=20 a dense [B, n_latents] latent tensor, its dense decode and a dense
encoder-weight gradient each cost about as much as the forward matmul. Here the pre-activations
are computed once without autograd, the chosen entries are picked out by a custom autograd function
whose backward sums each latent's entries with one `embedding_bag`, and the decode is an `embedding_bag`.
AuxK picks its entries the same way (`top_positive_selection`).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The CSR tensor used in the backward is internal and valid by construction.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


class Selection(NamedTuple):
    """Chosen entries of a [n_rows, n_latents] pre-activation matrix, in row-major order.

    `cols` are sorted within each row and unique, so (rows, cols) is a valid coalesced COO index
    and (crow, cols) a valid CSR index.
    """

    rows: Tensor
    cols: Tensor
    crow: Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.cols.numel()


def crow_from_rows(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointers [n_rows + 1] for row-major entries with these row ids (any order: only
    the count per row matters)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def topk_selection(pre: Tensor, k: int) -> Selection:
    """The k largest pre-activations of every row."""
    n_rows, n = pre.shape
    cols = pre.topk(k, dim=1, sorted=False).indices.sort(dim=1).values.flatten()
    rows = torch.arange(n_rows, device=pre.device).repeat_interleave(k)
    crow = torch.arange(0, n_rows * k + 1, k, device=pre.device)
    return Selection(rows, cols, crow, (n_rows, n))


#: Entries sampled to estimate the batch top-k threshold: enough that the sample holds ~100+ entries
#: above it at k / n_latents = 1/1000, small enough to cost nothing next to one pass over the batch.
THRESHOLD_SAMPLE = 1 << 17


def _coprime_stride(size: int, n: int) -> int:
    """A sampling stride about size / THRESHOLD_SAMPLE that is coprime with the row length, so the
    strided sample visits every column (and every row) evenly whatever the data's layout."""
    stride = max(1, size // THRESHOLD_SAMPLE)
    while math.gcd(stride, n) != 1:
        stride += 1
    return stride


def _marked_positions(marks: Tensor) -> Tensor:
    """Positions of the True entries of a flat bool tensor, ascending. On CPU through NumPy's
    flatnonzero, several times faster than torch's `nonzero` there (single-threaded, no count pass)."""
    if marks.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(marks.numpy()))
    return marks.nonzero().squeeze(1)


def _count_marked(marks: Tensor) -> int:
    """How many True entries a flat bool tensor holds (NumPy's count is ~8x torch's on CPU)."""
    if marks.device.type == "cpu":
        return int(np.count_nonzero(marks.numpy()))
    return int(marks.count_nonzero())


def _mask_of(chosen: Tensor, n: int) -> Tensor:
    """A bool [n] marking the positions `chosen`: indexing with it keeps the original order, which
    costs less than sorting `chosen`."""
    keep = torch.zeros(n, dtype=torch.bool, device=chosen.device)
    keep[chosen] = True
    return keep


def _indices_above(flat: Tensor, threshold: float, mask: Tensor) -> Tensor:
    """Positions of the entries > threshold, ascending."""
    return _marked_positions(torch.gt(flat, threshold, out=mask))


#: Entries scanned at a time when looking for the first few ties: small enough that, with ties as
#: common as they get, the scan stops after a sliver of the batch.
TIE_CHUNK = 1 << 16


def _first_equal(flat: Tensor, value: float, count: int, mask: Tensor) -> Tensor:
    """Positions of the first `count` entries equal to `value` (fewer if there are fewer), ascending.
    Scans in chunks and stops once it has them, so heavy ties cost a fraction of a pass."""
    found: list[Tensor] = []
    have = 0
    for start in range(0, flat.numel(), TIE_CHUNK):
        chunk = flat[start : start + TIE_CHUNK]
        marks = torch.eq(chunk, value, out=mask[: chunk.numel()])
        hits = marks.nonzero().squeeze(1)[: count - have] + start
        found.append(hits)
        have += hits.numel()
        if have == count:
            break
    return torch.cat(found) if found else flat.new_zeros(0, dtype=torch.long)


def batch_topk_selection(pre: Tensor, k: int, mask_out: Tensor | None = None) -> Selection:
    """The k * B largest pre-activations of the whole [B, n] batch (ties broken by position).

    Cost independent of how the values are spread over rows: a threshold t is read off an evenly
    strided sample so that about 1.25 k B entries (plus a few standard deviations) should exceed it;
    one pass lists the entries > t. If they are at least k B, the batch's top k B is among them
    (exact), and a top-k over those few candidates picks it. If they fall short, the k B-th value may
    be t itself (ties: quantised or bf16 pre-activations): the first missing entries equal to t are
    taken, found by a chunked scan that stops early. Otherwise the sample rank doubles and the pass
    repeats (at worst a top-k over the whole batch). `mask_out`, a bool buffer of B * n entries, saves a
    fresh allocation (page faults) per call.
    """
    n_rows, n = pre.shape
    flat = pre.reshape(-1)
    total = min(k * n_rows, flat.numel())
    sample = flat[:: _coprime_stride(flat.numel(), n)]
    expected = sample.numel() * total / flat.numel()
    rank = int(1.25 * expected + 4 * math.sqrt(expected) + 8)
    mask = mask_out if mask_out is not None else torch.empty_like(flat, dtype=torch.bool)
    while True:
        if rank >= sample.numel():
            candidates = flat.topk(total, sorted=False).indices.sort().values
            break
        threshold = float(sample.topk(rank, sorted=False).values.min())
        candidates = _indices_above(flat, threshold, mask)
        if candidates.numel() >= total:
            if candidates.numel() > total:
                top = flat.index_select(0, candidates).topk(total, sorted=False).indices
                candidates = candidates[_mask_of(top, candidates.numel())]
            break
        missing = total - candidates.numel()
        ties = _first_equal(flat, threshold, missing, mask)
        if ties.numel() == missing:
            candidates = torch.cat([candidates, ties]).sort().values
            break
        rank *= 2
    rows = candidates // n
    return Selection(rows, candidates - rows * n, crow_from_rows(rows, n_rows), (n_rows, n))


#: Share of positive entries in AuxK's dead block past which its per-row top-k runs over the whole
#: block rather than over the positive candidates: the crossover measured on CPU lies between 1/16
#: and 1/4 (k 32-128, 1,024-3,481 dead latents, batch 1,024); at 1/64 the candidates cost 1/5 as much.
DENSE_CANDIDATES = 1 / 8


def top_positive_selection(
    pre: Tensor, k: int, columns: Tensor, mask_out: Tensor | None = None, block_out: Tensor | None = None
) -> Selection:
    """Each row's k largest positive pre-activations among the latents `columns` (ascending
    indices); rows with fewer positive ones keep them all.

    What AuxK decodes: its top k_aux dead latents go through a ReLU, so an entry <= 0 adds nothing
    to the reconstruction and gets no gradient. Leaving those out gives the same loss and gradients
    as a top-k over every dead latent, at the cost of one pass over their block when dead latents
    seldom fire (the usual case: a latent dies because its pre-activations went negative). Only when
    a row holds more than k positive ones does a top-k run over its positive ones; once positive
    entries are many, one top-k over the whole block (whose non-positive picks are dropped) is
    cheaper than handling each candidate.
    `mask_out` as in `batch_topk_selection`; `block_out`, a buffer of at least B * len(columns)
    entries of pre's dtype, likewise saves the copy of the block a fresh allocation.
    """
    n_rows, n = pre.shape
    m = columns.numel()
    if block_out is None:
        block = pre.index_select(1, columns)
    else:
        block = torch.index_select(pre, 1, columns, out=block_out[: n_rows * m].view(n_rows, m))
    if mask_out is None:
        mask_out = torch.empty(n_rows * m, dtype=torch.bool, device=pre.device)
    mask = mask_out[: n_rows * m]
    marks = torch.gt(block.view(-1), 0, out=mask)
    if k < m and _count_marked(marks) > DENSE_CANDIDATES * marks.numel():
        top = row_topk_indices(block, k).sort(dim=1).values
        positions = (top + torch.arange(n_rows, device=pre.device)[:, None] * m).flatten()
        positions = positions[block.view(-1)[positions] > 0]
        rows = positions // m
    else:
        positions = _marked_positions(marks)
        rows = positions // m
        counts = torch.bincount(rows, minlength=n_rows)
        if positions.numel() and int(counts.max()) > k:
            positions, rows = _largest_per_row(block.view(-1)[positions], positions, rows, counts, k)
    cols = columns[positions - rows * m]
    return Selection(rows, cols, crow_from_rows(rows, n_rows), (n_rows, n))


#: Row length, in multiples of k, from which `row_topk_indices` goes through group maxima (below it the
#: two top-k calls are nearly as long as the row). Measured on CPU by `python -m benchmarks train`
#: (k 32-128, five inputs): 0.27-1.31x torch's top-k; above 1 right at 16k, and past 64k on Gaussian or
#: tied rows, where torch keeps a heap whose cost depends on the data (ascending rows: 0.27x).
GROUPED_TOPK_MIN_RATIO = 16


def row_topk_indices(block: Tensor, k: int) -> Tensor:
    """Column indices [n_rows, k] of each row's k largest entries (unordered; ties broken arbitrarily).

    Long rows go through group maxima, so that both top-k calls run over short rows: the first
    g * w columns are cut into g slabs of w columns, group j being column j of every slab. A row's
    top k entries lie in its k groups with the largest maxima, or in the < g columns after the
    slabs: an entry of any other group has k group maxima at least as large above it. So a top-k
    over the w group maxima, then one over the g * k entries of the chosen groups and the rest
    columns, give the row's top k exactly, touching the block once more (the maxima) instead of
    sorting in it. g = √(m / k) balances the two top-k calls.
    """
    n_rows, m = block.shape
    if m < GROUPED_TOPK_MIN_RATIO * k:
        return block.topk(k, dim=1, sorted=False).indices
    g = round(math.sqrt(m / k))
    w = m // g
    group_max = block[:, : g * w].view(n_rows, g, w).amax(dim=1)
    groups = group_max.topk(k, dim=1, sorted=False).indices
    slab_starts = torch.arange(0, g * w, w, device=block.device)
    candidates = (groups[:, None, :] + slab_starts[None, :, None]).view(n_rows, g * k)
    rest = torch.arange(g * w, m, device=block.device).expand(n_rows, -1)
    candidates = torch.cat([candidates, rest], dim=1)
    picked = block.gather(1, candidates).topk(k, dim=1, sorted=False).indices
    return candidates.gather(1, picked)


def _largest_per_row(
    values: Tensor, positions: Tensor, rows: Tensor, counts: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Of row-major candidates (`values` at `positions` in rows `rows`, `counts` per row), each row's
    k largest, still row-major: a top-k over a [rows, most candidates] matrix padded with -inf."""
    starts = counts.cumsum(0) - counts
    slots = torch.arange(positions.numel(), device=positions.device) - starts[rows]
    padded = values.new_full((counts.numel(), int(counts.max())), -torch.inf)
    padded[rows, slots] = values
    top = padded.topk(k, dim=1, sorted=False).indices
    chosen = (top + starts[:, None])[top < counts[:, None]]
    keep = _mask_of(chosen, positions.numel())
    return positions[keep], rows[keep]


def threshold_selection(pre: Tensor, threshold: Tensor) -> Selection:
    """Entries above the global threshold θ (and above zero): BatchTopK's inference rule."""
    rows, cols = (pre > threshold.clamp_min(0)).nonzero(as_tuple=True)
    return Selection(rows, cols, crow_from_rows(rows, pre.shape[0]), tuple(pre.shape))


class _PickPreActs(torch.autograd.Function):
    """pre[rows, cols] where pre = (x - b_dec) @ W_enc + b_enc was computed without autograd.

    With S [B, n_latents] the gradient of the selected entries: dW_enc = (x - b_dec)^T S, one
    `embedding_bag` over the entries grouped by latent (each latent's column sums its vectors'
    rows, weighted by their gradients; 3-4x faster on CPU than a dense-times-CSR product);
    db_enc = column sums of S, db_dec = -W_enc db_enc; dx = S W_enc^T as CSR times dense.
    """

    @staticmethod
    def forward(ctx, pre, x, W_enc, b_enc, b_dec, rows, cols, crow):  # type: ignore[override]
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols, crow)
        return pre.view(-1).index_select(0, rows * pre.shape[1] + cols)  # 2-3x pre[rows, cols] on CPU

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, W_enc, b_dec, rows, cols, crow = ctx.saved_tensors
        need_x, need_w, need_b_enc, need_b_dec = ctx.needs_input_grad[1:5]
        grad_x = grad_w = grad_b_enc = grad_b_dec = None
        grad = grad.contiguous()
        n_latents = W_enc.shape[1]
        if need_w:
            by_latent = cols.argsort(stable=True)
            grad_w = F.embedding_bag(
                rows[by_latent],
                x - b_dec,
                crow_from_rows(cols, n_latents),  # bag sizes: the per-latent counts, in any order
                mode="sum",
                per_sample_weights=grad[by_latent],
                include_last_offset=True,
            ).T
        if need_x:
            csr = torch.sparse_csr_tensor(crow, cols, grad, (x.shape[0], n_latents), check_invariants=False)
            grad_x = torch.mm(csr, W_enc.T)
        if need_b_enc or need_b_dec:
            col_sums = torch.zeros(n_latents, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
            grad_b_enc = col_sums if need_b_enc else None
            grad_b_dec = -(W_enc @ col_sums) if need_b_dec else None
        return None, grad_x, grad_w, grad_b_enc, grad_b_dec, None, None, None


def pick_pre_acts(
    pre: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, sel: Selection
) -> Tensor:
    """The selected pre-activations [nnz], differentiable w.r.t. x and the encoder parameters."""
    return _PickPreActs.apply(pre, x, W_enc, b_enc, b_dec, sel.rows, sel.cols, sel.crow)


def sparse_decode(sel: Selection, values: Tensor, W_dec: Tensor) -> Tensor:
    """Σ values · W_dec[cols] per row, [n_rows, d_in], without a dense latent tensor (no bias)."""
    return F.embedding_bag(
        sel.cols, W_dec, sel.crow, mode="sum", per_sample_weights=values, include_last_offset=True
    )


def sparse_latents(sel: Selection, values: Tensor) -> Tensor:
    """The selection as a detached, coalesced sparse COO tensor of shape [n_rows, n_latents]."""
    indices = torch.stack([sel.rows, sel.cols])
    return torch.sparse_coo_tensor(
        indices, values.detach(), sel.shape, is_coalesced=True, check_invariants=False
    )
