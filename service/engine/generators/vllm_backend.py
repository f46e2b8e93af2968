"""Generate with vLLM from precomputed image embeddings (`enable_mm_embeds=True`).

vLLM cannot take a per-request edit inside its own CLIP tower, so the steerer runs tower, SAE and
projector and vLLM receives the post-projector embeddings as the image item of each prompt. Its
prefix cache keys on the embedding contents, so different edits never share cache entries.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from service.engine.prompts import find_stop, render_prompt
from service.engine.types import GenerationOutput, GenerationRequest, SamplingParams


class VLLMGenerator:
    """The `Generator` backed by `vllm.LLM`; `llm_kwargs` go to `vllm.LLM` (e.g. gpu_memory_utilization)."""

    def __init__(self, model: str, processor: object, dtype: str = "auto", **llm_kwargs: Any) -> None:
        from vllm import LLM

        self.processor = processor
        self.llm = LLM(model=model, dtype=dtype, enable_mm_embeds=True, limit_mm_per_prompt={"image": 1},
                       **llm_kwargs)
        self._lock = threading.Lock()

    @staticmethod
    def sampling_params(params: SamplingParams) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                  seed=params.seed, stop=params.stop or None)

    def decode(self, token_ids: list[int], stops: list[str]) -> str:
        """The answer text as the transformers backend writes it (vLLM's incremental detokenizer may
        differ in spacing), cut before the first stop string."""
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = find_stop(text, stops)
        return text if cut is None else text[:cut]

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        start = time.perf_counter()
        prompts = [
            {"prompt": render_prompt(self.processor, r.conversation),
             "multi_modal_data": {"image": r.image_embeds.detach().cpu().unsqueeze(0)}}
            for r in requests
        ]
        with self._lock:  # the offline LLM serves one caller at a time
            results = self.llm.generate(prompts, [self.sampling_params(r.params) for r in requests], use_tqdm=False)
        seconds = time.perf_counter() - start
        outputs = []
        for result, request in zip(results, requests):
            completion = result.outputs[0]
            outputs.append(GenerationOutput(
                text=self.decode(completion.token_ids, request.params.stop),
                finish_reason="length" if completion.finish_reason == "length" else "stop",
                prompt_tokens=len(result.prompt_token_ids),
                completion_tokens=len(completion.token_ids),
                seconds=seconds,
            ))
        return outputs
