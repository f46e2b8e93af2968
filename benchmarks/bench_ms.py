"""Monosemanticity score: our linear-time streaming score against the paper's pairwise computation.

The reference is the paper's algorithm (`metric.py` of ExplainableML/sae-for-vlm): for every image
i, the pairs (i, j > i) in batches of 100, weights ã_i ã_j times cosine, summed per latent —
vectorised over latents, as theirs is (run here in float64, so the differences measure our error). A second baseline forms the N x N cosine matrix and takes
the quadratic form per latent. Ours never forms a pair. Then ours alone up to 50,000 images, with
the data regenerated per batch so memory stays flat, to show the cost grows linearly in N, and the
peak memory at the paper's 65,536 latents. Everything runs on one thread and is timed in CPU
seconds, so that the ratios hold on a shared machine. Last, when the demo model is built, the paper's headline in miniature: MS of
the shapes-world SAE's latents against the tower's raw neurons.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_modules.evaluation.latent_summary import summarize_latents
from sae_modules.evaluation.monosemanticity import monosemanticity, monosemanticity_scores
from sae_modules.evaluation.sources import TensorBatches

D_EMBED = 512          # CLIP ViT-B/32 image embeddings, the paper's MS encoder
N_LATENTS = 4096


def paper_pairwise(acts: torch.Tensor, emb: torch.Tensor, batch: int = 100) -> torch.Tensor:
    acts, emb = acts.double(), emb.double()
    lo, hi = acts.min(dim=0).values, acts.max(dim=0).values
    norm = (acts - lo) / (hi - lo)
    weighted = torch.zeros(acts.shape[1], dtype=acts.dtype)
    total = torch.zeros(acts.shape[1], dtype=acts.dtype)
    for i in range(len(acts)):
        for j0 in range(i + 1, len(acts), batch):
            j1 = min(j0 + batch, len(acts))
            cos = torch.nn.functional.cosine_similarity(emb[i].unsqueeze(0).expand(j1 - j0, -1), emb[j0:j1], dim=1)
            weights = norm[i].unsqueeze(0) * norm[j0:j1]
            weighted += (weights * cos.unsqueeze(1)).sum(dim=0)
            total += weights.sum(dim=0)
    return torch.where(total != 0, weighted / total, torch.nan)


def matrix_quadratic_form(acts: torch.Tensor, emb: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    acts, emb = acts.double(), emb.double()
    lo, hi = acts.min(dim=0).values, acts.max(dim=0).values
    norm = (acts - lo) / (hi - lo)
    unit = emb / emb.norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    sim.fill_diagonal_(0)
    out = torch.empty(acts.shape[1], dtype=acts.dtype)
    for c0 in range(0, acts.shape[1], chunk):
        a = norm[:, c0:c0 + chunk]
        out[c0:c0 + chunk] = (a * (sim @ a)).sum(dim=0) / (a.sum(dim=0) ** 2 - (a * a).sum(dim=0))
    return out


def _data(n_images: int, n_latents: int, seed: int, d_embed: int = D_EMBED) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n_images, n_latents, generator=gen) - 1.0)
    emb = torch.randn(n_images, d_embed, generator=gen)
    return acts, emb


class _Generated:
    """A re-iterable source that regenerates each batch from its seed: memory independent of N."""

    def __init__(self, n_images: int, n_latents: int, batch: int = 2048, d_embed: int = D_EMBED) -> None:
        self.n_images, self.n_latents, self.batch, self.d_embed = n_images, n_latents, batch, d_embed

    def __iter__(self):
        for b, start in enumerate(range(0, self.n_images, self.batch)):
            yield _data(min(self.batch, self.n_images - start), self.n_latents, seed=b, d_embed=self.d_embed)


def _timed(fn):
    """CPU seconds of one thread: unlike wall time, they do not grow when others load the machine."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main() -> None:
    torch.set_num_threads(1)
    peak_memory_at_paper_width()
    print(f"threads={torch.get_num_threads()}  D={D_EMBED}  latents={N_LATENTS}  float64, CPU seconds")
    print(f"{'N':>6} {'ours s':>8} {'N x N s':>8} {'paper s':>9} {'vs N x N':>9} {'vs paper':>9} {'max |diff|':>11}")
    for n in (1000, 2000, 4000):
        acts, emb = _data(n, N_LATENTS, seed=n)          # float32, as activations are stored
        (_, ours), t_ours = _timed(lambda a=acts, e=emb: monosemanticity(TensorBatches(a, e, batch_size=1024), N_LATENTS,
                                                                               top_k=0))
        matrix, t_matrix = _timed(lambda a=acts, e=emb: matrix_quadratic_form(a, e))
        paper, t_paper = _timed(lambda a=acts, e=emb: paper_pairwise(a, e))
        diff = max(float((ours - paper).abs().nan_to_num().max()), float((ours - matrix).abs().nan_to_num().max()))
        print(f"{n:>6} {t_ours:>8.2f} {t_matrix:>8.2f} {t_paper:>9.1f} {t_matrix / t_ours:>8.1f}x "
              f"{t_paper / t_ours:>8.0f}x {diff:>11.1e}", flush=True)
    print("ours alone, data regenerated per batch of 2048 (generation time excluded):")
    print(f"{'N':>6} {'s':>8} {'ms / 1k images':>15}")
    for n in (6250, 12500, 25000, 50000):
        source = _Generated(n, N_LATENTS)
        _, t_gen = _timed(lambda s=source: sum(1 for _ in s) + sum(1 for _ in s))
        _, t_total = _timed(lambda s=source: monosemanticity_scores(s, *_range(s)))
        print(f"{n:>6} {t_total - t_gen:>8.2f} {1000 * (t_total - t_gen) / n * 1000:>15.1f}", flush=True)
    shapes_headline()


