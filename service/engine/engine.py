"""`SteeringEngine`: one object that the HTTP service, the CLI and the benchmarks drive.

It owns a LLaVA model, its processor, the attached SAEs, the vision steerer and a generator
(transformers or vLLM), validates steering specs against the SAE and tower they land on, and
turns images + prompts + specs into steered and default answers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from sae_modules.intervention_spec import InterventionError, TokenScope
from sae_modules.saes.base import SAE
from service.engine.loading import check_sae_fits, load_llava, load_saes, resolve_dtype
from service.engine.steerer import VisionSteerer
from service.engine.types import (
    GenerationOutput,
    GenerationRequest,
    Generator,
    SamplingParams,
    SteeredEmbeds,
    SteerSpec,
    user_turn,
)

BACKENDS = ("transformers", "vllm")


class UnknownSAEError(InterventionError):
    """A request names an SAE the engine does not hold."""

    def __init__(self, sae_id: str, known: list[str]) -> None:
        super().__init__(f"unknown SAE {sae_id!r}: this engine holds {known}", "sae_id")


class SteeringEngine:
    """Steered generation with SAEs attached to LLaVA's vision tower."""

    def __init__(self, model: nn.Module, processor: Any, saes: dict[str, SAE], default_sae: str, generator: Generator,
                 value_bound: float = 1e4, *, model_id: str | None = None) -> None:
        if default_sae not in saes:
            raise UnknownSAEError(default_sae, sorted(saes))
        self.model = model
        self.processor = processor
        self.generator = generator
        self.value_bound = value_bound
        self._model_id = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        for sae_id, sae in saes.items():
            check_sae_fits(model, self._model_id, sae, sae_id)
        self._saes = {sae_id: sae.to(model.device).float().eval() for sae_id, sae in saes.items()}
        self._default_sae = default_sae
        self.steerer = VisionSteerer(model, self._saes)

    @classmethod
    def load(cls, model: str, saes: dict[str, str], default_sae: str | None = None, backend: str = "transformers",
             device: str = "cpu", dtype: str | torch.dtype | None = None, value_bound: float = 1e4,
             sae_layers: dict[str, int] | None = None, **backend_kwargs: Any) -> SteeringEngine:
        """Load model, processor and SAE checkpoints (paths or hub ids) and build the chosen backend.

        `sae_layers` gives the block of SAEs whose checkpoint does not record it; `backend_kwargs`
        go to `vllm.LLM` (e.g. gpu_memory_utilization, max_model_len).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        if not saes:
            raise ValueError("at least one SAE is needed")
        llava, processor = load_llava(model, device, dtype, vision_only=backend == "vllm")
        if backend == "vllm":
            from service.engine.generators.vllm_backend import VLLMGenerator

            vllm_dtype = str(resolve_dtype(dtype, device)).removeprefix("torch.")
            generator: Generator = VLLMGenerator(model, processor, **{"dtype": vllm_dtype, **backend_kwargs})
        else:
            from service.engine.generators.transformers_backend import TransformersGenerator

            generator = TransformersGenerator(llava, processor)
        return cls(llava, processor, load_saes(saes, device, sae_layers), default_sae or next(iter(saes)), generator,
                   value_bound, model_id=model)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def sae_ids(self) -> list[str]:
        return list(self._saes)

    @property
    def default_sae_id(self) -> str:
        return self._default_sae

    @property
    def n_tokens(self) -> int:
        """Tokens in the tower's sequence (CLS + patches): the range of explicit token indices."""
        return self.steerer.n_tokens

    def sae(self, sae_id: str | None = None) -> SAE:
        sae_id = self._default_sae if sae_id is None else sae_id
        if sae_id not in self._saes:
            raise UnknownSAEError(sae_id, self.sae_ids)
        return self._saes[sae_id]

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """Pixel values [n, 3, H, W] as LLaVA's image processor makes them."""
        rgb = [image.convert("RGB") for image in images]
        return self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]

    def validate(self, spec: SteerSpec) -> SteerSpec:
        """The spec with its SAE resolved; raises InterventionError naming the offending field."""
        sae = self.sae(spec.sae_id)
        if not (spec.want_steered or spec.want_default):
            raise InterventionError("ask for at least one of the steered and the default output", "types")
        for i, intervention in enumerate(spec.interventions):
            intervention.check_against(sae.n_latents, self.n_tokens, self.value_bound, where=f"interventions[{i}].")
        return replace(spec, sae_id=spec.sae_id or self._default_sae)

    def steer_embeds(self, pixel_values: Tensor, specs: list[SteerSpec]) -> list[SteeredEmbeds]:
        return self.steerer.steer(pixel_values, [self.validate(spec) for spec in specs])

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return self.generator.generate(requests)

    def encode(self, pixel_values: Tensor, sae_id: str | None, tokens: TokenScope | list[int] = "all") -> Tensor:
        """Unedited SAE latents [n, T_selected, n_latents] at the SAE's layer."""
        sae_id = sae_id or self._default_sae
        self.sae(sae_id)
        if isinstance(tokens, list):
            bad = [t for t in tokens if not 0 <= t < self.n_tokens]
            if bad:
                raise InterventionError(f"token indices {bad[:5]} out of range: the tower has {self.n_tokens} tokens",
                                        "tokens")
        return self.steerer.encode(pixel_values, sae_id, tokens)

    def run(self, image: Image.Image, prompt: str, spec: SteerSpec, params: SamplingParams | None = None) -> dict:
        """One image and prompt, end to end: answers for the outputs the spec wants, statistics, timings."""
        params = params or SamplingParams()
        start = time.perf_counter()
        embeds = self.steer_embeds(self.preprocess([image]), [spec])[0]
        wanted = {"steered": embeds.steered, "default": embeds.default}
        wanted = {kind: rows for kind, rows in wanted.items() if rows is not None}
        requests = [GenerationRequest(user_turn(prompt), rows, params) for rows in wanted.values()]
        answers = dict(zip(wanted, self.generate(requests)))
        return {
            **{kind: asdict(answer) for kind, answer in answers.items()},
            "stats": embeds.stats.model_dump(),
            "timings_s": {**embeds.timings_s, "total_s": time.perf_counter() - start},
        }
