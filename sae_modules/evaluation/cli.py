"""`vlm-steer evaluate ...`: monosemanticity, taxonomy depth, steering score, and the full report.

Every command takes either precomputed files or the whole chain (tower activations at the SAE's
layer -> SAE encode -> per-image pooling, and the embedder), which it caches in an encoded
directory so that later commands (taxonomy, report) reuse it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from torch import Tensor

from sae_modules.activations.blocks import LAST_LAYER, Layer
from sae_modules.activations.images import FolderImages
from sae_modules.activations.towers import load_tower, parse_layer, resolve_device
from sae_modules.atomic_file import atomic_write_bytes
from sae_modules.cli_errors import EXIT_CODES, fail
from sae_modules.errors import ErrorKind, VlmSteerError
from sae_modules.evaluation.dictionary import write_dictionary
from sae_modules.evaluation.embedders import load_embedder
from sae_modules.evaluation.encode import POOLINGS, EncodedDir, encode_images
from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.latent_summary import summarize_latents
from sae_modules.evaluation.monosemanticity import monosemanticity, ms_report
from sae_modules.evaluation.paper import PaperSettings, as_figure, run_paper
from sae_modules.evaluation.plots import histogram
from sae_modules.evaluation.reconstruction import reconstruction_metrics
from sae_modules.evaluation.report import evaluate_encoded, write_report
from sae_modules.evaluation.sources import SafetensorsBatches
from sae_modules.evaluation.steering_score import (
    PAPER_VALUE,
    Answer,
    SteeringScore,
    prototypes,
    steering_score,
)
from sae_modules.evaluation.taxonomy_depth import by_level, csv_taxonomy, folder_taxonomy, latent_depths
from sae_modules.formats.detect import load_sae
from sae_modules.saes.base import SAE

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
_ERRORS = (VlmSteerError,)

SaeOpt = Annotated[str | None, typer.Option(help="SAE checkpoint (any supported layout) for the chain.")]
ModelOpt = Annotated[str | None, typer.Option(help="CLIP / LLaVA checkpoint or open_clip:NAME whose tower the SAE reads.")]
ImagesOpt = Annotated[Path | None, typer.Option(help="Image folder (recursive, sorted; subfolders are labels).")]
EmbedderOpt = Annotated[str | None, typer.Option(help="dinov2:PATH, clip:PATH, open_clip:ARCH@WEIGHTS or FILE.safetensors.")]
LayerOpt = Annotated[str | None, typer.Option(
    help="Tower block (negative from the end), or 'last': the image embedding, CLIP's visual projection of the "
         "pooled CLS (768-d for ViT-L/14; a tower without a projection gives its pooled output). "
         "Default: the SAE's recorded layer.")]
BlockOpt = Annotated[int | None, typer.Option("--layer", help="Tower block the SAE reads; default: the one it records.")]
PoolingOpt = Annotated[str, typer.Option(
    help="Per-image value of a latent over tokens: cls (the paper's MS tables), mean (its token-level steering SAE), max.")]
RawOpt = Annotated[bool, typer.Option("--raw-neurons", help="'No SAE' baseline: the layer's neurons are the latents.")]
WeightsOpt = Annotated[Path | None, typer.Option(help="open_clip tower weights.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
EncodedOpt = Annotated[Path | None, typer.Option(help="Encoded directory written by an earlier chain run.")]


def _fail(err: Exception) -> typer.Exit:
    """One line and the kind's exit code; a foreign error (a file that cannot be parsed) counts as invalid."""
    if isinstance(err, VlmSteerError):
        return fail(str(err), EXIT_CODES[err.kind], err.field)
    return fail(str(err), EXIT_CODES[ErrorKind.INVALID])


