"""The SAE training loop: one function that a CLI, a Python caller and each Ray worker all run.

Training happens on x / s, where s = sqrt(mean ‖x‖²) over the first batches, so learning rates
transfer between layers and models; the saved SAE has s folded back in and takes raw activations.
Under torch.distributed (the Ray path) every rank reads the same global batch and trains on its
own contiguous slice; gradients, firing counts and logged sums are reduced across ranks, and only
rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import ValidationError
from torch import Tensor
from tqdm import tqdm

from sae_modules.activations.shards import ShardError, ShardManifest, read_manifest
from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.formats import CheckpointError, save_sae
from sae_modules.metrics import ReconstructionMetrics
from sae_modules.saes import BatchTopKSAE, build_sae, group_sizes_from_fractions
from sae_modules.saes.base import SAE, SAEConfig, SAEOutput, SAESettings, SourceInfo, fire_counts
from sae_modules.train.config import TrainConfig, TrainConfigError, describe_validation_error
from sae_modules.train.data import Piece, ShardReader, ShardStream, split_holdout
from sae_modules.train.geometric_median import geometric_median
from sae_modules.train.optim import Optimizer, build_optimizer, inference_weights
from sae_modules.train.state import (
    Checkpoint,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

LOG_FILE = "train_log.jsonl"
FINAL_SAE = "sae"


@dataclass
class StepRecord:
    """What one logged step reports (also one line of train_log.jsonl)."""

    step: int
    epoch: float
    samples: int
    lr: float
    loss: float
    fvu: float
    l0: float
    dead_fraction: float
    losses: dict[str, float]

    def as_json(self) -> dict[str, float]:
        row = {k: v for k, v in self.__dict__.items() if k != "losses"}
        row.update({f"loss_{k}": v for k, v in self.losses.items()})
        return row


@dataclass
class Plan:
    """A validated run: what to read, what to build, and where to start."""

    config: TrainConfig
    manifest: ShardManifest
    train_pieces: list[Piece]
    holdout_pieces: list[Piece]
    sae_cfg: SAEConfig
    total_steps: int
    checkpoint: Checkpoint | None

    def summary(self) -> str:
        """One line saying what the run would do (what `vlm-steer train --dry-run` prints)."""
        start = f"resume at step {self.checkpoint.state.step}" if self.checkpoint else "start fresh"
        n_train = sum(p.count for p in self.train_pieces)
        n_held = sum(p.count for p in self.holdout_pieces)
        return (
            f"ok: {self.sae_cfg.architecture} d_in={self.sae_cfg.d_in} n_latents={self.sae_cfg.n_latents}, "
            f"{self.total_steps} steps of {self.config.batch_size} on {n_train} vectors "
            f"({n_held} held out) from {self.config.shards}; {start}"
        )


def _sae_config(config: TrainConfig, manifest: ShardManifest) -> SAEConfig:
    """The SAE's config: the run's `sae` settings, width and provenance from the shards."""
    section = config.sae
    n_latents = section.n_latents or max(1, round(section.expansion * manifest.d_in))
    values = section.model_dump(include=set(SAESettings.model_fields))
    values.update(
        d_in=manifest.d_in,
        n_latents=n_latents,
        source=SourceInfo(model_id=manifest.model, layer=manifest.layer, tokens=manifest.tokens),
    )
    if section.group_fractions is not None:
        values["group_sizes"] = group_sizes_from_fractions(n_latents, section.group_fractions)
    try:
        return SAEConfig.model_validate(values)
    except ValidationError as err:
        raise TrainConfigError(describe_validation_error(err)) from None


def plan_run(config: TrainConfig) -> Plan:
    """Check everything that can be checked before training starts; raise a clear error otherwise."""
    if not config.shards.is_dir():
        raise TrainConfigError(f"shards: {config.shards} is not a directory")
    manifest = read_manifest(config.shards)
    if not manifest.complete:
        raise ShardError(
            f"{config.shards} is an incomplete extraction (rerun `vlm-steer extract` to finish it)"
        )
    if config.d_in is not None and config.d_in != manifest.d_in:
        raise TrainConfigError(
            f"d_in: the config says {config.d_in}, the shards in {config.shards} have {manifest.d_in}"
        )
    if config.batch_size % config.workers:
        raise TrainConfigError(
            f"batch_size: {config.batch_size} does not split evenly over {config.workers} workers"
        )
    train_pieces, holdout_pieces = split_holdout(manifest, config.holdout_shards, config.holdout)
    sae_cfg = _sae_config(config, manifest)
    n_train = sum(p.count for p in train_pieces)
    total_steps = config.steps or max(1, math.ceil((config.epochs or 1.0) * n_train / config.batch_size))
    if sae_cfg.architecture in ("batchtopk", "matryoshka_batchtopk") and total_steps <= config.threshold_start_step:
        warnings.warn(f"threshold_start_step: {total_steps} steps end before step {config.threshold_start_step}, "
                      "where θ starts to be learned: the SAE will encode with plain ReLU (lower "
                      "--threshold-start-step or train longer)", stacklevel=2)
    checkpoint = _checkpoint_to_resume(config, data_fingerprint(manifest))
    return Plan(config, manifest, train_pieces, holdout_pieces, sae_cfg, total_steps, checkpoint)


def data_fingerprint(manifest: ShardManifest) -> str:
    """Identifies the activations themselves (not where they are), so a moved shard directory resumes."""
    content = [manifest.d_in, manifest.dtype, [(e.file, e.count, e.sha256) for e in manifest.shards]]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def _checkpoint_to_resume(config: TrainConfig, fingerprint: str) -> Checkpoint | None:
    found = latest_checkpoint(config.out)
    if found is None:
        return None
    if not config.resume:
        raise TrainConfigError(
            f"out: {config.out} already holds training checkpoints; pass --resume to continue, or choose another --out"
        )
    checkpoint = load_checkpoint(found)
    changed = config.differences(checkpoint.config)
    if checkpoint.data_fingerprint != fingerprint:
        changed.insert(0, "the activations in shards")
    if changed:
        raise CheckpointError(
            f"cannot resume {found}: it was trained with different settings ({', '.join(changed)})"
        )
    return checkpoint


def lr_at(step: int, total_steps: int, config: TrainConfig, peak: float) -> float:
    """Learning rate of 0-based step `step`, as the reference's LambdaLR gives it: warm-up
    peak·step/warmup_steps (0 at step 0), then constant; `linear` falls over the last decay_steps
    as (total − step)/decay_steps, `cosine` over everything after warm-up; both towards
    min_lr_ratio × peak."""
    if step < config.warmup_steps:
        return peak * step / config.warmup_steps
    if config.decay == "constant":
        return peak
    if config.decay == "linear":
        factor = min(1.0, (total_steps - step) / config.decay_steps)
    else:
        progress = min((step - config.warmup_steps) / max(total_steps - config.warmup_steps - 1, 1), 1.0)
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (config.min_lr_ratio + (1 - config.min_lr_ratio) * factor)


def estimate_input_scale(batches: Iterator[Tensor], n_batches: int) -> float:
    """sqrt(mean ‖x‖²) over the next `n_batches` batches (the paper's single input scalar)."""
    total, count = 0.0, 0
    for _, x in zip(range(n_batches), batches):
        total += float(x.double().pow(2).sum())
        count += len(x)
    scale = math.sqrt(total / count)
    if not scale > 0:
        raise ShardError("the training activations are all zero; there is nothing to train on")
    return scale


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: Tensor) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t


