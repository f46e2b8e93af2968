"""The vision steerer: LLaVA's own image-feature path with per-image SAE edits at the SAE's block.

One forward hook on the SAE's block does the work. It edits each image's block output and, when
both the steered and the default embeddings are wanted, appends the untouched rows to the batch:
the blocks before the SAE run once, the rest of the tower and the projector run on both copies in
one batch. Feature selection (`vision_feature_layer`, `vision_feature_select_strategy`) and the
projector are LLaVA's own `get_image_features`, so the steered path stays faithful to the model.
Images whose specs name different SAEs are grouped: one tower pass per SAE. An image whose edit
fails (edited values past the bound) gets a `JobError` in its place; its batch-mates are unaffected.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from sae_modules.activations.blocks import capture_block_output, resolve_layer, vision_blocks
from sae_modules.intervention import edit_activations, reconstruction_stats, token_mask
from sae_modules.intervention_spec import InterventionError, TokenScope
from sae_modules.saes.base import SAE
from service.engine.contracts import check_pixel_values
from service.engine.types import (
    JobError,
    LatentChange,
    SAEStats,
    Stage,
    SteeredEmbeds,
    SteerSpec,
    finite_or_none,
)


@contextmanager
def replace_block_output(block: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Route `block`'s hidden-state output through `fn` for the duration of the context.

    The hook is prepended so that transformers' own hidden-state recorders see the new output.
    """

    def hook(module: nn.Module, args: tuple, output: Tensor | tuple) -> Tensor | tuple:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = block.register_forward_hook(hook, prepend=True)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class _Plan:
    """What one tower pass must produce for one SAE's images, and where each output row lands."""

    sae: SAE
    items: list[int]
    specs: list[SteerSpec]
    value_bound: float | None
    rows: list[tuple[int, str]] = field(default_factory=list)
    stats: dict[int, SAEStats] = field(default_factory=dict)
    errors: dict[int, JobError] = field(default_factory=dict)
    edit_s: float = 0.0


class VisionSteerer:
    """Image embeddings for LLaVA with SAE latents edited inside the vision tower."""

    def __init__(self, model: nn.Module, saes: dict[str, SAE]) -> None:
        self.model = model
        self.saes = saes
        self.blocks = vision_blocks(model)
        self.block_index = {sid: resolve_layer(sae.cfg.source.layer, len(self.blocks)) for sid, sae in saes.items()}
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.n_tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        self._lock = threading.Lock()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.model.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.model.vision_tower.parameters()).device

    @torch.no_grad()
    def steer(self, pixel_values: Tensor, specs: list[SteerSpec],
              value_bound: float | None = None) -> list[SteeredEmbeds | JobError]:
        """Embeddings [P, H] per image; each spec must already name its SAE (`sae_id` not None).

        With `value_bound`, an image whose edited latents end beyond it gets a 422 `JobError`."""
        check_pixel_values(pixel_values, len(specs), self.image_size)
        pixel_values = pixel_values.to(self.device, self.dtype)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, spec in enumerate(specs):
            groups[spec.sae_id].append(i)
        results: list[SteeredEmbeds | JobError | None] = [None] * len(specs)
        with self._lock:
            for sae_id, items in groups.items():
                plan = _Plan(self.saes[sae_id], items, [specs[i] for i in items], value_bound)
                start = time.perf_counter()
                with replace_block_output(self.blocks[self.block_index[sae_id]], partial(self._edit, plan)):
                    features = self._image_features(pixel_values[items])
                elapsed = time.perf_counter() - start
                outputs: dict[int, dict[str, Tensor]] = defaultdict(dict)
                for row, (item, kind) in zip(features, plan.rows):
                    outputs[item][kind] = row
                for item, spec in zip(items, plan.specs):
                    results[item] = plan.errors.get(item) or self._result(
                        spec, outputs[item], plan.stats[item], elapsed, plan.edit_s)
        return results

    def _edit(self, plan: _Plan, hidden: Tensor) -> Tensor:
        """The hook body: steered rows for the images that want them, then untouched default rows.

        A failed image keeps one untouched row (so the batch never empties) whose output is dropped."""
        start = time.perf_counter()
        steered, defaults = [], []
        for row, (item, spec) in enumerate(zip(plan.items, plan.specs)):
            x = hidden[row]
            latents = plan.sae.encode(x.float()) if spec.want_stats else None
            stats = SAEStats()
            if latents is not None:
                recon = reconstruction_stats(plan.sae, x, latents)
                stats = SAEStats(l0=finite_or_none(recon.l0), fvu=finite_or_none(recon.fvu))
            if spec.want_steered:
                try:
                    edit = edit_activations(plan.sae, x, spec.interventions, use_error_term=spec.use_error_term,
                                            pre_zero=spec.pre_zero, latents=latents, value_bound=plan.value_bound)
                except InterventionError as err:
                    plan.errors[item] = JobError(status=422, message=str(err), param=err.field)
                    steered.append(x)
                    plan.rows.append((item, "failed"))
                    continue
                stats.latents = [LatentChange(latent=k, before=b, after=a)
                                 for k, b, a in zip(edit.latents, edit.before, edit.after)]
                steered.append(edit.output.to(hidden.dtype))
                plan.rows.append((item, "steered"))
            plan.stats[item] = stats
        for row, (item, spec) in enumerate(zip(plan.items, plan.specs)):
            if item not in plan.errors and (spec.want_default or (spec.want_stats and spec.want_steered)):
                defaults.append(hidden[row])
                plan.rows.append((item, "default"))
        plan.edit_s = time.perf_counter() - start
        return torch.stack(steered + defaults)

    def _image_features(self, pixel_values: Tensor) -> list[Tensor]:
        out = self.model.get_image_features(pixel_values=pixel_values)
        features = getattr(out, "pooler_output", out)
        return list(features)

    @staticmethod
    def _result(spec: SteerSpec, rows: dict[str, Tensor], stats: SAEStats, tower_s: float,
                edit_s: float) -> SteeredEmbeds:
        steered, default = rows.get("steered"), rows.get("default")
        cosine = None
        if steered is not None and default is not None:
            cosine = torch.nn.functional.cosine_similarity(steered.float(), default.float(), dim=-1)
            cosine = finite_or_none(cosine.mean().item())
        return SteeredEmbeds(
            steered=steered,
            default=default if spec.want_default else None,
            stats=stats,
            embed_cosine=cosine,
            timings_s={Stage.TOWER: tower_s - edit_s, Stage.SAE: edit_s},
        )

    @torch.no_grad()
    def block_output(self, pixel_values: Tensor, block: int) -> Tensor:
        """The tower's output at `block` [n, T, d], running no block after it."""
        with self._lock, capture_block_output(self.blocks[block], stop=True) as captured:
            self.model.model.vision_tower(pixel_values.to(self.device, self.dtype))
        return captured.output

    @torch.no_grad()
    def encode(self, pixel_values: Tensor, sae_id: str, tokens: TokenScope | list[int] = "all") -> Tensor:
        """SAE latents [n, T_selected, n_latents] (fp32) of the unedited activations at the SAE's block."""
        hidden = self.block_output(pixel_values, self.block_index[sae_id])
        mask = token_mask(tokens, hidden.shape[1], hidden.device)
        return self.saes[sae_id].encode(hidden[:, mask].float())