def _encoded(encoded: Path | None, work: Path, sae: str | None, model: str | None, images: Path | None,
             embedder: str | None, layer: str | None, pooling: str, raw_neurons: bool, weights: Path | None,
             device: str, batch_size: int) -> EncodedDir:
    """An existing encoded directory, or run the chain into `work`."""
    if encoded is not None:
        return EncodedDir.open(encoded)
    missing = [name for name, value in (("--model", model), ("--images", images), ("--embedder", embedder))
               if value is None]
    if missing:
        raise EvaluationError(f"the chain needs {', '.join(missing)} (or give precomputed files)", missing[0][2:])
    if (sae is None) != raw_neurons:
        raise EvaluationError("give exactly one of --sae and --raw-neurons", "sae")
    torch_device = resolve_device(device)
    sae_module = None if sae is None else load_sae(sae, device=torch_device)
    if layer is None:
        if sae_module is None:
            raise EvaluationError("--raw-neurons needs --layer (the block whose neurons are measured)", "layer")
        block: Layer = _recorded_layer(sae_module, sae)
    else:
        block = _parse_layer(layer)
    tower = load_tower(model, str(weights) if weights else None, device)
    return encode_images(tower, block, sae_module, FolderImages(images), load_embedder(embedder, torch_device), work,
                         pooling=pooling, batch_size=batch_size, sae_name=sae)  # type: ignore[arg-type]


def _setting(data: EncodedDir) -> dict:
    """Pooling and layer of an encoded directory, written into every output so numbers are never compared
    across settings (the paper's MS tables use the CLS token, its steering SAE the mean over tokens)."""
    return {"pooling": data.info.pooling, "layer": data.info.layer}


def _parse_layer(text: str) -> Layer:
    try:
        return parse_layer(text)
    except ValueError as err:
        raise EvaluationError(f"--layer: {err}", "layer") from None


def _recorded_layer(sae_module: SAE, name: str) -> Layer:
    layer = sae_module.cfg.source.layer
    if layer is None:
        raise EvaluationError(f"the SAE {name} records no layer (the paper's releases do not): give --layer", "layer")
    return layer


def _group_sizes(text: str | None, sae: str | None) -> list[int] | None:
    if text:
        try:
            return [int(x) for x in text.split(",")]
        except ValueError:
            raise EvaluationError(f"--group-sizes {text!r} must be comma-separated integers", "group_sizes") from None
    if sae:
        return load_sae(sae).cfg.group_sizes
    return None


def _taxonomy(spec: str, encoded: EncodedDir) -> list[tuple[str, ...]]:
    if spec == "folders":
        return folder_taxonomy(encoded.info.ids)
    return csv_taxonomy(spec, encoded.info.ids)


@app.command()
def ms(
    out: Annotated[Path, typer.Option(help="ms.json to write.")],
    activations: Annotated[list[Path] | None, typer.Option(help="safetensors with tensor `activations` [N, F]; repeatable, rows concatenate.")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="safetensors with tensor `embeddings` [N, D].")] = None,
    sae: SaeOpt = None, model: ModelOpt = None, images: ImagesOpt = None, embedder: EmbedderOpt = None,
    layer: LayerOpt = None, pooling: PoolingOpt = "cls", raw_neurons: RawOpt = False, weights: WeightsOpt = None,
    encoded: EncodedOpt = None,
    work: Annotated[Path | None, typer.Option(help="Where the chain caches its encoded directory.")] = None,
    hist: Annotated[Path | None, typer.Option(help="Also write a histogram PNG.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Monosemanticity score of every latent: {"ms": [...], "mean", "std", "n_live", ...}."""
    try:
        if pooling not in POOLINGS:
            raise EvaluationError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}", "pooling")
        if activations:
            if embeddings is None:
                raise EvaluationError("--activations needs --embeddings", "embeddings")
            batches = SafetensorsBatches(activations, embeddings)
            setting = {"pooling": "as in the given --activations", "layer": layer and _parse_layer(layer)}
        else:
            work = work or out.with_name(out.stem + "-encoded")
            data = _encoded(encoded, work, sae, model, images, embedder, layer, pooling, raw_neurons, weights,
                            device, batch_size)
            batches, setting = data.batches(), _setting(data)
        summary, scores = monosemanticity(batches, batches.n_latents, top_k=0,
                                          device=resolve_device(device))
        report = ms_report(scores, summary.n_images)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps(setting | report.model_dump()).encode())
        if hist is not None:
            histogram(scores, hist, title="Monosemanticity score", xlabel="MS")
    except _ERRORS as err:
        raise _fail(err) from None
    std = "n/a" if report.std is None else f"{report.std:.4f}"
    mean = "n/a" if report.mean is None else f"{report.mean:.4f}"
    Console(stderr=True).print(f"MS {mean} ± {std} over {report.n_live} of {report.n_latents} latents "
                               f"({report.n_images} images) -> {out}")


