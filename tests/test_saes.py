"""SAE variants: planted-structure recovery, exact sparse gradients, threshold inference, folding."""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest
import torch
from pydantic import ValidationError

from sae_modules.saes import (
    SAE,
    BatchTopKSAE,
    SAEConfig,
    SAEConfigError,
    SAEInputError,
    build_sae,
    fire_counts,
    group_sizes_from_fractions,
    sparse_ops,
)
from sae_modules.saes.sparse_ops import batch_topk_selection, row_topk_indices, top_positive_selection

D_IN, N_TRUE, N_LATENTS, K_TRUE = 32, 48, 96, 3
TOPK_FAMILY = ["topk", "batchtopk", "matryoshka_batchtopk"]
ALL = ["relu", *TOPK_FAMILY]


def make_cfg(arch: str, **extra) -> SAEConfig:
    fields = {"architecture": arch, "d_in": D_IN, "n_latents": N_LATENTS}
    if arch in TOPK_FAMILY:
        fields["k"] = K_TRUE
    if arch == "matryoshka_batchtopk":
        fields["group_sizes"] = group_sizes_from_fractions(N_LATENTS, [0.25, 0.25, 0.5])
    if arch == "relu":
        fields["l1_coeff"] = 0.3
    return SAEConfig(**(fields | extra))


class PlantedData:
    """x = Σ_i c_i d_i over K_TRUE random atoms of one fixed unit dictionary, c_i ~ U(1, 2);
    `seed` picks the samples, never the dictionary."""

    def __init__(self, seed: int = 0) -> None:
        atoms = torch.randn(N_TRUE, D_IN, generator=torch.Generator().manual_seed(1234))
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int) -> torch.Tensor:
        idx = torch.rand(n, N_TRUE, generator=self.gen).argsort(dim=1)[:, :K_TRUE]
        coef = 1 + torch.rand(n, K_TRUE, generator=self.gen)
        codes = torch.zeros(n, N_TRUE).scatter_(1, idx, coef)
        return codes @ self.atoms


