"""The paper's recipe, step for step: `vlm-steer train` against the reference trainers' update
(dictionary_learning's BatchTopKTrainer / MatryoshkaBatchTopKTrainer.update), re-derived here from
their equations with dense tensors and autograd, on the same batches from the same initial weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from train_fixtures import sparse_activations, write_shards

from sae_modules.saes import build_sae
from sae_modules.train import TrainConfig, train_sae
from sae_modules.train.data import ShardReader, ShardStream
from sae_modules.train.state import latest_checkpoint, load_checkpoint
from sae_modules.train.trainer import plan_run

STEPS, BATCH, WARMUP, DECAY_STEPS, THETA_START, WINDOW = 14, 64, 4, 5, 3, 3 * 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("shards")
    write_shards(directory, sparse_activations(6 * 256, seed=3), shard_size=256)
    return directory


def reference_lr_factor(step: int) -> float:
    """dictionary_learning's get_lr_schedule(total, warmup, decay_start) as LambdaLR applies it."""
    decay_start = STEPS - DECAY_STEPS
    if step < WARMUP:
        return step / WARMUP
    if step >= decay_start:
        return (STEPS - step) / (STEPS - decay_start)
    return 1.0


def weiszfeld(points: torch.Tensor) -> torch.Tensor:
    guess = points.mean(0)
    for _ in range(100):
        previous = guess
        w = 1 / (points - guess).norm(dim=1)
        guess = (w / w.sum()) @ points
        if (guess - previous).norm() < 1e-5:
            break
    return guess


class ReferenceTrainer:
    """BatchTopK / Matryoshka BatchTopK training as the reference writes it, dense."""

    def __init__(self, init: dict[str, torch.Tensor], k: int, group_sizes: list[int], peak_lr: float) -> None:
        self.p = {name: t.clone().requires_grad_(True) for name, t in init.items()}
        self.k, self.group_sizes, self.peak_lr = k, group_sizes, peak_lr
        self.opt = torch.optim.Adam(list(self.p.values()), lr=peak_lr, betas=(0.9, 0.999))
        self.threshold = -1.0
        self.since_fired = torch.zeros(init["W_dec"].shape[0], dtype=torch.long)
        self.lrs: list[float] = []

    def update(self, step: int, x: torch.Tensor) -> None:
        p = self.p
        if step == 0:
            with torch.no_grad():
                p["b_dec"].copy_(weiszfeld(x))
        post = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
        top = post.flatten().topk(self.k * x.shape[0], sorted=False)
        f = torch.zeros_like(post.flatten()).scatter(0, top.indices, top.values).view_as(post)
        if step > THETA_START:
            active = f[f > 0].detach()
            low = float(active.min()) if active.numel() else 0.0
            self.threshold = low if self.threshold < 0 else 0.999 * self.threshold + 0.001 * low
        recon, losses = p["b_dec"].expand_as(x), []
        weight = 1 / len(self.group_sizes)
        for f_part, w_part in zip(
            f.split(self.group_sizes, dim=1), p["W_dec"].split(self.group_sizes, dim=0), strict=True
        ):
            recon = recon + f_part @ w_part
            losses.append((x - recon).pow(2).sum(-1).mean() * weight)
        l2 = torch.stack(losses).mean()
        fired = f.sum(0) > 0
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        dead = self.since_fired >= WINDOW
        residual = (x - recon).detach()
        auxk = torch.zeros(())
        if dead.any():
            k_aux = min(x.shape[1] // 2, int(dead.sum()))
            aux_top = torch.where(dead[None], post, -torch.inf).topk(k_aux, sorted=False)
            aux = torch.zeros_like(post).scatter(-1, aux_top.indices, aux_top.values)
            err = (residual - aux @ p["W_dec"]).pow(2).sum(-1).mean()
            auxk = (err / (residual - residual.mean(0)).pow(2).sum(-1).mean()).nan_to_num(0.0)
        (l2 + 0.03 * auxk).backward()
        with torch.no_grad():
            w, g = p["W_dec"], p["W_dec"].grad
            unit = w / (w.norm(dim=1, keepdim=True) + 1e-6)
            g -= (g * unit).sum(1, keepdim=True) * unit
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        lr = self.peak_lr * reference_lr_factor(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.lrs.append(lr)
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka_batchtopk"])
def test_our_steps_match_the_reference_update(shards: Path, tmp_path: Path, architecture: str) -> None:
    torch.set_num_threads(1)
    fractions = [0.25, 0.25, 0.5] if architecture == "matryoshka_batchtopk" else None
    config = TrainConfig(
        shards=shards,
        out=tmp_path / "run",
        architecture=architecture,
        n_latents=32,
        k=2,
        group_fractions=fractions,
        dead_window=WINDOW,
        batch_size=BATCH,
        steps=STEPS,
        warmup_steps=WARMUP,
        decay_steps=DECAY_STEPS,
        threshold_start_step=THETA_START,
        buffer_mb=1,
        log_every=1,
        checkpoint_every=STEPS,
        progress=False,
        threads=1,
    )
    assert config.recipe == "paper" and config.optimizer == "adam" and config.sae.auxk_alpha == 0.03
    train_sae(config)

    plan = plan_run(config.model_copy(update={"out": tmp_path / "fresh"}))
    torch.manual_seed(config.seed)
    init = {name: t.detach().clone() for name, t in build_sae(plan.sae_cfg).named_parameters()}
    stream = ShardStream(
        ShardReader(shards, plan.manifest, True), plan.train_pieces, BATCH, config.seed, 2**20
    )
    batches = stream.batches(0)
    first = [next(batches) for _ in range(config.scale_batches)]
    scale = math.sqrt(float(torch.cat(first).double().pow(2).sum(1).mean()))
    peak = 2e-4 / math.sqrt(32 / 2**14)
    reference = ReferenceTrainer(init, 2, plan.sae_cfg.group_sizes or [32], peak)
    for step, x in zip(range(STEPS), stream.batches(0)):
        reference.update(step, x / scale)

    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert ckpt.state.input_scale == pytest.approx(scale, rel=1e-9)
    for name, value in reference.p.items():
        # Adam divides by sqrt(v): rounding in a near-zero gradient can move a weight by a fraction
        # of a step, so the tolerance is 1/20 of one step (any real difference costs whole steps)
        assert torch.allclose(ckpt.sae_state[name], value.detach(), rtol=1e-4, atol=0.05 * peak), name
    assert reference.threshold > 0 and ckpt.sae_cfg.threshold == pytest.approx(reference.threshold, rel=1e-4)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx(reference.lrs, rel=1e-12)
    assert reference.lrs[0] == 0 and reference.lrs[-1] == pytest.approx(peak / DECAY_STEPS)
    assert any(r["loss_auxk"] > 0 for r in rows)  # the AuxK path was part of the comparison