def peak_memory_at_paper_width(n_images: int = 2048, n_latents: int = 65536, d_embed: int = 768) -> None:
    """Streaming keeps memory independent of N: the peak here is what 50,000 images would need too."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    source = _Generated(n_images, n_latents, batch=512, d_embed=d_embed)
    _, seconds = _timed(lambda: monosemanticity_scores(source, *_range(source)))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{n_images} images x {n_latents} latents x D={d_embed}, batches of 512: {seconds:.1f} CPU s, "
          f"peak RSS {after:.2f} GiB (process before: {before:.2f} GiB)", flush=True)


def shapes_headline(n_images: int = 2000, seed: int = 7) -> None:
    """MS of the demo SAE's latents vs the raw neurons at its layer, on fresh shapes-world images.

    The world has no pretrained independent encoder, so image similarity comes from its ground
    truth: each image embeds as one-hot(shape) + one-hot(colour), whose cosine is 1 for the same
    coloured shape, 0.5 for one shared attribute and 0 otherwise.
    """
    from sae_modules import shapes
    from sae_modules.activations.images import FolderImages
    from sae_modules.activations.towers import load_tower
    from sae_modules.evaluation.embedders import FileEmbedder
    from sae_modules.evaluation.encode import encode_images
    from sae_modules.evaluation.report import evaluate_encoded
    from sae_modules.formats.detect import load_sae
    from sae_modules.shapes.label_tree import label_path
    from sae_modules.shapes.world import COLOURS, SHAPES, write_folder

    if not (Path(shapes.DEMO_MODEL_DIR).exists() and Path(shapes.DEMO_SAE_DIR).exists()):
        print("shapes headline skipped: the demo model is not built (make demo-model)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        attrs = write_folder(root / "images", n_images, seed=seed)
        source = FolderImages(root / "images")
        order = [attrs[int(Path(i).stem)] for i in source.ids]
        colours = list(COLOURS)
        truth = torch.zeros(n_images, len(SHAPES) + len(colours))
        for row, a in enumerate(order):
            truth[row, SHAPES.index(a.shape)] = 1.0
            truth[row, len(SHAPES) + colours.index(a.colour)] = 1.0
        save_file({"embeddings": truth}, root / "truth.safetensors")
        sae = load_sae(shapes.DEMO_SAE_DIR)
        layer = sae.cfg.source.layer if sae.cfg.source.layer is not None else -2
        tower = load_tower(str(shapes.DEMO_MODEL_DIR), device="cpu")
        paths = [label_path(a) for a in order]
        print(f"shapes world: {n_images} images (seed {seed}), layer {layer}, ground-truth attribute embeddings")
        print(f"{'latents':<28} {'pooling':>7} {'n':>6} {'live':>6} {'MS mean':>8} {'std':>7} {'median':>7}")
        for label, module in (("SAE " + sae.cfg.architecture, sae), ("raw neurons (No SAE)", None)):
            for pooling in ("mean", "cls"):
                encoded = encode_images(tower, layer, module, source, FileEmbedder(root / "truth.safetensors"),
                                        root / f"{label[:3]}-{pooling}", pooling=pooling, batch_size=64,
                                        progress=False)
                ev = evaluate_encoded(encoded, group_sizes=sae.cfg.group_sizes if module else None, taxonomy=paths)
                live = ev.ms[~torch.isnan(ev.ms)]
                print(f"{label:<28} {pooling:>7} {ev.ms.numel():>6} {live.numel():>6} {float(live.mean()):>8.4f} "
                      f"{float(live.std()):>7.4f} {float(live.median()):>7.4f}", flush=True)
                if module is not None and pooling == "mean" and len(ev.levels) > 1:
                    for row in ev.levels:
                        print(f"    level {row.level} ({row.n_latents} latents): MS {row.ms}, "
                              f"LCA depth {row.depth} over {row.n_scored}")


def _range(source: _Generated) -> tuple[torch.Tensor, torch.Tensor]:
    summary = summarize_latents(source, source.n_latents, top_k=0)
    return summary.lo, summary.hi


if __name__ == "__main__":
    main()
