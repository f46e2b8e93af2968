"""SAE training throughput and held-out FVU: our TopK family against a plain reference step and
EleutherAI sparsify's `SparseCoder`, on the same batches in the same process.

Data is synthetic with planted sparse structure (x = sparse codes over a random unit dictionary
plus noise), so FVU falls within a few steps. Every model starts from the same weights (W_enc =
W_dec^T, unit decoder rows, b_dec = mean of the first batch) and is stepped the way its trainer
steps it: Adam, AuxK over latents unfired for `dead_window` samples, decoder gradient made
orthogonal to the rows, rows renormalised. Steps run round-robin, one model after another on each
batch, so load from other processes lands on all models alike; throughput is activation vectors
per second of step time (the first step is a warm-up and not timed).

Held-out FVU uses each model's training-time selection (per-vector top-k, or batch top-k) so every
model uses exactly k latents per vector on average. Sizes: d_in 1024, 16,384 latents, k 20, batch
4096; `BENCH_SMALL=1` shrinks everything for a smoke run, `BENCH_STEPS` sets the timed steps,
`BENCH_DEVICE` the device.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sae_modules.metrics import ReconstructionMetrics
from sae_modules.saes import SAE, SAEConfig, build_sae, fire_counts, group_sizes_from_fractions

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
    lr: float = 1e-3

    @property
    def dead_window(self) -> int:
        """Short enough that AuxK is live (and timed) during the run."""
        return 2 * self.batch


FULL = BenchSize(d_in=1024, n_latents=16_384, k=20, batch=4096, steps=4, heldout_batches=2)
SMALL = BenchSize(d_in=32, n_latents=256, k=4, batch=128, steps=3, heldout_batches=2)


class PlantedData:
    """x = Σ c_i d_i over `k` random atoms of a fixed unit dictionary (c_i ~ U(0.5, 1.5)) + noise."""

    def __init__(self, size: BenchSize, device: torch.device, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.size, self.device = size, device
        self.n_atoms = size.n_latents // 2
        atoms = torch.randn(self.n_atoms, size.d_in, generator=self.gen)
        self.atoms = (atoms / atoms.norm(dim=1, keepdim=True)).to(device)

    def batch(self) -> Tensor:
        n, k = self.size.batch, self.size.k
        idx = torch.randint(0, self.n_atoms, (n, k), generator=self.gen).to(self.device)
        coef = (0.5 + torch.rand(n, k, generator=self.gen)).to(self.device)
        noise = 0.05 * torch.randn(n, self.size.d_in, generator=self.gen).to(self.device)
        return nn.functional.embedding_bag(idx, self.atoms, per_sample_weights=coef, mode="sum") + noise


class ReferenceSAE(nn.Module):
    """The textbook step: dense latents, dense decode, autograd through every op."""

    def __init__(self, init: SAE, architecture: str, k: int, group_sizes: list[int] | None) -> None:
        super().__init__()
        self.architecture, self.k = architecture, k
        self.group_ends = [0, *torch.tensor(group_sizes or [init.n_latents]).cumsum(0).tolist()]
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
        """(loss, reconstruction, latents)."""
        f = self.encode(x)
        recon, prefix = self.b_dec.expand_as(x), []
        for a, b in itertools.pairwise(self.group_ends):
            recon = recon + f[:, a:b] @ self.W_dec[a:b]
            prefix.append((x - recon).pow(2).sum(-1).mean())
        loss = torch.stack(prefix).mean()
        if bool(dead_mask.any()):
            residual = (x - recon).detach()
            pre = (x - self.b_dec) @ self.W_enc + self.b_enc
            k_aux = min(x.shape[1] // 2, int(dead_mask.sum()))
            values, idx = torch.where(dead_mask, pre, -torch.inf).topk(k_aux, dim=1)
            aux = torch.zeros_like(pre).scatter(1, idx, values.relu()) @ self.W_dec
            auxk = (residual - aux).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(
                -1
            ).mean()
            loss = loss + auxk / 32
        return loss, recon, f


@dataclass
class Runner:
    """One model being trained: its step, its held-out reconstruction, and its timings."""

    name: str
    model: nn.Module
    step_fn: Callable[[Tensor, Tensor], Tensor]
    recon_fn: Callable[[Tensor], tuple[Tensor, Tensor]]
    normalize: Callable[[], None]
    remove_parallel: Callable[[], None]
    lr: float
    n_latents: int
    window: int
    seconds: float = 0.0
    since_fired: Tensor | None = None
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    def step(self, x: Tensor) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
            self.since_fired = torch.zeros(self.n_latents, dtype=torch.long, device=x.device)
        dead = self.since_fired > self.window
        fired = self.step_fn(x, dead)
        self.remove_parallel()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.normalize()
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0


def ours(size: BenchSize, arch: str, init: SAE) -> Runner:
    sae = build_sae(init.cfg)
    sae.load_state_dict(init.state_dict())

    def step(x: Tensor, dead: Tensor) -> Tensor:
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        return fire_counts(out.latents) > 0

    @torch.no_grad()
    def recon(x: Tensor) -> tuple[Tensor, Tensor]:
        out = sae(x)
        return out.recon, out.latents

    return Runner(
        "ours",
        sae,
        step,
        recon,
        sae.normalize_decoder,
        sae.remove_parallel_decoder_grad,
        size.lr,
        size.n_latents,
        size.dead_window,
    )


def reference(size: BenchSize, arch: str, init: SAE) -> Runner:
    ref = ReferenceSAE(init, arch, size.k, init.cfg.group_sizes)

    def step(x: Tensor, dead: Tensor) -> Tensor:
        loss, _, f = ref(x, dead)
        loss.backward()
        return (f != 0).any(0)

    @torch.no_grad()
    def recon(x: Tensor) -> tuple[Tensor, Tensor]:
        _, x_hat, f = ref(x, torch.zeros(size.n_latents, dtype=torch.bool, device=x.device))
        return x_hat, f

    @torch.no_grad()
    def normalize() -> None:
        ref.W_dec /= ref.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def remove_parallel() -> None:
        ref.W_dec.grad -= (ref.W_dec.grad * ref.W_dec).sum(1, keepdim=True) * ref.W_dec

    return Runner(
        "reference", ref, step, recon, normalize, remove_parallel, size.lr, size.n_latents, size.dead_window
    )


def sparsify_topk(size: BenchSize, init: SAE) -> Runner:
    """sparsify's SparseCoder stepped as sparsify's Trainer steps it (loss_fn="fvu", auxk_alpha=1/32)."""
    if init.W_enc.device.type == "cpu":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs a GPU
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(
        size.d_in, SparseCoderConfig(num_latents=size.n_latents, k=size.k), device=init.W_enc.device
    )
    with torch.no_grad():
        coder.encoder.weight.copy_(init.W_enc.T)
        coder.encoder.bias.copy_(init.b_enc)
        coder.W_dec.copy_(init.W_dec)
        coder.b_dec.copy_(init.b_dec)

    def step(x: Tensor, dead: Tensor) -> Tensor:
        coder.set_decoder_norm_to_unit_norm()
        out = coder(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        fired = torch.zeros(size.n_latents, dtype=torch.bool, device=x.device)
        fired[out.latent_indices.flatten()] = True
        return fired

    @torch.no_grad()
    def recon(x: Tensor) -> tuple[Tensor, Tensor]:
        out = coder(x)
        f = torch.zeros(x.shape[0], size.n_latents, device=x.device).scatter_(
            1, out.latent_indices, out.latent_acts
        )
        return out.sae_out, f

    return Runner(
        "sparsify",
        coder,
        step,
        recon,
        lambda: None,
        coder.remove_gradient_parallel_to_decoder_directions,
        size.lr,
        size.n_latents,
        size.dead_window,
    )


def heldout_fvu(runner: Runner, heldout: list[Tensor]) -> float:
    """FVU with each model's training-time selection (eval of ours would use the young θ)."""
    metrics = ReconstructionMetrics(runner.n_latents)
    runner.model.train()
    if hasattr(runner.model, "learn_threshold"):
        runner.model.learn_threshold = False
    for x in heldout:
        x_hat, latents = runner.recon_fn(x)
        metrics.update(x, x_hat, latents)
    return metrics.compute()["fvu"]