@app.command()
def taxonomy(
    encoded: Annotated[Path, typer.Option(help="Encoded directory (from `ms` or `report` with the chain).")],
    out: Annotated[Path, typer.Option(help="taxonomy.json to write.")],
    taxonomy: Annotated[str, typer.Option(help="'folders' (iNaturalist-style names split on _) or a CSV file.")] = "folders",
    group_sizes: Annotated[str | None, typer.Option(help="Matryoshka levels, e.g. 64,128,256; default: from --sae.")] = None,
    sae: SaeOpt = None,
    ms_json: Annotated[Path | None, typer.Option("--ms", help="ms.json to put each level's mean MS beside its depth.")] = None,
    top_k: Annotated[int, typer.Option(help="Top images per latent (16 gives the paper's 120 pairs).")] = 16,
) -> None:
    """Mean LCA depth of each latent's top images, per Matryoshka level (paper Table 2)."""
    try:
        data = EncodedDir.open(encoded)
        batches = data.batches()
        summary = summarize_latents(batches, batches.n_latents, top_k)
        depths = latent_depths(summary.top_images, summary.top_values, _taxonomy(taxonomy, data))
        scores = None
        if ms_json is not None:
            values = json.loads(ms_json.read_text())["ms"]
            scores = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64)
        rows = by_level(depths, scores, _group_sizes(group_sizes, sae))
        out.parent.mkdir(parents=True, exist_ok=True)
        body = _setting(data) | {"depth": [None if math.isnan(d) else d for d in depths.tolist()],
                                 "levels": [r.model_dump() for r in rows]}
        atomic_write_bytes(out, json.dumps(body).encode())
    except (*_ERRORS, OSError, KeyError, ValueError) as err:
        raise _fail(err) from None
    for row in rows:
        Console(stderr=True).print(f"level {row.level}: depth {row.depth} over {row.n_scored} latents, MS {row.ms}")


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="Report directory: report.json, report.md, plots, browser/.")],
    sae: SaeOpt = None, model: ModelOpt = None, images: ImagesOpt = None, embedder: EmbedderOpt = None,
    layer: LayerOpt = None, pooling: PoolingOpt = "cls", raw_neurons: RawOpt = False, weights: WeightsOpt = None,
    encoded: EncodedOpt = None,
    shards: Annotated[Path | None, typer.Option(help="Activation shards for FVU / L0 / dead latents (needs --sae).")] = None,
    max_vectors: Annotated[int | None, typer.Option(help="Cap on shard vectors for reconstruction.")] = None,
    taxonomy: Annotated[str | None, typer.Option(help="'folders' or a CSV: adds taxonomy depth per level.")] = None,
    group_sizes: Annotated[str | None, typer.Option(help="Matryoshka levels; default: from --sae.")] = None,
    service_url: Annotated[str | None, typer.Option(help="Steering service URL: each latent links to {url}/ui?latent=K.")] = None,
    browser_latents: Annotated[int, typer.Option(help="Most latents the browser shows (spread over MS and levels).")] = 512,
    steering: Annotated[Path | None, typer.Option(help="steering.json from `evaluate steering`, to include.")] = None,
    top_k: Annotated[int, typer.Option(help="Top images per latent.")] = 16,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 16,
    device: DeviceOpt = "auto",
) -> None:
    """Everything: MS, firing, taxonomy depth, reconstruction, plots and the latent browser."""
    try:
        data = _encoded(encoded, out / "encoded", sae, model, images, embedder, layer, pooling, raw_neurons, weights,
                        device, batch_size)
        ev = evaluate_encoded(data, top_k=top_k, group_sizes=_group_sizes(group_sizes, sae),
                              taxonomy=_taxonomy(taxonomy, data) if taxonomy else None,
                              device=str(resolve_device(device)))
        recon = None
        if shards is not None:
            if sae is None:
                raise EvaluationError("--shards measures an SAE's reconstruction: give --sae", "sae")
            recon = reconstruction_metrics(load_sae(sae), shards, max_vectors=max_vectors,
                                           device=resolve_device(device))
        steering_result = None
        if steering is not None:
            try:
                steering_result = SteeringScore.model_validate_json(steering.read_text()).model_dump(
                    exclude={"latents", "unsteered_answers"})
            except (OSError, ValueError) as err:
                raise EvaluationError(f"cannot read {steering}: {str(err).splitlines()[0]}", "steering") from None
        result = write_report(out, data, ev, reconstruction=recon, steering=steering_result, service_url=service_url,
                              browser_cap=browser_latents, images_root=images)
    except _ERRORS as err:
        raise _fail(err) from None
    Console(stderr=True).print(f"report -> {out / 'report.md'}; MS {result.ms_mean} ± {result.ms_std} "
                               f"over {result.n_live} latents")


