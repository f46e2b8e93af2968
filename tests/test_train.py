"""`vlm-steer train` end to end on tiny shards: learning, logging, checkpoints, resume, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from train_fixtures import D_IN, sparse_activations, write_shards
from typer.testing import CliRunner

from sae_modules.activations.shards import read_manifest
from sae_modules.evaluation.latent_stats import check_fresh, load_latent_stats
from sae_modules.formats import load_sae
from sae_modules.train import TrainConfig, train_sae
from sae_modules.train.cli import train
from sae_modules.train.optim import make_optimizer
from sae_modules.train.state import latest_checkpoint, load_checkpoint
from sae_modules.train.trainer import lr_at, plan_run

LOG_FIELDS = {"step", "epoch", "samples", "lr", "loss", "fvu", "l0", "dead_fraction", "loss_l2", "loss_auxk"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("shards")
    write_shards(directory, sparse_activations(6 * 256), shard_size=256)
    return directory


def _config(shards: Path, out: Path, **changes) -> TrainConfig:
    base = {
        "shards": shards,
        "out": out,
        "architecture": "batchtopk",
        "n_latents": 32,
        "k": 2,
        "batch_size": 64,
        "steps": 30,
        "lr": 2e-2,
        "warmup_steps": 5,
        "buffer_mb": 2 * 256 * D_IN * 4 / 2**20,
        "checkpoint_every": 8,
        "log_every": 1,
        "dead_window": 3 * 64,
        "threshold_decay": 0.9,
        "threshold_start_step": 5,
        "threads": 1,
        "progress": False,
    }
    base.update(changes)
    return TrainConfig(**base)


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "sae.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory) -> Path:
    return train_sae(_config(shards, tmp_path_factory.mktemp("run")))


def test_learns_a_low_fvu_sae_that_takes_raw_activations(shards, tmp_path):
    final = train_sae(_config(shards, tmp_path, steps=200, checkpoint_every=200, log_every=50))
    sae = load_sae(final).eval()
    held = torch.cat([load_file(shards / e.file)["activations"] for e in read_manifest(shards).shards[-1:]])
    with torch.no_grad():
        f = sae.encode(held)
        recon = sae.decode(f)
    fvu = float((held - recon).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    assert fvu < 0.1
    metrics = sae.cfg.metrics
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert metrics["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()), rel=1e-6)
    assert sae.cfg.source.model_id == "tiny/clip" and sae.cfg.source.layer == -2
    assert sae.cfg.source.tokens == "random:4" and sae.cfg.threshold is not None


def test_a_run_that_ends_before_theta_is_learned_is_warned_about(shards, tmp_path):
    with pytest.warns(UserWarning, match="threshold_start_step: 30 steps end before step 1000"):
        plan_run(_config(shards, tmp_path, threshold_start_step=1000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_run(_config(shards, tmp_path))
        plan_run(_config(shards, tmp_path, architecture="topk", threshold_start_step=1000))


def test_training_writes_the_final_sae_s_latent_statistics(uninterrupted, shards):
    """The dictionary beside the trained SAE: fresh for it and over every training vector."""
    stats = load_latent_stats(uninterrupted)
    check_fresh(stats.info.sae_sha256, uninterrupted)
    assert stats.info.n_vectors == read_manifest(shards).count
    sae = load_sae(uninterrupted).eval()
    every = torch.cat([load_file(shards / e.file)["activations"] for e in read_manifest(shards).shards])
    with torch.no_grad():
        fired = (sae.encode(every) > 0).sum(0)
    assert torch.equal(stats.fire_count, fired.to(stats.fire_count.dtype))


def test_log_has_every_field_and_consistent_figures(uninterrupted):
    rows = [json.loads(line) for line in (uninterrupted.parent / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert all(LOG_FIELDS <= set(r) for r in rows)
    last = rows[-1]
    assert last["samples"] == 30 * 64 and last["epoch"] == pytest.approx(30 * 64 / (5 * 256))
    assert last["loss"] == pytest.approx(last["loss_l2"] + 0.03 * last["loss_auxk"], rel=1e-5)
    assert 0 <= last["dead_fraction"] <= 1 and 0 < last["fvu"] < 1
    # a latent unfired for 3 batches, this one included, is dead; this step's AuxK loss works on it
    assert any(r["dead_fraction"] > 0 for r in rows) and any(r["dead_fraction"] == 0 for r in rows)
    assert all((r["loss_auxk"] > 0) == (r["dead_fraction"] > 0) for r in rows)
    counters = load_checkpoint(latest_checkpoint(uninterrupted.parent)).state.samples_since_fired
    assert last["dead_fraction"] == float((counters >= 3 * 64).double().mean())
    assert bool((counters % 64 == 0).all()) and int(counters.max()) <= 30 * 64
    assert [r["lr"] for r in rows] == pytest.approx([2e-2 * min(s / 5, 1) for s in range(30)])


def test_learning_rate_schedule():
    """The reference's LambdaLR factors: s/warmup, 1, then (total - s)/decay_steps."""
    cfg = _config(Path("."), Path("."), warmup_steps=10, decay="linear", decay_steps=20)
    assert [lr_at(s, 110, cfg, 2.0) for s in (0, 5, 10, 89, 90, 100, 109)] == pytest.approx(
        [0.0, 1.0, 2.0, 2.0, 2.0, 1.0, 0.1]
    )
    paper = _config(Path("."), Path("."), warmup_steps=None, decay=None)  # the recipe's: 1000, linear over 1
    assert (paper.warmup_steps, paper.decay, paper.decay_steps) == (1000, "linear", 1)
    assert lr_at(1999, 2000, paper, 1.0) == 1.0 and lr_at(500, 2000, paper, 1.0) == 0.5
    cosine = cfg.model_copy(update={"decay": "cosine", "min_lr_ratio": 0.1})
    assert lr_at(10, 110, cosine, 1.0) == pytest.approx(1.0) and lr_at(
        109, 110, cosine, 1.0
    ) == pytest.approx(0.1)
    assert lr_at(59.5, 110, cosine, 1.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert math.isclose(lr_at(50, 110, cfg.model_copy(update={"decay": "constant"}), 1.0), 1.0)


def test_default_learning_rate_scales_with_width():
    cfg = _config(Path("."), Path("."), lr=None)
    assert cfg.peak_lr(2**14) == 2e-4 and cfg.peak_lr(2**16) == pytest.approx(1e-4)
    signum = _config(Path("."), Path("."), lr=None, recipe="signum", warmup_steps=None, decay=None)
    assert (signum.optimizer, signum.warmup_steps, signum.decay) == ("signum", 0, "constant")
    assert signum.peak_lr(2**16) == pytest.approx(2.5e-3)


def test_checkpoints_are_pruned_and_hold_the_full_state(uninterrupted):
    root = uninterrupted.parent / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000024", "step-00000030"]
    ckpt = load_checkpoint(latest_checkpoint(uninterrupted.parent))
    assert ckpt.state.step == 30 and ckpt.state.input_scale > 1
    assert (ckpt.state.epoch, ckpt.state.epoch_offset) == divmod(30 * 64, 5 * 256)
    moments = ckpt.optimizer_state["state"]
    shapes = sorted(tuple(m["exp_avg_sq"].shape) for m in moments.values())
    assert shapes == sorted([(D_IN, 32), (32, D_IN), (32,), (D_IN,)]) and all(
        m["step"] == 30 for m in moments.values()
    )
    assert ckpt.sae_cfg.threshold is not None
    # the exported SAE of the last checkpoint is the final SAE minus the held-out metrics
    for name, value in _weights(root / "step-00000030" / "sae").items():
        assert torch.equal(value, _weights(uninterrupted)[name])


def test_resume_after_an_exception_equals_the_uninterrupted_run(shards, tmp_path, uninterrupted):
    class Stop(Exception):
        pass

    def stop_at_13(record):
        if record.step == 13:
            raise Stop

    with pytest.raises(Stop):
        train_sae(_config(shards, tmp_path), on_step=stop_at_13)
    assert load_checkpoint(latest_checkpoint(tmp_path)).state.step == 8
    with (tmp_path / "train_log.jsonl").open("a") as log:
        log.write('{"step": 14, "lo')  # as if killed mid-line
    final = train_sae(_config(shards, tmp_path, resume=True))
    expected = _weights(uninterrupted)
    for name, value in _weights(final).items():
        assert torch.equal(value, expected[name]), name
    assert (final / "cfg.json").read_text() == (uninterrupted / "cfg.json").read_text()
    assert (tmp_path / "train_log.jsonl").read_text() == (
        uninterrupted.parent / "train_log.jsonl"
    ).read_text()


_CHILD = """
import sys, time
from pathlib import Path
from sae_modules.train import TrainConfig, train_sae
config = TrainConfig.model_validate_json(Path(sys.argv[1]).read_text())
train_sae(config, on_step=lambda record: time.sleep(0.05))
"""


def test_a_sigkilled_job_resumes_to_the_same_weights(shards, tmp_path, uninterrupted):
    config = _config(shards, tmp_path / "run")
    (tmp_path / "config.json").write_text(config.model_dump_json())
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "config.json")], cwd=Path(__file__).parents[1]
    )
    deadline = time.monotonic() + 120
    while (
        latest_checkpoint(tmp_path / "run") is None and child.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "sae").exists()
    assert load_checkpoint(latest_checkpoint(tmp_path / "run")).state.step < 30
    final = train_sae(config.model_copy(update={"resume": True}))
    expected = _weights(uninterrupted)
    for name, value in _weights(final).items():
        assert torch.equal(value, expected[name]), name
    assert (final.parent / "train_log.jsonl").read_text() == (
        uninterrupted.parent / "train_log.jsonl"
    ).read_text()