def race(runners: list[Runner], batches: list[Tensor], device: torch.device) -> None:
    """Step every runner on every batch, rotating who goes first; the first batch is a warm-up."""
    for step, x in enumerate(batches):
        for runner in runners[step % len(runners) :] + runners[: step % len(runners)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            runner.step(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step > 0:
                runner.seconds += time.perf_counter() - start


def run(size: BenchSize, device: torch.device) -> list[dict[str, float | str]]:
    """One architecture at a time, raced against its dense reference and sparsify's TopK (the only
    kind sparsify trains) on the same batches; only one group's weights are alive at a time."""
    data = PlantedData(size, device)
    batches = [data.batch() for _ in range(size.steps + 1)]
    heldout = [data.batch() for _ in range(size.heldout_batches)]
    vectors = size.steps * size.batch
    rows: list[dict[str, float | str]] = []
    for i, arch in enumerate(ARCHITECTURES):
        torch.manual_seed(i)
        groups = (
            group_sizes_from_fractions(size.n_latents, MATRYOSHKA_FRACTIONS)
            if arch.startswith("matryoshka")
            else None
        )
        cfg = SAEConfig(
            architecture=arch,
            d_in=size.d_in,
            n_latents=size.n_latents,
            k=size.k,
            group_sizes=groups,
            dead_window=size.dead_window,
            threshold_decay=0.9,
        )
        init = build_sae(cfg).to(device)
        init.b_dec.data.copy_(batches[0].mean(0))
        mine, ref, sparsify = ours(size, arch, init), reference(size, arch, init), sparsify_topk(size, init)
        race([mine, ref, sparsify], batches, device)
        rows.append(
            {
                "architecture": arch,
                "ours_vps": vectors / mine.seconds,
                "reference_vps": vectors / ref.seconds,
                "sparsify_topk_vps": vectors / sparsify.seconds,
                "vs_reference": ref.seconds / mine.seconds,
                "vs_sparsify": sparsify.seconds / mine.seconds,
                "fvu_ours": heldout_fvu(mine, heldout),
                "fvu_reference": heldout_fvu(ref, heldout),
                "fvu_sparsify_topk": heldout_fvu(sparsify, heldout),
            }
        )
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, float | str]]) -> str:
    head = (
        "| architecture | ours (vec/s) | reference (vec/s) | sparsify TopK (vec/s) | × reference | × sparsify "
        "| FVU ours | FVU reference | FVU sparsify TopK |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['architecture']} | {r['ours_vps']:,.0f} | {r['reference_vps']:,.0f} | {r['sparsify_topk_vps']:,.0f} "
        f"| {r['vs_reference']:.2f}× | {r['vs_sparsify']:.2f}× | {r['fvu_ours']:.4f} | {r['fvu_reference']:.4f} "
        f"| {r['fvu_sparsify_topk']:.4f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def main() -> None:
    size = SMALL if os.environ.get("BENCH_SMALL") == "1" else FULL
    if steps := os.environ.get("BENCH_STEPS"):
        size = BenchSize(**{**size.__dict__, "steps": int(steps)})
    device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
    print(
        f"SAE training on {device} ({torch.get_num_threads()} threads), synthetic planted data: d_in={size.d_in}, "
        f"n_latents={size.n_latents}, k={size.k}, batch={size.batch}, {size.steps} timed steps, Adam lr={size.lr}",
        flush=True,
    )
    print(markdown(run(size, device)))


if __name__ == "__main__":
    main()
