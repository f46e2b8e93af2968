"""`SteeringEngine`: the one typed steering call the service, the CLI, `evaluate steering` and the benchmarks use.

It owns a LLaVA model, its processor, the attached SAEs, the vision steerer and a text generator
(transformers or vLLM). `steer(jobs)` validates each job once, runs tower + SAE edit + projector
for the batch in one pass, generates, and returns one `SteerResult` or `JobError` per job: a bad
job never raises out of the batch, so it fails alone. `encode(jobs)` does the same for latents.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from sae_modules.errors import ErrorKind, VlmSteerError
from sae_modules.intervention import reconstruction_stats, token_mask
from sae_modules.intervention_spec import InterventionError, TokenScope
from sae_modules.saes.base import SAE
from service.engine.loading import check_sae_fits, load_llava, load_saes, resolve_dtype
from service.engine.prompts import render_prompt
from service.engine.steerer import VisionSteerer
from service.engine.types import (
    EncodeJob,
    EncodeResult,
    GenerationOutput,
    GenerationRequest,
    JobError,
    JobListener,
    LatentValue,
    OutputType,
    SAEInfo,
    SamplingParams,
    ServingInfo,
    Stage,
    SteeredEmbeds,
    SteerJob,
    SteerMetrics,
    SteerOutput,
    SteerResult,
    SteerSpec,
    TextGenerator,
    Usage,
    finite_or_none,
    user_turn,
)
from service.error_status import http_status, kind_of_status

BACKENDS = ("transformers", "vllm")
log = logging.getLogger(__name__)


class UnknownSAEError(InterventionError):
    """A request names an SAE the engine does not hold (404 wherever it is caught)."""

    kind = ErrorKind.NOT_FOUND

    def __init__(self, sae_id: str, known: list[str]) -> None:
        super().__init__(f"unknown SAE {sae_id!r}: this engine holds {known}; GET /v1/saes lists them", "sae")


def job_error(err: Exception) -> JobError:
    """The per-job error for an exception raised while checking or running one job."""
    if isinstance(err, VlmSteerError):
        return JobError(status=http_status(err), message=str(err), param=err.field)
    log.exception("a steering job failed", exc_info=err)
    return JobError(status=500, message=f"internal error: {type(err).__name__}")


@dataclass
class _Pending:
    """A job between its embeddings and its last generated output."""

    job: SteerJob
    embeds: SteeredEmbeds
    timings: dict[Stage, float]
    outputs: dict[OutputType, GenerationOutput]


class _Fanout:
    """Routes a generator's per-request events to the job listener, and finishes each job when its
    last output ends."""

    def __init__(self, engine: SteeringEngine, keys: list[tuple[int, OutputType]], pending: dict[int, _Pending],
                 listener: JobListener | None, outcomes: list) -> None:
        self.engine, self.keys, self.pending, self.listener = engine, keys, pending, listener
        self.outcomes = outcomes
        self.ranks = {job: rank for rank, job in enumerate(pending)}

    def streams(self, index: int) -> bool:
        return self.listener is not None and self.listener.streams(self.keys[index][0])

    def delta(self, index: int, text: str) -> None:
        job, kind = self.keys[index]
        if self.listener is not None:
            self.listener.delta(job, kind, text)

    def finished(self, index: int, output: GenerationOutput) -> None:
        job, kind = self.keys[index]
        entry = self.pending[job]
        entry.outputs[kind] = output
        if len(entry.outputs) == len(entry.job.spec.output_types):
            result = self.engine._result(entry, len(self.outcomes), self.ranks[job])
            self.outcomes[job] = result
            if self.listener is not None:
                self.listener.done(job, result)

    def cancelled(self, index: int) -> bool:
        return self.listener is not None and self.listener.cancelled(self.keys[index][0])


class SteeringEngine:
    """Steered generation with SAEs attached to LLaVA's vision tower."""

    def __init__(self, model: nn.Module, processor: Any, saes: dict[str, SAE], default_sae: str,
                 generator: TextGenerator, value_bound: float = 1e4, *, model_id: str | None = None,
                 context_tokens: int | None = None) -> None:
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
        self._steerer = VisionSteerer(model, self._saes)
        self._context_tokens = context_tokens or model.config.text_config.max_position_embeddings

    @classmethod
    def load(cls, model: str, saes: dict[str, str], default_sae: str | None = None, backend: str = "transformers",
             device: str = "cpu", dtype: str | torch.dtype | None = None, value_bound: float = 1e4,
             sae_layers: dict[str, int] | None = None, engine_args: dict[str, Any] | None = None) -> SteeringEngine:
        """Load model, processor and SAE checkpoints (paths or hub ids) and build the chosen backend.

        `sae_layers` gives the block of SAEs whose checkpoint does not record it; `engine_args` go to
        vLLM's async engine (`AsyncEngineArgs`: gpu_memory_utilization, max_model_len, max_num_seqs, ...).
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
        if not saes:
            raise ValueError("at least one SAE is needed")
        llava, processor = load_llava(model, device, dtype, vision_only=backend == "vllm")
        engine_args = dict(engine_args or {})
        if backend == "vllm":
            from service.engine.generators.vllm_backend import AsyncVLLMGenerator

            engine_args.setdefault("dtype", str(resolve_dtype(dtype, device)).removeprefix("torch."))
            generator: TextGenerator = AsyncVLLMGenerator(model, processor, engine_args)
        else:
            from service.engine.generators.transformers_backend import TransformersGenerator

            generator = TransformersGenerator(llava, processor)
        return cls(llava, processor, load_saes(saes, device, sae_layers), default_sae or next(iter(saes)), generator,
                   value_bound, model_id=model, context_tokens=engine_args.get("max_model_len"))

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
        return self._steerer.n_tokens

    @property
    def image_tokens(self) -> int:
        """Image embedding rows per image: the patches, plus CLS under the `full` feature strategy."""
        full = self.model.config.vision_feature_select_strategy == "full"
        return self.n_tokens if full else self.n_tokens - 1

    def healthy(self) -> bool:
        """False once the text generator has died (a vLLM engine that crashed): the replica must be replaced."""
        return self.generator.healthy()

    def info(self, served_name: str | None = None) -> ServingInfo:
        """What the ingress needs to check requests; `layer` is the resolved block index."""
        saes = [SAEInfo(id=sae_id, layer=self._steerer.block_index[sae_id], n_latents=sae.cfg.n_latents,
                        architecture=sae.cfg.architecture, d_in=sae.cfg.d_in, default=sae_id == self._default_sae)
                for sae_id, sae in self._saes.items()]
        return ServingInfo(model_id=served_name or self._model_id, checkpoint=self._model_id,
                           created=int(time.time()), n_tokens=self.n_tokens, image_tokens=self.image_tokens,
                           context_tokens=self._context_tokens,
                           default_sae=self._default_sae, saes=saes)

    def sae(self, sae_id: str | None = None) -> SAE:
        sae_id = self._default_sae if sae_id is None else sae_id
        if sae_id not in self._saes:
            raise UnknownSAEError(sae_id, self.sae_ids)
        return self._saes[sae_id]

    def sae_block(self, sae_id: str) -> int:
        """The tower block whose output `sae_id` reads."""
        self.sae(sae_id)
        return self._steerer.block_index[sae_id]

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """Pixel values [n, 3, H, W] as LLaVA's image processor makes them."""
        rgb = [image.convert("RGB") for image in images]
        return self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]

    def validate(self, spec: SteerSpec) -> SteerSpec:
        """The spec with its SAE resolved; raises InterventionError naming the offending field."""
        sae = self.sae(spec.sae_id)
        if not spec.output_types:
            raise InterventionError("ask for at least one of the steered and the default output", "types")
        for i, intervention in enumerate(spec.interventions):
            intervention.check_against(sae.n_latents, self.n_tokens, self.value_bound, where=f"interventions.{i}.")
        return replace(spec, sae_id=spec.sae_id or self._default_sae)

    # --- the typed calls ------------------------------------------------------------------------------------

    def steer(self, jobs: list[SteerJob], listener: JobListener | None = None) -> list[SteerResult | JobError]:
        """Answers for a batch of jobs: one tower pass (per SAE), one generate call; one outcome per job.

        With a listener, each job's text is reported as it is made and its outcome as soon as it is known:
        a job refused by its checks or by the edit bound hears so before the batch generates."""
        outcomes: list[SteerResult | JobError | None] = [None] * len(jobs)
        valid: dict[int, SteerJob] = {}
        for i, job in enumerate(jobs):
            try:
                render_prompt(self.processor, job.conversation)
                valid[i] = replace(job, spec=self.validate(job.spec))
            except Exception as err:  # noqa: BLE001 - one job's failure is that job's error alone
                self._fail(i, job_error(err), outcomes, listener)
        if valid:
            try:
                self._steer_valid(valid, outcomes, listener)
            except Exception as err:  # noqa: BLE001 - a failure of the whole batch fails its unfinished jobs
                failure = job_error(err)
                for i in valid:
                    if outcomes[i] is None:
                        self._fail(i, failure, outcomes, listener)
        return outcomes

    @staticmethod
    def _fail(job: int, error: JobError, outcomes: list, listener: JobListener | None) -> None:
        outcomes[job] = error
        if listener is not None:
            listener.done(job, error)

    def _steer_valid(self, valid: dict[int, SteerJob], outcomes: list, listener: JobListener | None) -> None:
        start = time.perf_counter()
        pixels = self.preprocess([job.image for job in valid.values()])
        preprocess_s = time.perf_counter() - start
        embedded = self._steerer.steer(pixels, [job.spec for job in valid.values()], self.value_bound)
        pending: dict[int, _Pending] = {}
        for i, embeds in zip(valid, embedded):
            if isinstance(embeds, JobError):
                self._fail(i, embeds, outcomes, listener)
            else:
                pending[i] = _Pending(valid[i], embeds, {Stage.PREPROCESS: preprocess_s, **embeds.timings_s}, {})
        keys: list[tuple[int, OutputType]] = []
        requests: list[GenerationRequest] = []
        for i, entry in pending.items():
            for kind in entry.job.spec.output_types:
                rows = entry.embeds.steered if kind == "STEERED" else entry.embeds.default
                keys.append((i, kind))
                requests.append(GenerationRequest(entry.job.conversation, rows, entry.job.params))
        self.generator.generate(requests, _Fanout(self, keys, pending, listener, outcomes))

    def _result(self, entry: _Pending, batch_size: int, batch_index: int) -> SteerResult:
        outputs = [SteerOutput(type=kind, text=out.text, finish_reason=out.finish_reason,
                               usage=Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                           total_tokens=out.prompt_tokens + out.completion_tokens))
                   for kind in entry.job.spec.output_types for out in [entry.outputs[kind]]]
        timings = {**entry.timings, Stage.GENERATE: max(out.seconds for out in entry.outputs.values())}
        metrics = SteerMetrics(timings_s=timings, sae=entry.embeds.stats, embed_cosine=entry.embeds.embed_cosine)
        return SteerResult(sae=entry.job.spec.sae_id, outputs=outputs, metrics=metrics, batch_size=batch_size,
                           batch_index=batch_index)

    @torch.no_grad()
    def encode(self, jobs: list[EncodeJob]) -> list[EncodeResult | JobError]:
        """Top latents, L0 and FVU per image; one tower pass (stopping at the SAE's block) per (SAE, tokens) group."""
        outcomes: list[EncodeResult | JobError | None] = [None] * len(jobs)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, job in enumerate(jobs):
            try:
                sae_id = job.sae_id or self._default_sae
                self.sae(sae_id)
                groups.setdefault((sae_id, job.tokens), []).append(i)
            except InterventionError as err:
                outcomes[i] = job_error(err)
        for (sae_id, tokens), items in groups.items():
            start = time.perf_counter()
            try:
                found = self._encode_group(sae_id, tokens, [jobs[i] for i in items])
            except Exception as err:  # noqa: BLE001 - one group's failure is its jobs' error alone
                found = [job_error(err)] * len(items)
            elapsed = time.perf_counter() - start
            for i, outcome in zip(items, found):
                if isinstance(outcome, EncodeResult):
                    outcome.timings_s = {Stage.ENCODE: elapsed}
                    outcome.batch_size, outcome.batch_index = len(jobs), i
                outcomes[i] = outcome
        return outcomes

    def _encode_group(self, sae_id: str, tokens: TokenScope, jobs: list[EncodeJob]) -> list[EncodeResult]:
        sae = self._saes[sae_id]
        hidden = self._steerer.block_output(self.preprocess([job.image for job in jobs]),
                                            self._steerer.block_index[sae_id])
        x = hidden[:, token_mask(tokens, hidden.shape[1], hidden.device)].float()
        latents = sae.encode(x)
        results = []
        for row, job in enumerate(jobs):
            stats = reconstruction_stats(sae, x[row], latents[row])
            results.append(EncodeResult(sae=sae_id, latents=top_latents(latents[row], job.reduce, job.top_k),
                                        l0=stats.l0, fvu=finite_or_none(stats.fvu) if x.shape[1] > 1 else None))
        return results

    # --- the parts, for tests, benchmarks and research code ---------------------------------------------------

    def steer_embeds(self, pixel_values: Tensor, specs: list[SteerSpec]) -> list[SteeredEmbeds | JobError]:
        """Steered (and/or default) image embeddings; raises InterventionError on an invalid spec."""
        return self._steerer.steer(pixel_values, [self.validate(spec) for spec in specs], self.value_bound)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        return self.generator.generate(requests)

    def encode_latents(self, pixel_values: Tensor, sae_id: str | None,
                       tokens: TokenScope | list[int] = "all") -> Tensor:
        """Unedited SAE latents [n, T_selected, n_latents] at the SAE's layer."""
        sae_id = sae_id or self._default_sae
        self.sae(sae_id)
        if isinstance(tokens, list):
            bad = [t for t in tokens if not 0 <= t < self.n_tokens]
            if bad:
                raise InterventionError(f"token indices {bad[:5]} out of range: the tower has {self.n_tokens} tokens",
                                        "tokens")
        return self._steerer.encode(pixel_values, sae_id, tokens)

    def block_output(self, pixel_values: Tensor, block: int) -> Tensor:
        """The tower's output at `block` [n, T, d], running no block after it."""
        return self._steerer.block_output(pixel_values, block)


def top_latents(latents: Tensor, reduce: str, top_k: int) -> list[LatentValue]:
    """The `top_k` strongest latents of one image's [T, F] codes, each reduced over tokens."""
    pooled = latents.float().mean(dim=0) if reduce == "mean" else latents.float().amax(dim=0)
    values, indices = pooled.topk(min(top_k, pooled.numel()))
    return [LatentValue(latent=int(i), value=float(v)) for i, v in zip(indices, values) if v > 0]


def steer_one(engine: SteeringEngine, image: Image.Image, prompt: str, spec: SteerSpec,
              params: SamplingParams | None = None) -> SteerResult:
    """One image and one prompt through `engine.steer`; raises the job's error as `JobFailed`."""
    outcome = engine.steer([SteerJob(image, user_turn(prompt), spec, params or SamplingParams())])[0]
    if isinstance(outcome, JobError):
        raise JobFailed(outcome)
    return outcome


class JobFailed(VlmSteerError):
    """A single job's error, raised by `steer_one` for callers that handle one job at a time."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message, error.param)
        self.kind = kind_of_status(error.status)
        self.error = error
