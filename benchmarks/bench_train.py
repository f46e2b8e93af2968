"""SAE training: our TopK / BatchTopK / Matryoshka steps against EleutherAI sparsify's TopK step and
a dense reference of our update, on the same batches, in one process, on four data distributions.

Distributions (`DISTRIBUTIONS`):
- `planted`: x = Σ c_i d_i over k random atoms of a fixed unit dictionary, c_i ~ U(0.5, 1.5), + noise.
- `planted-exp`: the same with c_i ~ Exp(1) and each row scaled by 10^U(0,1) (norms vary tenfold), so
  pre-activations are spread unevenly over rows (what made the old batch selection slow).
- `student-t`: dense heavy-tailed data, every coordinate Student-t with 3 degrees of freedom.
- `demo-tower`: real activations of the shipped demo CLIP tower (block -2, every token of shapes-world
  images, extracted with `sae_modules.activations`); batches drawn from a 90 % training pool, the rest
  held out.

Runners, all from the same initial weights (W_enc = W_dec^T, unit decoder rows, b_dec = mean of the
first batch), each stepped as its trainer steps it (AuxK over latents unfired for `dead_window`
samples, decoder gradient made orthogonal to the rows, rows renormalised, constant learning rate,
no clipping): ours (`adam` and `signum`) for each architecture; sparsify's `SparseCoder` TopK with its
default optimizer (sign-SGD under schedule-free, lr 5e-3/√(n/2^14)) and with Adam (lr 2e-4/√(n/2^14),
ours' default too); and the dense reference of our Adam step per architecture (autograd through a
dense latent tensor). Steps go round-robin on each batch, rotating who goes first, so load from
other processes lands on all alike; vectors/s counts step time only (step 0 is a warm-up).

Held-out FVU after the same number of steps uses each model's training-time selection (per-vector
top-k, or batch top-k) and, for schedule-free runners, the averaged weights they would ship.
Every runner gets the same batches, divided by √mean‖x‖² of the first ones as the trainer divides
them. `BENCH_SIZE=smoke|small|default` picks the sizes, `BENCH_STEPS` overrides the steps,
`BENCH_DEAD_BATCHES` the batches a latent must go unfired to count as dead (a huge value turns AuxK off),
`BENCH_FVU_SPREAD=1` two more signum TopK runners (sparsify from weights nudged by a few ulps: the noise
floor of the FVU comparison; ours with sparsify's decoder-only AuxK),
`BENCH_DEVICE` the device, `BENCH_DISTRIBUTIONS` a comma-separated subset, `BENCH_SEED` the data and
initial weights, each drawn from its own stream (`stream_seed`); runs over several seeds give the range.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from sae_modules.metrics import ReconstructionMetrics
from sae_modules.saes import SAE, SAEConfig, build_sae, fire_counts, group_sizes_from_fractions
from sae_modules.train.config import BASE_LR
from sae_modules.train.optim import inference_weights, make_optimizer
from sae_modules.train.trainer import estimate_input_scale

ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk")
MATRYOSHKA_FRACTIONS = [1 / 16, 3 / 16, 1 / 4, 1 / 2]


@dataclass(frozen=True)
class BenchSize:
    d_in: int
    n_latents: int
    k: int
    batch: int
    steps: int
    heldout_batches: int
    tower_images: int = 400
    dead_batches: int = 4

    @property
    def dead_window(self) -> int:
        """Short enough (by default) that AuxK is live (and timed) during the run."""
        return self.dead_batches * self.batch

    def lr(self, optimizer: str) -> float:
        return BASE_LR[optimizer] / math.sqrt(self.n_latents / 2**14)


SIZES = {
    "default": BenchSize(d_in=256, n_latents=4096, k=20, batch=1024, steps=150, heldout_batches=4),
    "small": BenchSize(d_in=64, n_latents=1024, k=8, batch=256, steps=60, heldout_batches=2),
    "smoke": BenchSize(d_in=16, n_latents=64, k=2, batch=32, steps=3, heldout_batches=1, tower_images=8),
}


class Source:
    """Batches of one distribution: `batch()` for training, `heldout()` for the final FVU."""

    d_in: int

    def batch(self) -> Tensor:
        raise NotImplementedError

    def heldout(self, n_batches: int) -> list[Tensor]:
        return [self.batch() for _ in range(n_batches)]


class Planted(Source):
    """Sparse codes over a fixed unit dictionary of n_latents / 2 atoms, plus noise."""

    def __init__(self, size: BenchSize, exp_coefficients: bool, seed: int = 0) -> None:
        self.size, self.d_in, self.exp = size, size.d_in, exp_coefficients
        self.gen = torch.Generator().manual_seed(seed)
        self.n_atoms = size.n_latents // 2
        atoms = torch.randn(self.n_atoms, size.d_in, generator=self.gen)
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)

    def batch(self) -> Tensor:
        n, k = self.size.batch, self.size.k
        idx = torch.randint(0, self.n_atoms, (n, k), generator=self.gen)
        if self.exp:
            coef = torch.empty(n, k).exponential_(generator=self.gen)
        else:
            coef = 0.5 + torch.rand(n, k, generator=self.gen)
        x = nn.functional.embedding_bag(idx, self.atoms, per_sample_weights=coef, mode="sum")
        x = x + 0.05 * torch.randn(n, self.d_in, generator=self.gen)
        if self.exp:
            x = x * 10 ** torch.rand(n, 1, generator=self.gen)
        return x


class StudentT(Source):
    """Dense i.i.d. heavy-tailed coordinates: Student-t with 3 degrees of freedom, z / sqrt(chi2_3 / 3)."""

    def __init__(self, size: BenchSize, seed: int = 0) -> None:
        self.size, self.d_in = size, size.d_in
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self) -> Tensor:
        shape = (self.size.batch, self.d_in)
        z = torch.randn(shape, generator=self.gen)
        chi2 = torch.randn((3, *shape), generator=self.gen).pow(2).sum(0)
        return z / (chi2 / 3).sqrt()


class DemoTower(Source):
    """Every token of block -2 of the shipped demo CLIP tower on freshly drawn shapes-world images."""

    def __init__(self, size: BenchSize, seed: int = 0) -> None:
        from sae_modules.activations.extract import ExtractionPlan, run_extraction
        from sae_modules.activations.images import FolderImages
        from sae_modules.activations.shards import load_shard, read_manifest
        from sae_modules.activations.tokens import TokenSelection
        from sae_modules.activations.towers import load_tower
        from sae_modules.shapes.world import write_folder

        model = Path(__file__).parents[1] / "sae_modules" / "shapes" / "assets" / "model"
        with tempfile.TemporaryDirectory() as tmp:
            images, shards = Path(tmp) / "images", Path(tmp) / "acts"
            write_folder(images, size.tower_images, seed=f"bench-train-{seed}")
            plan = ExtractionPlan(
                model=str(model), layer=-2, tokens=TokenSelection.parse("all"), batch_size=64
            )
            run_extraction(
                load_tower(str(model), device="cpu"), FolderImages(images), shards, plan, progress=False
            )
            manifest = read_manifest(shards)
            acts = torch.cat([load_shard(shards, e)["activations"].float() for e in manifest.shards])
        self.size, self.d_in = size, acts.shape[1]
        self.gen = torch.Generator().manual_seed(seed)
        acts = acts[torch.randperm(len(acts), generator=self.gen)]
        cut = int(0.9 * len(acts))
        self.pool, self.held = acts[:cut], acts[cut:]

    def batch(self) -> Tensor:
        return self.pool[torch.randint(0, len(self.pool), (self.size.batch,), generator=self.gen)]

    def heldout(self, n_batches: int) -> list[Tensor]:
        return list(self.held.split(self.size.batch))[: max(n_batches, 1)]


class Normalised(Source):
    """Another source's batches divided by √mean‖x‖² of its first batches, as the trainer feeds
    its SAE (`estimate_input_scale`), so every distribution reaches the runners at one scale."""

    def __init__(self, inner: Source, scale_batches: int = 8) -> None:
        self.inner, self.d_in = inner, inner.d_in
        self.scale = estimate_input_scale(iter(inner.batch, None), scale_batches)

    def batch(self) -> Tensor:
        return self.inner.batch() / self.scale

    def heldout(self, n_batches: int) -> list[Tensor]:
        return [x / self.scale for x in self.inner.heldout(n_batches)]


DISTRIBUTIONS: dict[str, Callable[[BenchSize, int], Source]] = {
    "planted": lambda size, seed: Planted(size, exp_coefficients=False, seed=seed),
    "planted-exp": lambda size, seed: Planted(size, exp_coefficients=True, seed=seed),
    "student-t": StudentT,
    "demo-tower": DemoTower,
}


class DenseReference(nn.Module):
    """The textbook step of our loss: dense latents, dense decode, autograd through every op."""

    def __init__(self, init: SAE) -> None:
        super().__init__()
        self.architecture, self.k = init.cfg.architecture, init.cfg.k
        self.auxk_alpha = init.cfg.auxk_alpha
        sizes = init.cfg.group_sizes or [init.n_latents]
        self.group_ends = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            setattr(self, name, nn.Parameter(getattr(init, name).detach().clone()))

    def encode(self, x: Tensor) -> Tensor:
        pre = torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)
        if self.architecture == "topk":
            values, idx = pre.topk(self.k, dim=1)
            return torch.zeros_like(pre).scatter(1, idx, values)
        values, idx = pre.flatten().topk(self.k * x.shape[0])
        return torch.zeros_like(pre).flatten().scatter(0, idx, values).view_as(pre)

    def forward(self, x: Tensor, dead_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, reconstruction, latents); dead latents that fire on this batch are not dead."""
        f = self.encode(x)
        recon, prefix = self.b_dec.expand_as(x), []
        for a, b in itertools.pairwise(self.group_ends):
            recon = recon + f[:, a:b] @ self.W_dec[a:b]
            prefix.append((x - recon).pow(2).sum(-1).mean())
        loss = torch.stack(prefix).mean() / len(prefix)
        dead = dead_mask & ~(f != 0).any(0)
        if bool(dead.any()):
            residual = (x - recon).detach()
            pre = (x - self.b_dec) @ self.W_enc + self.b_enc
            values, idx = torch.where(dead, pre, -torch.inf).topk(
                min(x.shape[1] // 2, int(dead.sum())), dim=1
            )
            aux = torch.zeros_like(pre).scatter(1, idx, values.relu()) @ self.W_dec
            auxk = (residual - aux).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(
                -1
            ).mean()
            loss = loss + self.auxk_alpha * auxk.nan_to_num(0.0)
        return loss, recon, f


@dataclass
class Runner:
    """One model being trained: its step, its held-out reconstruction, and its timings."""

    name: str
    model: nn.Module
    optimizer: object
    step_fn: Callable[[Tensor, Tensor], Tensor]
    recon_fn: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]
    normalize: Callable[[], None]
    remove_parallel: Callable[[], None]
    eval_model: Callable[[], nn.Module]
    window: int
    since_fired: Tensor
    seconds: float = 0.0

    def step(self, x: Tensor) -> None:
        fired = self.step_fn(x, self.since_fired + x.shape[0] >= self.window)
        self.remove_parallel()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.normalize()
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0