def _cli(args: list[str]):
    app = typer.Typer()
    app.command()(train)
    return CliRunner().invoke(app, args)


def test_cli_trains_from_yaml_with_flag_overrides(shards, tmp_path):
    (tmp_path / "train.yaml").write_text(
        f"shards: {shards}\nout: {tmp_path / 'run'}\narchitecture: matryoshka_batchtopk\nn_latents: 32\nk: 2\nthreads: 1\n"
        "group_fractions: [0.25, 0.75]\nbatch_size: 64\nsteps: 500\nwarmup_steps: 2\n"
    )
    result = _cli(
        ["--config", str(tmp_path / "train.yaml"), "--steps", "6", "--no-progress", "--holdout", "0.1"]
    )
    assert result.exit_code == 0, result.output
    cfg = load_sae(tmp_path / "run" / "sae").cfg.model_dump()
    assert cfg["architecture"] == "matryoshka_batchtopk" and cfg["group_sizes"] == [8, 24]
    assert cfg["metrics"]["n_vectors"] == round(0.1 * 6 * 256)
    assert (
        len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 1
    )  # step 6 only (log_every 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--architecture", "sparse_magic"], "architecture"),
        (["--shards", "/nonexistent/shards"], "shards"),
        (["--d-in", "17"], "d_in: the config says 17"),
        (["--architecture", "matryoshka_batchtopk", "--group-fractions", "0.5,0.2"], "group_fractions"),
        (["--k", "100"], "k=100 exceeds n_latents=32"),
        (["--architecture", "gated"], "'gated' is inference-only"),
        (["--optimizer", "signum"], "warmup_steps: signum's schedule-free averaging takes no warm-up"),
        (["--betas", "0.9"], "betas"),
        (["--batch-size", "63", "--workers", "2"], "batch_size"),
    ],
)
def test_bad_settings_exit_with_a_message_naming_the_field(shards, tmp_path, args, message):
    base = [
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "run"),
        "--n-latents",
        "32",
        "--k",
        "2",
        "--steps",
        "2",
    ]
    result = _cli(base + args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_existing_run_needs_resume_and_matching_settings(shards, tmp_path, uninterrupted):
    settings = _config(shards, uninterrupted.parent).model_dump(mode="json")
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(settings))
    result = _cli(["--config", str(tmp_path / "same.yaml")])
    assert result.exit_code == 2 and "--resume" in result.output
    result = _cli(["--config", str(tmp_path / "same.yaml"), "--resume", "--lr", "0.1"])
    assert result.exit_code == 2 and "different settings (lr)" in result.output
    write_shards(tmp_path / "other", sparse_activations(6 * 256, seed=1), shard_size=256)
    result = _cli(["--config", str(tmp_path / "same.yaml"), "--resume", "--shards", str(tmp_path / "other")])
    assert result.exit_code == 2 and "different settings (the activations in shards)" in result.output