@app.command()
def stats(
    sae: Annotated[Path, typer.Option(help="Local SAE checkpoint folder; the files are written into it.")],
    activations: Annotated[Path, typer.Option(help="Activation shard folder (from `vlm-steer extract`) at the SAE's layer.")],
    images: Annotated[Path | None, typer.Option(help="The image folder the shards were extracted from (for labels).")] = None,
    clip: Annotated[str | None, typer.Option(help="CLIP with a text tower for labels: clip:PATH or open_clip:ARCH@WEIGHTS.")] = None,
    vocabulary: Annotated[str | None, typer.Option(help="Label words: imagenet, shapes or a text file (one per line).")] = None,
    top_k: Annotated[int, typer.Option(help="Top images kept per latent.")] = 16,
    max_vectors: Annotated[int | None, typer.Option(help="Cap on activation vectors.")] = None,
    batch_size: Annotated[int, typer.Option(help="Vectors per SAE encode.")] = 1024,
    device: DeviceOpt = "auto",
) -> None:
    """Latent dictionary: per-latent firing frequency, mean, max, p99 and top images (+ labels with --clip)."""
    try:
        result = write_dictionary(sae, activations, images=images, clip=clip, vocabulary=vocabulary, top_k=top_k,
                                  max_vectors=max_vectors, batch_size=batch_size, device=resolve_device(device))
    except _ERRORS as err:
        raise _fail(err) from None
    labelled = "" if result.labels is None else f", {len(result.labels.labels)} labelled"
    Console(stderr=True).print(f"{int(result.stats.live.sum())} of {result.stats.n_latents} latents fired over "
                               f"{result.stats.info.n_vectors} vectors{labelled} -> {', '.join(map(str, result.files))}")


AnswerFactory = Callable[[str, str, int, str], Answer]
"""(model, sae, layer, device) -> answer(image, latent, value): built by the serving side, which owns generation."""