def train(sae: SAE, data: PlantedData, steps: int, batch: int = 256, lr: float = 1e-2) -> None:
    """The minimal loop the paper's trainers run: AuxK over dead latents, decoder kept unit-norm."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(sae.n_latents, dtype=torch.long)
    sae.train()
    for _ in range(steps):
        out = sae(data.batch(batch), dead_mask=since_fired > 4 * batch)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        since_fired += batch
        since_fired[fire_counts(out.latents) > 0] = 0
    sae.eval()


def fvu(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        recon = sae.decode(sae.encode(x))
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds contention on the shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread) -> dict[str, SAE]:
    saes = {}
    for i, arch in enumerate(ALL):
        torch.manual_seed(i)
        sae = build_sae(make_cfg(arch, threshold_decay=0.9))
        train(sae, PlantedData(seed=1), steps=300)
        saes[arch] = sae
    return saes


@pytest.mark.parametrize("arch", ALL)
def test_recovers_planted_dictionary(trained: dict[str, SAE], arch: str) -> None:
    sae, data = trained[arch], PlantedData(seed=1)
    assert fvu(sae, data.batch(2048)) < 0.1
    best_cos = (data.atoms @ sae.W_dec.detach().T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() >= 0.8, best_cos


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_threshold_inference_keeps_l0_near_k(trained: dict[str, SAE], arch: str) -> None:
    sae = trained[arch]
    assert sae.cfg.threshold is not None and sae.cfg.threshold > 0
    with torch.no_grad():
        l0 = (sae.encode(PlantedData(seed=2).batch(2048)) > 0).sum(-1).float().mean()
    assert abs(float(l0) - K_TRUE) <= 0.2 * K_TRUE


def dense_reference_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook dense computation of the same training loss, for autograd to differentiate."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    n_rows, n = pre.shape
    k = sae.cfg.k
    if sae.cfg.architecture == "topk":
        values, idx = pre.topk(k, dim=1)
        f = torch.zeros_like(pre).scatter(1, idx, values.relu())
    else:
        values, idx = pre.flatten().topk(k * n_rows)
        f = torch.zeros(n_rows * n).scatter(0, idx, values.relu()).view(n_rows, n)
    ends = [0, *torch.tensor(sae.cfg.group_sizes or [n]).cumsum(0).tolist()]
    recon, prefix = sae.b_dec.expand_as(x), []
    for a, b in itertools.pairwise(ends):
        recon = recon + f[:, a:b] @ sae.W_dec[a:b]
        prefix.append((x - recon).pow(2).sum(-1).mean())
    residual = (x - recon).detach()
    dead = dead & ~(f != 0).any(0)  # firing on this batch revives a latent before AuxK looks
    k_aux = min(sae.cfg.auxk_k or D_IN // 2, int(dead.sum()))
    aux_values, aux_idx = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=1)
    if not sae.cfg.auxk_trains_encoder:
        aux_values = aux_values.detach()
    aux = torch.zeros_like(pre).scatter(1, aux_idx, aux_values.relu())
    auxk = (residual - aux @ sae.W_dec).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(
        -1
    ).mean()
    n_groups = len(prefix)
    weighted = torch.stack(prefix).mean() / n_groups if n_groups > 1 else prefix[0]
    return weighted + sae.cfg.auxk_alpha * auxk, f


@pytest.mark.parametrize("trains_encoder", [True, False])  # the paper's AuxK / sparsify's (decoder only)
@pytest.mark.parametrize("dead_fraction", [0.1, 0.6])  # fewer / more dead latents than AuxK keeps
@pytest.mark.parametrize("auxk_k", [None, 2])  # 2: most rows hold more positive dead latents than AuxK keeps
@pytest.mark.parametrize("arch", TOPK_FAMILY)
def test_sparse_path_matches_dense_autograd(
    arch: str, dead_fraction: float, auxk_k: int | None, trains_encoder: bool
) -> None:
    torch.manual_seed(0)
    sae = build_sae(make_cfg(arch, auxk_k=auxk_k, auxk_trains_encoder=trains_encoder))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x, dead = torch.randn(40, D_IN), torch.rand(N_LATENTS) < dead_fraction
    out = sae(x, dead_mask=dead)
    still_dead = dead & (fire_counts(out.latents) == 0)
    assert 0 < int(still_dead.sum()) and (int(still_dead.sum()) > D_IN // 2) == (dead_fraction > 0.5)
    k_aux = min(auxk_k or D_IN // 2, int(still_dead.sum()))
    with torch.no_grad():
        positive_dead = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc > 0)[:, still_dead].sum(1)
    crowded = positive_dead > k_aux  # rows where AuxK's selection takes a top-k, not every positive
    assert bool(crowded.any()) == (auxk_k is not None or dead_fraction > 0.5)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
    sae.zero_grad()
    ref_loss, ref_f = dense_reference_loss(sae, x, dead)
    ref_loss.backward()
    assert torch.allclose(out.loss, ref_loss, rtol=1e-5)
    assert torch.equal(out.latents.to_dense(), ref_f.detach())
    for name, p in sae.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-5), name
    # Only AuxK reaches a dead latent's encoder column: trained by the paper's AuxK, untouched by sparsify's.
    assert bool(grads["W_enc"][:, still_dead].any()) == trains_encoder


def _skewed_rows(g: torch.Generator) -> torch.Tensor:
    pre = torch.randn(64, 3000, generator=g)
    pre[3] += 10  # one row owns most of the batch's top k * B
    return pre


def _large_only_where_sampled(g: torch.Generator) -> torch.Tensor:
    """The strided sample (every 5th entry at this size) sees only large values: its threshold
    estimate is far too high, so the selection must notice and retry."""
    pre = torch.randn(256, 2048, generator=g)
    assert sparse_ops._coprime_stride(pre.numel(), 2048) == 5
    pre.view(-1)[::5] += 10
    return pre


def _ties_past_first_chunk(g: torch.Generator) -> torch.Tensor:
    """A few entries above the boundary value 0, whose ties all lie after the first TIE_CHUNK entries."""
    pre = torch.zeros(64, 3000)
    pre[: sparse_ops.TIE_CHUNK // 3000 + 1] = -1
    pre[50, :100] = torch.rand(100, generator=g) + 1
    return pre


BATCH_TOPK_INPUTS = {
    "sample misled (retry)": _large_only_where_sampled,
    "gaussian": lambda g: torch.randn(64, 3000, generator=g),
    "one row dominates": _skewed_rows,
    "row norms vary 1000x": lambda g: torch.randn(64, 3000, generator=g) * torch.logspace(0, 3, 64)[:, None],
    "heavy tails": lambda g: torch.distributions.StudentT(1.2).sample((64, 3000)),
    "many ties": lambda g: torch.randint(0, 4, (64, 3000), generator=g).float(),
    "ties only past the first scan chunk": _ties_past_first_chunk,
    "bf16 (quantised: ties at the boundary)": lambda g: torch.randn(64, 3000, generator=g).bfloat16(),
    "all equal": lambda g: torch.zeros(64, 3000),
    "mature theta (mostly negative)": lambda g: torch.randn(64, 3000, generator=g) - 4,
    "tiny batch (sample is everything)": lambda g: torch.randn(3, 7, generator=g),
}


@pytest.mark.parametrize("name", list(BATCH_TOPK_INPUTS))
def test_batch_topk_selection_equals_flatten_and_topk(name: str) -> None:
    pre = BATCH_TOPK_INPUTS[name](torch.Generator().manual_seed(0))
    k = 5
    total = k * pre.shape[0]
    sel = batch_topk_selection(pre, k)
    got = torch.zeros_like(pre, dtype=torch.bool)
    got[sel.rows, sel.cols] = True
    assert sel.nnz == int(got.sum()) == total  # no duplicates, exactly k * B entries
    kth = pre.flatten().topk(total).values[-1]
    assert bool((pre[got] >= kth).all()) and bool((pre[~got] <= kth).all())  # a top set, ties aside
    if int((pre.flatten() == kth).sum()) == 1:  # no tie at the boundary: the very same set
        expected = torch.zeros(pre.numel(), dtype=torch.bool)
        expected[pre.flatten().topk(total).indices] = True
        assert torch.equal(got.flatten(), expected)
    flat_index = sel.rows * pre.shape[1] + sel.cols
    assert bool((flat_index[1:] > flat_index[:-1]).all())  # row-major, columns sorted in each row
    if name == "ties only past the first scan chunk":  # the early-stopping scan took the first ties
        tied = (pre.flatten() == kth).nonzero().squeeze(1)
        taken = flat_index[pre.flatten()[flat_index] == kth]
        assert tied[0] >= sparse_ops.TIE_CHUNK and torch.equal(taken, tied[: taken.numel()])
    assert torch.equal(sel.crow[1:] - sel.crow[:-1], got.sum(1))


ROW_TOPK_INPUTS = {
    **{name: make for name, make in BATCH_TOPK_INPUTS.items() if name != "tiny batch (sample is everything)"},
    "columns differ in scale": lambda g: (
        torch.randn(64, 3000, generator=g) * torch.rand(3000, generator=g) * 10
    ),
    "largest in the last columns": lambda g: torch.randn(64, 3000, generator=g) + torch.linspace(0, 20, 3000),
    "largest in one slab": lambda g: torch.randn(64, 3000, generator=g) + 20 * (torch.arange(3000) < 300),
    "-inf padding": lambda g: torch.where(torch.rand(64, 3000, generator=g) < 0.9, -torch.inf, 1.0),
}


@pytest.mark.parametrize("name", list(ROW_TOPK_INPUTS))
@pytest.mark.parametrize(("width", "k"), [(3000, 1), (3000, 40), (2999, 20), (2048, 128), (700, 100)])
def test_row_topk_indices_equals_torch_topk(name: str, width: int, k: int) -> None:
    """The grouped top-k (rows of 16k and more, some with columns left after the slabs) and the
    plain one below that: each row's k values are torch's, ties aside, with no column twice."""
    pre = ROW_TOPK_INPUTS[name](torch.Generator().manual_seed(2))[:, :width]
    got = row_topk_indices(pre, k)
    assert got.shape == (pre.shape[0], k)
    columns = got.sort(dim=1).values
    assert bool((columns[:, 1:] > columns[:, :-1]).all())  # no column twice
    expected = pre.topk(k, dim=1).values
    assert torch.equal(pre.gather(1, got).sort(dim=1, descending=True).values, expected)


@pytest.mark.parametrize("name", list(BATCH_TOPK_INPUTS))
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_positive_selection_equals_masked_topk(name: str, k: int) -> None:
    """Each row's k largest positive entries among the marked columns, as a masked per-row top-k
    keeping only positive values would pick them (ties aside)."""
    g = torch.Generator().manual_seed(1)
    pre = BATCH_TOPK_INPUTS[name](g)
    columns = torch.rand(pre.shape[1], generator=g) < 0.7
    sel = top_positive_selection(pre, k, columns.nonzero().squeeze(1))
    got = torch.zeros_like(pre, dtype=torch.bool)
    got[sel.rows, sel.cols] = True
    assert sel.nnz == int(got.sum())  # no duplicates
    masked = torch.where(columns, pre, -torch.inf)
    top = masked.topk(min(k, pre.shape[1]), dim=1)
    kth = top.values[:, -1:]
    expected_counts = (top.values > 0).sum(1)
    assert torch.equal(got.sum(1), expected_counts)
    assert bool(columns[sel.cols].all()) and bool((pre[got] > 0).all())
    assert bool(((masked >= kth) | ~got).all()) and bool(((masked <= kth) | got | (pre <= 0)).all())
    flat_index = sel.rows * pre.shape[1] + sel.cols
    assert bool((flat_index[1:] > flat_index[:-1]).all())  # row-major, columns sorted in each row
    assert torch.equal(sel.crow[1:] - sel.crow[:-1], got.sum(1))


@pytest.mark.parametrize("arch", ALL)
def test_fold_input_scale_takes_raw_activations(trained: dict[str, SAE], arch: str) -> None:
    scale = 7.5
    sae = trained[arch]
    folded = copy.deepcopy(sae)
    folded.fold_input_scale(scale)
    raw = PlantedData(seed=3).batch(64) * scale
    with torch.no_grad():
        assert torch.allclose(folded.encode(raw), sae.encode(raw / scale) * scale, rtol=1e-4, atol=1e-4)
        recon = folded.decode(folded.encode(raw))
        assert torch.allclose(recon, sae.decode(sae.encode(raw / scale)) * scale, rtol=1e-4, atol=1e-4)
    if sae.cfg.threshold is not None:
        assert folded.cfg.threshold == pytest.approx(sae.cfg.threshold * scale)


def test_threshold_travels_in_config_not_state_dict(trained: dict[str, SAE]) -> None:
    sae = trained["batchtopk"]
    assert set(sae.state_dict()) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    clone = build_sae(sae.cfg)
    clone.load_state_dict(sae.state_dict())
    clone.eval()
    x = PlantedData(seed=4).batch(32)
    with torch.no_grad():
        assert torch.equal(clone.encode(x), sae.encode(x))
    assert float(clone.threshold) == sae.cfg.threshold


def test_threshold_is_learned_only_when_training() -> None:
    torch.manual_seed(0)
    sae = build_sae(make_cfg("batchtopk"))
    assert isinstance(sae, BatchTopKSAE) and sae.cfg.threshold is None
    x = torch.randn(64, D_IN)
    sae(x)
    first = sae.cfg.threshold
    assert first is not None and first > 0
    sae.eval()
    out = sae(x)
    assert sae.cfg.threshold == first
    assert torch.equal(out.latents.to_dense(), sae.encode(x))


@pytest.mark.parametrize("arch", ["relu", "batchtopk", "matryoshka_batchtopk"])
def test_encode_subset_equals_full_encode(trained: dict[str, SAE], arch: str) -> None:
    sae = trained[arch]
    x = PlantedData(seed=5).batch(20).view(4, 5, D_IN)
    idx = torch.tensor([0, 7, 7, 50, N_LATENTS - 1])
    with torch.no_grad():
        assert torch.allclose(sae.encode_subset(x, idx), sae.encode(x)[..., idx], atol=1e-6)


def test_topk_is_not_elementwise() -> None:
    with pytest.raises(TypeError, match="not elementwise"):
        build_sae(make_cfg("topk")).encode_subset(torch.randn(2, D_IN), torch.tensor([0]))


def test_decoder_rows_stay_unit_norm() -> None:
    torch.manual_seed(0)
    sae = build_sae(make_cfg("topk"))
    opt = torch.optim.SGD(sae.parameters(), lr=1e-3)
    for _ in range(5):
        sae(torch.randn(64, D_IN)).loss.backward()
        sae.remove_parallel_decoder_grad()
        assert (sae.W_dec.grad * sae.W_dec.detach()).sum(1).abs().max() < 1e-5
        opt.step()
        opt.zero_grad()
        # Without the parallel part a small step moves the norm only to second order.
        assert (sae.W_dec.detach().norm(dim=1) - 1).abs().max() < 1e-4
        sae.normalize_decoder()
        assert torch.allclose(sae.W_dec.detach().norm(dim=1), torch.ones(N_LATENTS), atol=1e-6)


@pytest.mark.parametrize("arch", TOPK_FAMILY)
def test_copies_leave_the_step_buffers_behind(arch: str) -> None:
    """A deepcopy (the weights a signum run ships) or a pickle holds the weights and θ, not the
    batch-sized buffers of the training step."""
    sae = build_sae(make_cfg(arch))
    x = torch.randn(64, D_IN)
    sae(x, dead_mask=torch.ones(N_LATENTS, dtype=torch.bool))
    assert set(sae._workspaces) == {"pre", "marks", "auxk_block"}
    for clone in (copy.deepcopy(sae), pickle.loads(pickle.dumps(sae))):
        assert clone._workspaces == {}
        with torch.no_grad():
            assert torch.equal(clone.encode(x), sae.encode(x))


def test_forward_keeps_leading_shape_and_rejects_wrong_width() -> None:
    sae = build_sae(make_cfg("batchtopk"))
    out = sae(torch.randn(2, 3, D_IN))
    assert out.recon.shape == (2, 3, D_IN) and out.latents.shape == (6, N_LATENTS)
    with pytest.raises(SAEInputError, match="d_in=32"):
        sae(torch.randn(4, D_IN + 1))
    with pytest.raises(SAEInputError, match="dead_mask"):
        sae(torch.randn(4, D_IN), dead_mask=torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"architecture": "topk", "d_in": 4, "n_latents": 8}, "needs k"),
        ({"architecture": "topk", "d_in": 4, "n_latents": 8, "k": 9}, "k=9 exceeds n_latents=8"),
        (
            {
                "architecture": "matryoshka_batchtopk",
                "d_in": 4,
                "n_latents": 8,
                "k": 2,
                "group_sizes": [4, 3],
            },
            "sum",
        ),
        ({"architecture": "topk", "d_in": 4, "n_latents": 8, "k": 2, "group_sizes": [8]}, "group_sizes"),
        ({"architecture": "relu", "d_in": 0, "n_latents": 8}, "d_in"),
        ({"architecture": "relu", "d_in": 4, "n_latents": 8, "threshold_decay": 1.0}, "threshold_decay"),
        ({"architecture": "nope", "d_in": 4, "n_latents": 8}, "architecture"),
    ],
)
def test_config_errors_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SAEConfig(**fields)


def test_group_sizes_from_fractions() -> None:
    assert group_sizes_from_fractions(100, [0.1, 0.3, 0.6]) == [10, 30, 60]
    assert sum(group_sizes_from_fractions(1001, [1 / 3, 1 / 3, 1 / 3])) == 1001
    with pytest.raises(SAEConfigError, match="sum to 1"):
        group_sizes_from_fractions(100, [0.5, 0.4])
    with pytest.raises(SAEConfigError, match="empty group"):
        group_sizes_from_fractions(3, [0.1, 0.9])


def test_build_sae_rejects_unregistered_architecture() -> None:
    cfg = SAEConfig.model_construct(architecture="made_up", d_in=4, n_latents=8)
    with pytest.raises(SAEConfigError, match="made_up"):
        build_sae(cfg)
