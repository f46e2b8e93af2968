"""service/assets.py builds the random demo pair into its cache folder whole, once."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from sae_modules import load_sae
from service.assets import build_random_demo


def test_random_demo_is_built_whole_and_reused(tmp_path: Path) -> None:
    model_dir, sae_dir = build_random_demo(tmp_path / "random-demo")
    assert AutoConfig.from_pretrained(model_dir).vision_config.hidden_size == load_sae(sae_dir).cfg.d_in == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random-demo"], "no staging folder left behind"
    stamp = (sae_dir / "sae.safetensors").stat().st_mtime_ns
    assert build_random_demo(tmp_path / "random-demo") == (model_dir, sae_dir)
    assert (sae_dir / "sae.safetensors").stat().st_mtime_ns == stamp, "a complete demo is not rebuilt"
