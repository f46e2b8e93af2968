"""Generate with a transformers LLaVA from precomputed image embeddings.

The prompt's image placeholder is expanded to one token per embedding row (as LLaVA's processor
does), the token embeddings are built here and the image rows scattered over the placeholder
positions, then `generate` runs on `inputs_embeds` with left padding. Requests are batched when
they sample alike; a seeded sampled request runs alone under its own RNG state, so its output
does not depend on what else was in the batch.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import torch
from torch import Tensor, nn
from transformers import StoppingCriteria, StoppingCriteriaList

from service.engine.prompts import find_stop, render_prompt
from service.engine.types import GenerationOutput, GenerationRequest, SamplingParams


class StopOnStrings(StoppingCriteria):
    """Ends a row once its decoded answer holds a stop string.

    transformers' own `stop_strings` needs a tokenizer whose vocabulary it can rebuild as text,
    which word-level and some sentencepiece tokenizers are not; decoding the answer works for all.
    """

    def __init__(self, tokenizer: object, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: object) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return torch.tensor([find_stop(text, self.stops) is not None for text in texts], device=input_ids.device)


def _batch_key(index: int, params: SamplingParams) -> tuple:
    if params.temperature == 0:
        return ("greedy", tuple(params.stop))
    if params.seed is not None:
        return ("seeded", index)
    return ("sampled", params.temperature, params.top_p, tuple(params.stop))


class TransformersGenerator:
    """The `Generator` for a LlavaForConditionalGeneration on any device."""

    def __init__(self, model: nn.Module, processor: object) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = model.config.image_token_id
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return set(eos) if isinstance(eos, list) else {eos}

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the rendered prompt with the placeholder expanded to one token per image row."""
        text = render_prompt(self.processor, request.conversation)
        image_token = self.processor.image_token
        text = text.replace(image_token, image_token * request.image_embeds.shape[0])
        return self.tokenizer(text)["input_ids"]

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[_batch_key(i, request.params)].append(i)
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        with self._lock:  # one generate at a time: a seeded request sets the global RNG state
            for items in groups.values():
                batch = [requests[i] for i in items]
                for i, output in zip(items, self._generate_batch(batch)):
                    outputs[i] = output
        return outputs

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        start = time.perf_counter()
        ids = [self.prompt_ids(r) for r in requests]
        embeds, attention = self._inputs(ids, [r.image_embeds for r in requests])
        params = requests[0].params
        kwargs = {
            "inputs_embeds": embeds,
            "attention_mask": attention,
            "max_new_tokens": max(r.params.max_tokens for r in requests),
            "pad_token_id": self._pad_id(),
            "do_sample": params.temperature > 0,
        }
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=None)
        if params.stop:
            kwargs.update(stopping_criteria=StoppingCriteriaList([StopOnStrings(self.tokenizer, params.stop)]))
        if params.temperature > 0 and params.seed is not None:
            with torch.random.fork_rng(devices=[embeds.device] if embeds.device.type == "cuda" else []):
                torch.manual_seed(params.seed)
                generated = self.model.generate(**kwargs)
        else:
            generated = self.model.generate(**kwargs)
        seconds = time.perf_counter() - start
        return [self._output(row.tolist(), r.params, len(p), seconds) for row, r, p in zip(generated, requests, ids)]

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return min(self.eos_ids) if pad is None else pad

    def _inputs(self, ids: list[list[int]], images: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Left-padded inputs_embeds with each image's rows at its placeholder tokens, and the mask."""
        device = self.model.device
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), self._pad_id(), dtype=torch.long, device=device)
        attention = torch.zeros((len(ids), width), dtype=torch.long, device=device)
        for row, tokens in enumerate(ids):
            input_ids[row, width - len(tokens):] = torch.tensor(tokens, device=device)
            attention[row, width - len(tokens):] = 1
        embeds = self.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.image_token_id) & attention.bool()
        embeds[mask] = torch.cat([image.to(device, embeds.dtype) for image in images])
        return embeds, attention

    def _output(self, tokens: list[int], params: SamplingParams, prompt_tokens: int, seconds: float) -> GenerationOutput:
        tokens = tokens[: params.max_tokens]
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        finish = "stop" if end is not None else "length"
        kept = tokens if end is None else tokens[:end]
        count = len(kept) if end is None else end + 1
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cut = find_stop(text, params.stop)
        if cut is not None:
            count = next(n for n in range(1, len(kept) + 1)
                         if find_stop(self.tokenizer.decode(kept[:n], skip_special_tokens=True), params.stop) is not None)
            text, finish = text[:cut], "stop"
        return GenerationOutput(text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
                                completion_tokens=count, seconds=seconds)