def folded_sae(sae: SAE, optimizer: Optimizer, input_scale: float) -> SAE:
    """A CPU copy in inference mode with the weights to ship (the schedule-free average under
    signum) that takes raw activations (the input scale folded in)."""
    folded = inference_weights(sae, optimizer).cpu().eval()
    folded.fold_input_scale(input_scale)
    return folded


@torch.no_grad()
def evaluate_sae(sae: SAE, batches: Iterator[Tensor]) -> dict[str, float]:
    """Held-out reconstruction and sparsity of an inference-mode SAE on raw activations."""
    metrics = ReconstructionMetrics(sae.n_latents)
    for x in batches:
        f = sae.encode(x)
        metrics.update(x, sae.decode(f), f)
    return metrics.compute()


@torch.no_grad()
def _sync_buffers(sae: SAE) -> None:
    """Average floating-point buffers (BatchTopK's θ EMA) over ranks, so every rank agrees."""
    _, world = _world()
    if world > 1:
        for buffer in sae.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= world


@torch.no_grad()
def _record(
    state: TrainingState,
    stream: ShardStream,
    config: TrainConfig,
    lr: float,
    x: Tensor,
    out: SAEOutput,
    window: int,
) -> StepRecord:
    """Batch-level figures summed over ranks: FVU about the global batch mean, mean L0, loss terms."""
    names = sorted(out.losses)
    n = len(x)
    scalars = torch.tensor(
        [
            float((x - out.recon).double().pow(2).sum()),
            float(x.double().pow(2).sum()),
            float(n),
            float(fire_counts(out.latents).sum()),
            float(out.loss) * n,
            *(float(out.losses[k]) * n for k in names),
        ],
        dtype=torch.float64,
    )
    sums = _all_reduce(torch.cat([scalars, x.double().sum(0).cpu()]))
    sse, total_sq, n_all, l0_sum, loss_sum = sums[:5].tolist()
    component_sums = sums[5 : 5 + len(names)].tolist()
    variance = total_sq - float(sums[5 + len(names) :].pow(2).sum()) / n_all
    samples = state.step * config.batch_size
    return StepRecord(
        step=state.step,
        epoch=samples / stream.n_vectors,
        samples=samples,
        lr=lr,
        loss=loss_sum / n_all,
        fvu=sse / variance,
        l0=l0_sum / n_all,
        dead_fraction=float((state.samples_since_fired >= window).double().mean()),
        losses={k: v / n_all for k, v in zip(names, component_sums)},
    )