def steering_command(make_answer: AnswerFactory) -> Callable[..., None]:
    """The `steering` command, bound to a way of generating; service/cli.py registers it with the engine's."""

    def steering(
        encoded: Annotated[Path, typer.Option(help="Encoded directory of the SAE (gives each latent's top images).")],
        clip: Annotated[str, typer.Option(help="CLIP with a text tower: clip:PATH or open_clip:ARCH@WEIGHTS.")],
        model: Annotated[str, typer.Option(help="The vision-language model to steer (LLaVA checkpoint).")],
        sae: Annotated[str, typer.Option(help="The SAE checkpoint the latents belong to.")],
        probe_images: Annotated[Path, typer.Option(help="Images to ask about (subfolders name their true labels).")],
        out: Annotated[Path, typer.Option(help="steering.json to write.")],
        latents: Annotated[str | None, typer.Option(help="Comma-separated latents; default: the first --n-latents live ones.")] = None,
        n_latents: Annotated[int, typer.Option(help="How many latents when --latents is not given.")] = 10,
        value: Annotated[float, typer.Option(help="Value the latent is pinned to (the paper uses 100).")] = PAPER_VALUE,
        top_k: Annotated[int, typer.Option(help="Top images per prototype.")] = 16,
        layer: BlockOpt = None,
        device: DeviceOpt = "auto",
    ) -> None:
        """Steering score: CLIP agreement of the steered one-word answer with the latent's top images."""
        try:
            if layer is None:  # checked before the model loads: a missing layer should cost seconds, not a 7B load
                recorded = _recorded_layer(load_sae(sae), sae)
                if recorded == LAST_LAYER:
                    raise EvaluationError(f"the SAE {sae} was trained on the image embedding ('last'), which LLaVA "
                                          "never reads: steering needs an SAE trained on a tower block", "sae")
                layer = recorded
            answer = make_answer(model, sae, layer, str(resolve_device(device)))
            data = EncodedDir.open(encoded)
            if not data.info.root:
                raise EvaluationError(f"{encoded} records no image folder, so top images cannot be embedded", "encoded")
            batches = data.batches()
            summary = summarize_latents(batches, batches.n_latents, top_k)
            chosen = _latent_list(latents, summary.live, n_latents)
            clip_embedder = load_embedder(clip, resolve_device(device))
            if not hasattr(clip_embedder, "embed_text"):
                raise EvaluationError(f"{clip} has no text tower", "clip")
            source = FolderImages(Path(data.info.root))
            protos = prototypes(summary.top_images[chosen],
                                lambda idx: clip_embedder.embed([source.load(i) for i in idx], 0))
            probes = FolderImages(probe_images)
            images = [probes.load(i) for i in range(len(probes.ids))]
            labels = [label.replace("_", " ") for label in probes.labels] if probes.labels else None
            result = steering_score(chosen, protos, images, answer, clip_embedder,
                                    value=value, probe_labels=labels,
                                    probe_embeddings=clip_embedder.embed(images, 0) if labels else None)
            result.top_images_pooling = data.info.pooling
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out, result.model_dump_json(indent=1).encode())
        except _ERRORS as err:
            raise _fail(err) from None
        Console(stderr=True).print(f"steering score {result.steered.mean:.4f} (unsteered {result.unsteered.mean:.4f}) "
                                   f"over {len(chosen)} latents x {result.n_images} images -> {out}")

    return steering


def paper_command(make_answer: AnswerFactory) -> Callable[..., None]:
    """The `paper` command, bound to a way of generating (as `steering_command`)."""

    def paper(
        out: Annotated[Path, typer.Option(help="Folder for report.json, report.md, the images and encoded data.")],
        images: Annotated[int, typer.Option(min=100, help="Fresh shapes-world images for MS, depth and top images.")] = 1000,
        probes: Annotated[int, typer.Option(min=2, help="Probe images asked about with each latent pinned.")] = 24,
        n_latents: Annotated[int, typer.Option(min=1, help="Latents steered (highest MS).")] = 10,
        value: Annotated[float, typer.Option(help="Pin value (the paper's 100).")] = PAPER_VALUE,
        device: DeviceOpt = "auto",
    ) -> None:
        """The paper's three findings in miniature on the shipped demo model, SAE and CLIP, and the taxa tower."""
        settings = PaperSettings(images=images, probes=probes, latents=n_latents, value=value)
        try:
            report = run_paper(out, make_answer, settings, device=str(resolve_device(device)))
        except _ERRORS as err:
            raise _fail(err) from None
        taxa, ideal = report.hierarchy.taxa.levels, report.hierarchy.ideal.levels
        Console(stderr=True).print(
            f"MS SAE {report.monosemanticity.sae.mean:.3f} vs neurons {report.monosemanticity.neurons.mean:.3f}; "
            f"depth first/last level {as_figure(report.hierarchy.depth_first_level)} / "
            f"{as_figure(report.hierarchy.depth_last_level)}, taxa world rise {as_figure(taxa.rise)} (control "
            f"{as_figure(taxa.control_rise)}), reference tree rise {as_figure(ideal.rise)} (control "
            f"{as_figure(ideal.control_rise)}); "
            f"steering {report.steering.score.steered.mean:.3f} vs unsteered {report.steering.score.unsteered.mean:.3f} "
            f"-> {out / 'report.md'}")

    return paper


def _latent_list(text: str | None, live: Tensor, n: int) -> list[int]:
    if text:
        try:
            chosen = [int(x) for x in text.split(",")]
        except ValueError:
            raise EvaluationError(f"--latents {text!r} must be comma-separated integers", "latents") from None
        bad = [k for k in chosen if not 0 <= k < live.numel()]
        if bad:
            raise EvaluationError(f"latents {bad} are out of range: the SAE has {live.numel()}", "latents")
        return chosen
    return [int(k) for k in live.nonzero().squeeze(1)[:n]]