def test_dry_run_checks_settings_and_shards_without_training(shards, tmp_path):
    base = ["--shards", str(shards), "--out", str(tmp_path / "run"), "--n-latents", "32", "--k", "2"]
    result = _cli([*base, "--steps", "7", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: batchtopk d_in=16 n_latents=32, 7 steps of 4096 on 1280 vectors")
    assert not (tmp_path / "run").exists()
    bad = _cli([*base, "--d-in", "17", "--dry-run"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "d_in: the config says 17, the shards" in bad.output
    missing = _cli(["--shards", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--dry-run"])
    assert missing.exit_code == 2 and "shards:" in missing.output and "Traceback" not in missing.output


def test_every_setting_has_a_flag_and_reaches_the_run(shards, tmp_path):
    from sae_modules.train.cli import _settings

    app = typer.Typer()
    app.command()(train)
    flags = {opt for param in typer.main.get_command(app).params for opt in param.opts}
    assert {"--" + name.replace("_", "-") for name in _settings(TrainConfig)} <= flags
    assert {"--betas", "--min-lr-ratio", "--auxk-k", "--optimizer", "--recipe"} <= flags
    args = ["--shards", str(shards), "--out", str(tmp_path / "run"), "--n-latents", "32", "--k", "2"]
    args += ["--steps", "2", "--no-progress", "--betas", "0.8,0.95", "--min-lr-ratio", "0.1"]
    args += ["--auxk-k", "3", "--threshold-start-step", "0", "--decay", "cosine", "--b-dec-init", "zeros"]
    args += ["--no-auxk-trains-encoder"]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    config = load_checkpoint(latest_checkpoint(tmp_path / "run")).config
    assert config.betas == (0.8, 0.95) and config.min_lr_ratio == 0.1 and config.sae.auxk_k == 3
    assert (
        not config.sae.auxk_trains_encoder and not load_sae(tmp_path / "run" / "sae").cfg.auxk_trains_encoder
    )
    assert config.threshold_start_step == 0 and config.decay == "cosine" and config.b_dec_init == "zeros"


def test_yaml_takes_a_nested_sae_section(shards, tmp_path):
    (tmp_path / "train.yaml").write_text(
        f"shards: {shards}\nout: {tmp_path / 'run'}\nsae:\n  architecture: topk\n  n_latents: 32\n  k: 3\n"
    )
    result = _cli(["--config", str(tmp_path / "train.yaml"), "--k", "4", "--dry-run"])
    assert result.exit_code == 0 and result.output.startswith("ok: topk d_in=16 n_latents=32"), result.output
    settings = TrainConfig.model_validate(yaml.safe_load((tmp_path / "train.yaml").read_text()))
    assert settings.sae.k == 3 and settings.sae.architecture == "topk"


def test_adam_runs_fused_with_the_per_op_update() -> None:
    """The fused kernel (no temporaries) on CPU, taking the same steps as torch's per-op Adam."""
    torch.manual_seed(0)
    fused_module, plain_module = torch.nn.Linear(D_IN, 32), torch.nn.Linear(D_IN, 32)
    plain_module.load_state_dict(fused_module.state_dict())
    fused = make_optimizer("adam", fused_module, 1e-2, betas=(0.8, 0.99))
    plain = torch.optim.Adam(plain_module.parameters(), lr=1e-2, betas=(0.8, 0.99), foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        x = torch.randn(16, D_IN)
        for module, optimizer in ((fused_module, fused), (plain_module, plain)):
            module(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for got, expected in zip(fused_module.parameters(), plain_module.parameters(), strict=True):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_signum_resumes_bit_exactly_and_ships_the_schedule_free_average(shards, tmp_path):
    config = _config(shards, tmp_path / "whole", recipe="signum", warmup_steps=None, decay=None, lr=None)
    whole = train_sae(config)

    class Stop(Exception):
        pass

    def stop_at_13(record):
        if record.step == 13:
            raise Stop

    with pytest.raises(Stop):
        train_sae(config.model_copy(update={"out": tmp_path / "cut"}), on_step=stop_at_13)
    resumed = train_sae(config.model_copy(update={"out": tmp_path / "cut", "resume": True}))
    for name, value in _weights(resumed).items():
        assert torch.equal(value, _weights(whole)[name]), name
    # the shipped weights are x = y + (1 - 1/momentum)(z - y), with the input scale folded in
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "whole"))
    names = ["W_dec", "W_enc", "b_dec", "b_enc"]  # parameter order of the SAE module
    order = {int(i): state["z"] for i, state in ckpt.optimizer_state["state"].items()}
    params = dict(zip(["W_dec", "W_enc", "b_enc", "b_dec"], [order[i] for i in range(4)]))
    shipped = _weights(whole)
    for name in names:
        y, z = ckpt.sae_state[name], params[name]
        x = y + (1 - 1 / 0.95) * (z - y)
        scale = ckpt.state.input_scale if name.startswith("b_") else 1.0
        assert torch.allclose(shipped[name], x * scale, rtol=1e-5, atol=1e-6), name
    assert ckpt.optimizer_state["param_groups"][0]["lr"] == pytest.approx(5e-3 / (32 / 2**14) ** 0.5)
