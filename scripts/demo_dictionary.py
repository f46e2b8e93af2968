"""Write the shipped demo SAE's latent dictionary (statistics + labels) beside it, from held-out images.

    .venv/bin/python scripts/demo_dictionary.py        # or: make demo-dictionary

Exactly what a user does for their own SAE, with the product's jobs: fresh shapes-world images
(a seed no training stage used) -> `extract` at the SAE's block with the tokens it was trained on
-> `write_dictionary` (the code behind `vlm-steer evaluate stats`) with the demo CLIP and the
shapes vocabulary. The work folder `out/demo-dictionary/` keeps the images (the statistics'
`images_root`, so the top images can be looked at); the activations (`out/demo-dictionary/activations`) are extracted afresh each run. Then the demo MANIFEST.json's entries for the
written files are refreshed (the manifest lists every shipped file). Run it again whenever the demo
SAE changes: `tests/test_latent_labels.py` fails while the shipped statistics describe another SAE.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from sae_modules.activations.extract import ExtractionPlan, run_extraction
from sae_modules.activations.images import FolderImages
from sae_modules.activations.tokens import TokenSelection
from sae_modules.activations.towers import load_tower
from sae_modules.atomic_file import atomic_write_json
from sae_modules.evaluation.dictionary import write_dictionary
from sae_modules.formats.detect import load_sae
from sae_modules.shapes import ASSETS_DIR, DEMO_CLIP_DIR, DEMO_MANIFEST, DEMO_MODEL_DIR, DEMO_SAE_DIR
from sae_modules.shapes.manifest import file_hashes
from sae_modules.shapes.world import write_folder

SEED = "demo-dictionary-held-out"
IMAGES = 2000


def refresh_manifest(files: list[Path]) -> None:
    """Put the written files' sha256 and size into MANIFEST.json, leaving every other entry as it is."""
    manifest = json.loads(DEMO_MANIFEST.read_text())
    hashes = file_hashes(ASSETS_DIR)
    for file in files:
        name = file.resolve().relative_to(ASSETS_DIR).as_posix()
        manifest["files"][name] = hashes[name]
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest["total_bytes"] = sum(entry["bytes"] for entry in manifest["files"].values())
    atomic_write_json(DEMO_MANIFEST, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("out/demo-dictionary"), help="images and activations")
    parser.add_argument("--images", type=int, default=IMAGES, help="held-out images to measure on")
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = args.work / "images"
    if not images.is_dir() or sum(1 for _ in images.rglob("*.png")) != args.images:
        write_folder(images, args.images, seed=SEED)
    source = load_sae(DEMO_SAE_DIR).cfg.source
    model = os.path.relpath(DEMO_MODEL_DIR)             # recorded in the statistics: no machine's absolute path
    plan = ExtractionPlan(model=model, layer=source.layer, tokens=TokenSelection.parse(source.tokens), batch_size=64)
    shards = args.work / "activations"
    shutil.rmtree(shards, ignore_errors=True)             # always extracted afresh: the model may have been rebuilt
    run_extraction(load_tower(model, device="cpu"), FolderImages(images), shards, plan, progress=False)
    result = write_dictionary(DEMO_SAE_DIR, shards, images=images, clip=f"clip:{os.path.relpath(DEMO_CLIP_DIR)}",
                              vocabulary="shapes")
    refresh_manifest(result.files)
    print(f"{int(result.stats.live.sum())} live latents over {result.stats.info.n_vectors} vectors, "
          f"{len(result.labels.labels)} labelled -> {', '.join(map(str, result.files))}")


if __name__ == "__main__":
    main()
