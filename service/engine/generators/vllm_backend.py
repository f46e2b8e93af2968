"""Generate with vLLM's async engine (`AsyncLLM`) from precomputed image embeddings (`enable_mm_embeds=True`).

vLLM cannot take a per-request edit inside its own CLIP tower, so the steerer runs tower, SAE and
projector and vLLM receives the post-projector embeddings as the image item of each prompt. Its
prefix cache keys on the embedding contents, so different edits never share cache entries.

Every request is submitted as its own stream and vLLM batches continuously: a short answer ends
while long ones keep decoding, and requests from later steering batches join the running batch.
The engine lives on its own event loop in a background thread, so the steering engine's worker
thread calls it like any other `TextGenerator`. A request whose listener reports it cancelled
(its client left) is aborted by id; a dead engine makes `healthy()` false, and so the replica.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from service.engine.contracts import check_image_embeds
from service.engine.prompts import find_stop, render_prompt, shown_prefix
from service.engine.types import GenerationListener, GenerationOutput, GenerationRequest, SamplingParams


def _ray_stat_loggers() -> list[Any] | None:
    """Inside a Ray Serve replica, vLLM's engine metrics go out through Ray's metrics agent (the
    `ray_vllm_*` series the Grafana dashboard and the engine-down alert read); elsewhere (the parity
    script, a plain process) vLLM keeps its default loggers."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger]


class AsyncVLLMGenerator:
    """The `TextGenerator` backed by `vllm.v1.engine.async_llm.AsyncLLM`.

    `engine_args` are `AsyncEngineArgs` fields (gpu_memory_utilization, max_model_len, max_num_seqs,
    tensor_parallel_size, enforce_eager, dtype, ...)."""

    def __init__(self, model: str, processor: Any, engine_args: dict[str, Any]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(model=model, enable_mm_embeds=True, limit_mm_per_prompt={"image": 1}, **engine_args)

        async def start() -> Any:  # AsyncLLM binds its output handler to the loop it is built on
            return AsyncLLM.from_engine_args(args, stat_loggers=_ray_stat_loggers())

        self.engine = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        self.width = self.engine.model_config.get_hidden_size()

    def healthy(self) -> bool:
        return self._thread.is_alive() and not self.engine.errored

    @staticmethod
    def sampling_params(params: SamplingParams) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                  seed=params.seed, stop=params.stop or None)

    def decode(self, token_ids: list[int], stops: list[str]) -> str:
        """The answer text as the transformers backend writes it (vLLM's incremental detokenizer may
        differ in spacing), cut before the first stop string."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = find_stop(text, stops)
        return text if cut is None else text[:cut]

    def generate(self, requests: list[GenerationRequest],
                 listener: GenerationListener | None = None) -> list[GenerationOutput]:
        for request in requests:
            check_image_embeds(request.image_embeds, request.image_embeds.shape[0], self.width)
        futures = [asyncio.run_coroutine_threadsafe(self._stream(i, request, listener), self._loop)
                   for i, request in enumerate(requests)]
        return [future.result() for future in futures]

    async def _stream(self, index: int, request: GenerationRequest,
                      listener: GenerationListener | None) -> GenerationOutput:
        """One request as its own vLLM stream: deltas as tokens arrive, abort when its client left."""
        start = time.perf_counter()
        request_id = f"steer-{uuid.uuid4().hex}"
        prompt = {"prompt": render_prompt(self.processor, request.conversation),
                  "multi_modal_data": {"image": request.image_embeds.detach().cpu().unsqueeze(0)}}
        stops, shown, final = request.params.stop, "", None
        async for output in self.engine.generate(prompt, self.sampling_params(request.params), request_id):
            final = output
            if listener is None:
                continue
            if listener.cancelled(index):
                await self.engine.abort(request_id)
                break
            if not listener.streams(index):
                continue
            safe = shown_prefix(self.decode(list(output.outputs[0].token_ids), stops), stops)
            if len(safe) > len(shown) and safe.startswith(shown):
                listener.delta(index, safe[len(shown):])
                shown = safe
        tokens = list(final.outputs[0].token_ids) if final is not None else []
        text = self.decode(tokens, stops)
        result = GenerationOutput(
            text=text,
            finish_reason="length" if final is not None and final.outputs[0].finish_reason == "length" else "stop",
            prompt_tokens=len(final.prompt_token_ids) if final is not None else 0,
            completion_tokens=len(tokens),
            seconds=time.perf_counter() - start,
        )
        if listener is not None:
            rest = text[len(shown):] if text.startswith(shown) else ""
            if rest and listener.streams(index):
                listener.delta(index, rest)
            listener.finished(index, result)
        return result

    def shutdown(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