def ours(size: BenchSize, init: SAE, optimizer: str, auxk_trains_encoder: bool = True) -> Runner:
    sae = build_sae(init.cfg.model_copy(update={"auxk_trains_encoder": auxk_trains_encoder}))
    sae.load_state_dict(init.state_dict())
    opt = make_optimizer(optimizer, sae, size.lr(optimizer))

    def step(x: Tensor, dead: Tensor) -> Tensor:
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        return fire_counts(out.latents) > 0

    @torch.no_grad()
    def recon(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        out = model(x)
        return out.recon, out.latents

    return Runner(
        f"ours {optimizer}" if auxk_trains_encoder else f"ours decoder-only-AuxK {optimizer}",
        sae,
        opt,
        step,
        recon,
        sae.normalize_decoder,
        sae.remove_parallel_decoder_grad,
        lambda: inference_weights(sae, opt),
        size.dead_window,
        torch.zeros(size.n_latents, dtype=torch.long, device=init.W_enc.device),
    )


def dense_reference(size: BenchSize, init: SAE) -> Runner:
    ref = DenseReference(init)
    opt = make_optimizer("adam", ref, size.lr("adam"))

    def step(x: Tensor, dead: Tensor) -> Tensor:
        loss, _, f = ref(x, dead)
        loss.backward()
        return (f != 0).any(0)

    @torch.no_grad()
    def recon(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        _, x_hat, f = model(x, torch.zeros(size.n_latents, dtype=torch.bool, device=x.device))
        return x_hat, f

    @torch.no_grad()
    def normalize() -> None:
        ref.W_dec /= ref.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def remove_parallel() -> None:
        ref.W_dec.grad -= (ref.W_dec.grad * ref.W_dec).sum(1, keepdim=True) * ref.W_dec

    return Runner(
        "dense reference adam",
        ref,
        opt,
        step,
        recon,
        normalize,
        remove_parallel,
        lambda: ref,
        size.dead_window,
        torch.zeros(size.n_latents, dtype=torch.long, device=init.W_enc.device),
    )


def sparsify_topk(size: BenchSize, init: SAE, optimizer: str, label: str = "sparsify TopK") -> Runner:
    """sparsify's SparseCoder stepped as sparsify's Trainer steps it (loss_fn="fvu", auxk_alpha=1/32),
    with its default optimizer (`signum`: its SignSGD under ScheduleFreeWrapper, momentum 0.95) or Adam."""
    if init.W_enc.device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    coder = SparseCoder(
        init.d_in, SparseCoderConfig(num_latents=size.n_latents, k=size.k), device=init.W_enc.device
    )
    with torch.no_grad():
        coder.encoder.weight.copy_(init.W_enc.T)
        coder.encoder.bias.copy_(init.b_enc)
        coder.W_dec.copy_(init.W_dec)
        coder.b_dec.copy_(init.b_dec)
    if optimizer == "signum":
        opt = ScheduleFreeWrapper(SignSGD(coder.parameters(), lr=size.lr("signum")), momentum=0.95)
        opt.train()
    else:
        opt = torch.optim.Adam(coder.parameters(), lr=size.lr("adam"))

    def step(x: Tensor, dead: Tensor) -> Tensor:
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        fired = torch.zeros(size.n_latents, dtype=torch.bool, device=x.device)
        fired[out.latent_indices.flatten()] = True
        return fired

    @torch.no_grad()
    def recon(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        out = model(x)
        f = torch.zeros(x.shape[0], size.n_latents, device=x.device).scatter_(
            1, out.latent_indices, out.latent_acts
        )
        return out.sae_out, f

    return Runner(
        f"{label} {optimizer}",
        coder,
        opt,
        step,
        recon,
        lambda: None,
        coder.remove_gradient_parallel_to_decoder_directions,
        lambda: inference_weights(coder, opt),
        size.dead_window,
        torch.zeros(size.n_latents, dtype=torch.long, device=init.W_enc.device),
    )


def nudged(init: SAE, seed: int) -> SAE:
    """`init` with W_enc and W_dec multiplied by 1 + 1e-6·N(0, 1), a few float32 ulps: a run from it
    differs from one from `init` by rounding alone, which sign-SGD amplifies; their FVU gap is the
    noise floor of any comparison of two implementations of the same update."""
    copy = build_sae(init.cfg).to(init.W_enc.device)
    copy.load_state_dict(init.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (copy.W_enc, copy.W_dec):
            weight.mul_(1 + 1e-6 * torch.randn(weight.shape, generator=gen).to(weight.device))
    return copy


def heldout_fvu(runner: Runner, heldout: list[Tensor]) -> float:
    """FVU with each model's training-time selection (eval of ours would use the young θ)."""
    metrics = ReconstructionMetrics(runner.model.W_dec.shape[0])
    model = runner.eval_model()
    model.train()
    if hasattr(model, "learn_threshold"):
        model.learn_threshold = False
    for x in heldout:
        x_hat, latents = runner.recon_fn(model, x)
        metrics.update(x, x_hat, latents)
    return metrics.compute()["fvu"]


def race(runners: list[Runner], source: Source, steps: int, device: torch.device) -> None:
    """Step every runner on every batch, rotating who goes first; step 0 is a warm-up."""
    for step in range(steps + 1):
        x = source.batch().to(device)
        for runner in runners[step % len(runners) :] + runners[: step % len(runners)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            runner.step(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > 0:
                runner.seconds += time.perf_counter() - start


def stream_seed(seed: int, stream: str) -> int:
    """The seed of one random stream of a run (the data, one group's initial weights, the nudge).
    Streams seeded from `seed` by plain arithmetic can coincide: the TopK group's initial decoder
    was once drawn from the planted data's own generator state at seed 0, so it started on the
    true atoms."""
    return int.from_bytes(hashlib.blake2b(f"{stream}/{seed}".encode(), digest_size=8).digest()) >> 1


def initial_sae(size: BenchSize, arch: str, seed: int, first_batch: Tensor) -> SAE:
    """The weights every runner of one architecture group starts from: the trainer's init from the
    group's own stream, b_dec = the mean of the first batch."""
    torch.manual_seed(stream_seed(seed, f"init/{arch}"))
    groups = (
        group_sizes_from_fractions(size.n_latents, MATRYOSHKA_FRACTIONS)
        if arch.startswith("matryoshka")
        else None
    )
    cfg = SAEConfig(architecture=arch, d_in=size.d_in, n_latents=size.n_latents, k=size.k, group_sizes=groups)
    init = build_sae(cfg).to(first_batch.device)
    init.b_dec.data.copy_(first_batch.mean(0))
    return init


def run_distribution(
    name: str, size: BenchSize, device: torch.device, seed: int = 0, spread: bool = False
) -> list[dict[str, float | str]]:
    """Every runner on one distribution; one architecture group's weights alive at a time, each
    group raced with both sparsify runners so every ratio comes from the same batches and load.
    `seed` picks the data and the initial weights. `spread` adds two signum runners to the TopK
    group: sparsify from a `nudged` start, and ours with sparsify's decoder-only AuxK."""
    source = Normalised(DISTRIBUTIONS[name](size, stream_seed(seed, "data")))
    size = replace(size, d_in=source.d_in)
    heldout = [x.to(device) for x in source.heldout(size.heldout_batches)]
    vectors = size.steps * size.batch
    rows: list[dict[str, float | str]] = []
    for arch in ARCHITECTURES:
        init = initial_sae(size, arch, seed, source.batch().to(device))
        runners = [
            ours(size, init, "adam"),
            ours(size, init, "signum"),
            dense_reference(size, init),
            sparsify_topk(size, init, "signum"),
            sparsify_topk(size, init, "adam"),
        ]
        if spread and arch == "topk":
            runners += [
                ours(size, init, "signum", auxk_trains_encoder=False),
                sparsify_topk(
                    size, nudged(init, stream_seed(seed, "nudge")), "signum", label="sparsify TopK nudged"
                ),
            ]
        race(runners, source, size.steps, device)
        sparsify_seconds = {
            opt: r.seconds for r in runners for opt in ("signum", "adam") if r.name == f"sparsify TopK {opt}"
        }
        group_start = len(rows)
        for runner in runners:
            if runner.name.startswith("sparsify") and arch != "topk":
                continue  # sparsify only trains TopK; its rows appear once per distribution
            rows.append(
                {
                    "distribution": name,
                    "architecture": "topk" if runner.name.startswith("sparsify") else arch,
                    "runner": runner.name,
                    "vectors_per_s": vectors / runner.seconds,
                    "vs_sparsify": sparsify_seconds["signum"] / runner.seconds,
                    "vs_sparsify_same_optimizer": sparsify_seconds[runner.name.split()[-1]] / runner.seconds,
                    "fvu": heldout_fvu(runner, heldout),
                }
            )
        print(markdown(rows[group_start:]), flush=True)
    return rows


#: Pre-activation matrices for the selection race: what training throws at the batch top-k.
SELECTION_INPUTS: dict[str, Callable[[int, int, torch.Generator], Tensor]] = {
    "gaussian": lambda b, n, g: torch.randn(b, n, generator=g),
    "8 rows dominate": lambda b, n, g: torch.randn(b, n, generator=g) + 6 * (torch.arange(b) < 8)[:, None],
    "row norms 1-1000x": lambda b, n, g: torch.randn(b, n, generator=g) * torch.logspace(0, 3, b)[:, None],
    "heavy tails (t, 1.5 dof)": lambda b, n, g: (
        torch.randn(b, n, generator=g)
        / (torch.randn(b, n, generator=g).pow(2) + torch.randn(b, n, generator=g).pow(2)).div(2).pow(0.75)
    ),
    "mature θ (mostly < 0)": lambda b, n, g: torch.randn(b, n, generator=g) - 4,
    "many ties (5 values)": lambda b, n, g: torch.randint(0, 5, (b, n), generator=g).float(),
    "bf16 (ties at the boundary)": lambda b, n, g: torch.randn(b, n, generator=g).bfloat16(),
}


def selection_race(size: BenchSize, repeats: int = 5) -> list[dict[str, float | str]]:
    """Batch top-k selection time over per-row top-k time on the same matrix, interleaved; median ratio."""
    from sae_modules.saes.sparse_ops import batch_topk_selection, topk_selection

    g = torch.Generator().manual_seed(0)
    rows = []
    for name, make in SELECTION_INPUTS.items():
        pre = make(size.batch, size.n_latents, g).contiguous()
        mask = torch.empty(pre.numel(), dtype=torch.bool)
        ratios = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            topk_selection(pre, size.k)
            per_row = time.perf_counter() - start
            start = time.perf_counter()
            batch_topk_selection(pre, size.k, mask_out=mask)
            ratios.append((time.perf_counter() - start) / per_row)
        ratios = sorted(ratios[1:])
        rows.append({"input": name, "median": ratios[len(ratios) // 2], "low": ratios[0], "high": ratios[-1]})
    return rows


def auxk_cost(size: BenchSize, repeats: int = 6) -> list[dict[str, float | str]]:
    """A TopK training step (forward + backward) with AuxK over the same step without it, interleaved;
    median of CPU times. The dead latents have either no positive pre-activation (b_enc pushed far
    down: what training produces) or half of them positive (encoder columns shrunk so they never win
    a top-k: rows hold more than k_aux candidates, the worst case for AuxK's selection)."""
    rows = []
    for kind in ("none positive", "half positive"):
        for fraction in (0.02, 0.25, 0.5, 0.85):
            torch.manual_seed(0)
            sae = build_sae(
                SAEConfig(architecture="topk", d_in=size.d_in, n_latents=size.n_latents, k=size.k)
            )
            n_dead = int(fraction * size.n_latents)
            with torch.no_grad():
                if kind == "none positive":
                    sae.b_enc[:n_dead] = -5.0
                else:
                    sae.W_enc[:, :n_dead] *= 0.25
            x = torch.randn(size.batch, size.d_in) / math.sqrt(size.d_in)
            dead = torch.arange(size.n_latents) < n_dead
            times: dict[bool, list[float]] = {True: [], False: []}
            for i in range(repeats + 1):
                for with_auxk in (True, False) if i % 2 else (False, True):
                    start = time.process_time()
                    sae(x, dead_mask=dead if with_auxk else None).loss.backward()
                    times[with_auxk].append(time.process_time() - start)
                    sae.zero_grad()
            median = {s: sorted(t[1:])[len(t[1:]) // 2] for s, t in times.items()}
            rows.append({"kind": kind, "dead": n_dead, "cost": median[True] / median[False]})
    return rows


#: Dead blocks for the grouped top-k race: (dead latents, k_aux), every one long enough for the grouped path.
ROW_TOPK_SHAPES = [(1024, 32), (2048, 32), (3481, 32), (2048, 128), (3481, 128)]
ROW_TOPK_INPUTS: dict[str, Callable[[int, int, torch.Generator], Tensor]] = {
    "gaussian": lambda b, n, g: torch.randn(b, n, generator=g),
    "columns differ in scale": lambda b, n, g: (
        torch.randn(b, n, generator=g) * 10 * torch.rand(n, generator=g)
    ),
    "largest in the last columns": lambda b, n, g: torch.randn(b, n, generator=g) + torch.linspace(0, 10, n),
    "heavy tails (t, 1.5 dof)": SELECTION_INPUTS["heavy tails (t, 1.5 dof)"],
    "many ties (5 values)": SELECTION_INPUTS["many ties (5 values)"],
}


def row_topk_race(size: BenchSize, repeats: int = 5) -> list[dict[str, float | str]]:
    """`row_topk_indices` (AuxK's top-k over a dead block with many positive entries) over torch's
    per-row top-k on the same block, interleaved; per shape, the median ratio of each input and
    their range."""
    from sae_modules.saes.sparse_ops import row_topk_indices

    g = torch.Generator().manual_seed(0)
    rows = []
    for m, k in ROW_TOPK_SHAPES:
        medians = []
        for make in ROW_TOPK_INPUTS.values():
            block = make(size.batch, m, g).contiguous()
            ratios = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                block.topk(k, dim=1, sorted=False)
                plain = time.perf_counter() - start
                start = time.perf_counter()
                row_topk_indices(block, k)
                ratios.append((time.perf_counter() - start) / plain)
            medians.append(sorted(ratios[1:])[repeats // 2])
        rows.append({"m": m, "k": k, "low": min(medians), "high": max(medians)})
    return rows


def markdown(rows: list[dict[str, float | str]]) -> str:
    head = (
        "| distribution | architecture | runner | vectors/s | × sparsify TopK (signum) "
        "| × sparsify TopK (same optimizer) | held-out FVU |\n"
        "|---|---|---|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['distribution']} | {r['architecture']} | {r['runner']} | {r['vectors_per_s']:,.0f} "
        f"| {r['vs_sparsify']:.2f}× | {r['vs_sparsify_same_optimizer']:.2f}× | {r['fvu']:.4f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    size = SIZES[os.environ.get("BENCH_SIZE", "default")]
    if steps := os.environ.get("BENCH_STEPS"):
        size = replace(size, steps=int(steps))
    if dead_batches := os.environ.get("BENCH_DEAD_BATCHES"):
        size = replace(size, dead_batches=int(dead_batches))
    device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    names = os.environ.get("BENCH_DISTRIBUTIONS", ",".join(DISTRIBUTIONS)).split(",")
    seed = int(os.environ.get("BENCH_SEED", "0"))
    print(
        f"SAE training on {device} ({torch.get_num_threads()} threads): d_in={size.d_in} (demo-tower: the tower's), "
        f"n_latents={size.n_latents}, k={size.k}, batch={size.batch}, {size.steps} timed steps, constant LR "
        f"(adam {size.lr('adam'):.2e}, signum {size.lr('signum'):.2e}), "
        f"inputs scaled to mean ‖x‖² = 1, dead after {size.dead_batches} unfired batches, seed {seed}",
        flush=True,
    )
    print(f"batch top-k selection / per-row top-k, [{size.batch}, {size.n_latents}], k={size.k}")
    print("| pre-activations | median | range |\n|---|---:|---:|")
    for r in selection_race(size):
        print(f"| {r['input']} | {r['median']:.2f}× | {r['low']:.2f}–{r['high']:.2f}× |", flush=True)
    print(
        f"per-row top-k through group maxima / torch's top-k, {size.batch} rows, {len(ROW_TOPK_INPUTS)} inputs"
    )
    print("| dead latents | k_aux | median per input, range |\n|---:|---:|---:|")
    for r in row_topk_race(size):
        print(f"| {r['m']:,} | {r['k']} | {r['low']:.2f}–{r['high']:.2f}× |", flush=True)
    print(f"TopK step with AuxK / without, d_in={size.d_in}")
    print("| dead latents | their pre-activations | time |\n|---:|---|---:|")
    for r in auxk_cost(size):
        print(f"| {r['dead']:,} | {r['kind']} | {r['cost']:.2f}× |", flush=True)
    spread = os.environ.get("BENCH_FVU_SPREAD") == "1"
    rows = [row for name in names if name for row in run_distribution(name, size, device, seed, spread)]
    print(markdown(rows))


if __name__ == "__main__":
    main()