def _rewrite_log(path: Path, upto_step: int) -> None:
    """Keep only rows up to the resumed step, so a resumed log reads like an uninterrupted one."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the half-written last line of a killed run
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _start_or_restore(
    plan: Plan, sae: SAE, optimizer: Optimizer, stream: ShardStream, device: torch.device
) -> TrainingState:
    """Load the checkpoint into `sae` and `optimizer`, or measure the input scale (and start b_dec
    at the first batch's geometric median, as the reference does) for a fresh run."""
    if plan.checkpoint is None:
        scale = estimate_input_scale(stream.batches(0), plan.config.scale_batches)
        if plan.config.b_dec_init == "geometric_median":
            first = next(stream.batches(0)).to(device) / scale
            sae.b_dec.data.copy_(geometric_median(first))
        zeros = torch.zeros(plan.sae_cfg.n_latents, dtype=torch.int64, device=device)
        return TrainingState(step=0, input_scale=scale, samples_since_fired=zeros, epoch=0, epoch_offset=0)
    sae.load_state_dict(plan.checkpoint.sae_state)
    sae.cfg = plan.checkpoint.sae_cfg
    optimizer.load_state_dict(plan.checkpoint.optimizer_state)
    torch.set_rng_state(plan.checkpoint.rng_state)
    state = plan.checkpoint.state
    state.samples_since_fired = state.samples_since_fired.to(device)
    return state


def run_training(config: TrainConfig, on_step: Callable[[StepRecord], None] | None = None) -> Path:
    """Train (or resume) one SAE and return the final checkpoint directory (`out/sae`).

    `config.threads` applies for the duration of the run only; the caller's setting comes back after.
    """
    plan = plan_run(config)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(plan, on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _train(plan: Plan, on_step: Callable[[StepRecord], None] | None) -> Path:
    config = plan.config
    rank, world = _world()
    device = torch.device(config.device)
    reader = ShardReader(config.shards, plan.manifest, config.verify_shards)
    buffer_vectors = max(1, int(config.buffer_mb * 2**20 // (4 * plan.manifest.d_in)))
    stream = ShardStream(reader, plan.train_pieces, config.batch_size, config.seed, buffer_vectors)

    torch.manual_seed(config.seed)
    sae = build_sae(plan.sae_cfg).to(device)
    peak_lr = config.peak_lr(plan.sae_cfg.n_latents)
    optimizer = build_optimizer(config, sae, peak_lr)
    state = _start_or_restore(plan, sae, optimizer, stream, device)
    model = torch.nn.parallel.DistributedDataParallel(sae) if world > 1 else sae

    config.out.mkdir(parents=True, exist_ok=True)
    log_path = config.out / LOG_FILE
    if rank == 0:
        _rewrite_log(log_path, state.step)

    def checkpoint() -> None:
        state.epoch, state.epoch_offset = stream.position(state.step)
        save_checkpoint(
            config.out,
            config=config,
            sae_cfg=sae.cfg,
            sae_state=sae.state_dict(),
            optimizer_state=optimizer.state_dict(),
            state=state,
            data_fingerprint=data_fingerprint(plan.manifest),
            export_sae=lambda d: save_sae(folded_sae(sae, optimizer, state.input_scale), d),
        )

    local = config.batch_size // world
    dead_window = plan.sae_cfg.dead_window
    bar = tqdm(
        total=plan.total_steps, initial=state.step, disable=not (config.progress and rank == 0), unit="step"
    )
    batches = stream.batches(state.step)
    with log_path.open("a") if rank == 0 else contextlib.nullcontext() as log:
        while state.step < plan.total_steps:
            x = next(batches)[rank * local : (rank + 1) * local].to(device) / state.input_scale
            lr = lr_at(state.step, plan.total_steps, config, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if isinstance(sae, BatchTopKSAE):
                sae.learn_threshold = state.step > config.threshold_start_step
            out = model(x, state.samples_since_fired + config.batch_size >= dead_window)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), config.grad_clip)
            optimizer.step()
            sae.normalize_decoder()
            _sync_buffers(sae)

            fired = _all_reduce(fire_counts(out.latents).to(device))
            state.samples_since_fired += config.batch_size
            state.samples_since_fired[fired > 0] = 0
            state.step += 1
            bar.update(1)

            if state.step % config.log_every == 0 or state.step == plan.total_steps:
                record = _record(state, stream, config, lr, x, out, dead_window)
                if rank == 0:
                    log.write(json.dumps(record.as_json()) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{record.loss:.4g}", fvu=f"{record.fvu:.3f}", l0=f"{record.l0:.1f}")
                if on_step is not None:
                    on_step(record)
            if rank == 0 and (state.step % config.checkpoint_every == 0 or state.step == plan.total_steps):
                checkpoint()
    bar.close()
    final = config.out / FINAL_SAE
    if rank == 0:
        folded = folded_sae(sae, optimizer, state.input_scale)
        if plan.holdout_pieces:
            metrics = evaluate_sae(folded, reader.batches(plan.holdout_pieces, config.batch_size))
            folded.cfg = folded.cfg.model_copy(update={"metrics": metrics})
        save_sae(folded, final)
    return final
