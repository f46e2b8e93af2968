"""Generate with a transformers LLaVA from precomputed image embeddings, streaming each row as it goes.

The prompt's image placeholder is expanded to one token per embedding row (as LLaVA's processor
does), the token embeddings are built here and the image rows scattered over the placeholder
positions, then `generate` runs on `inputs_embeds` with left padding. Requests are batched when
they sample alike; a seeded sampled request runs alone under its own RNG state, so its output
does not depend on what else was in the batch. Groups run shortest first.

A `RowTracker` sees every new token of every row (it is the batch's stopping criterion): it
ends each row at its own EOS, stop string, `max_tokens` or cancellation, reports the row's new
text and, the moment the row ends, its finished output, so a short answer is delivered while
longer rows of the same batch still run, and a row whose client left stops using its slot.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import StoppingCriteria, StoppingCriteriaList

from service.engine.contracts import check_image_embeds
from service.engine.prompts import find_stop, render_prompt, shown_prefix
from service.engine.types import (
    FinishReason,
    GenerationListener,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
)


def _batch_key(index: int, params: SamplingParams) -> tuple:
    if params.temperature == 0:
        return ("greedy",)
    if params.seed is not None:
        return ("seeded", index)
    return ("sampled", params.temperature, params.top_p)


@dataclass
class _Row:
    index: int
    params: SamplingParams
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    shown: str = ""
    output: GenerationOutput | None = None


class RowTracker(StoppingCriteria):
    """Per-row end conditions, incremental text and early completion for one `generate` call.

    Text is shown only up to the last whitespace, and held back while it could still be the start
    of a stop string, so what a listener has been shown is always a prefix of the final answer."""

    def __init__(self, rows: list[_Row], tokenizer: object, eos_ids: set[int], start: float,
                 listener: GenerationListener | None) -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.start = start
        self.listener = listener

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: object) -> Tensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if row.output is None:
                self._step(row, token)
        return torch.tensor([row.output is not None for row in self.rows], device=input_ids.device)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _step(self, row: _Row, token: int) -> None:
        if token in self.eos_ids:
            self._finish(row, "stop", counted=len(row.tokens) + 1)
            return
        row.tokens.append(token)
        streams = self.listener is not None and self.listener.streams(row.index)
        text = self._decode(row.tokens) if streams or row.params.stop else ""  # decoding every step costs
        cut = find_stop(text, row.params.stop)
        if cut is not None:
            self._finish(row, "stop", counted=len(row.tokens), text=text[:cut])
        elif len(row.tokens) >= row.params.max_tokens:
            self._finish(row, "length", counted=len(row.tokens))
        elif self.listener is not None and self.listener.cancelled(row.index):
            self._finish(row, "stop", counted=len(row.tokens))
        elif streams:
            self._show(row, text)

    def _show(self, row: _Row, text: str) -> None:
        safe = shown_prefix(text, row.params.stop)
        if len(safe) > len(row.shown) and safe.startswith(row.shown):
            self.listener.delta(row.index, safe[len(row.shown):])
            row.shown = safe

    def _finish(self, row: _Row, reason: FinishReason, counted: int, text: str | None = None) -> None:
        text = self._decode(row.tokens) if text is None else text
        row.output = GenerationOutput(text=text, finish_reason=reason, prompt_tokens=row.prompt_tokens,
                                      completion_tokens=counted, seconds=time.perf_counter() - self.start)
        if self.listener is not None:
            rest = text[len(row.shown):] if text.startswith(row.shown) else ""
            if rest and self.listener.streams(row.index):
                self.listener.delta(row.index, rest)
            self.listener.finished(row.index, row.output)

    def end(self) -> list[GenerationOutput]:
        """Outputs of all rows; rows the loop left unfinished (no tokens at all) end as `length`."""
        for row in self.rows:
            if row.output is None:
                self._finish(row, "length", counted=len(row.tokens))
        return [row.output for row in self.rows]


class TransformersGenerator:
    """The `TextGenerator` for a LlavaForConditionalGeneration on any device."""

    def __init__(self, model: nn.Module, processor: object) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = model.config.image_token_id
        self.width = model.config.text_config.hidden_size
        self.eos_ids = self._eos_ids()
        self._lock = threading.Lock()

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return set(eos) if isinstance(eos, list) else {eos}

    def healthy(self) -> bool:
        return True

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Token ids of the rendered prompt with the placeholder expanded to one token per image row."""
        text = render_prompt(self.processor, request.conversation)
        image_token = self.processor.image_token
        text = text.replace(image_token, image_token * request.image_embeds.shape[0])
        return self.tokenizer(text)["input_ids"]

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest],
                 listener: GenerationListener | None = None) -> list[GenerationOutput]:
        for request in requests:
            check_image_embeds(request.image_embeds, request.image_embeds.shape[0], self.width)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[_batch_key(i, request.params)].append(i)
        ordered = sorted(groups.values(), key=lambda items: max(requests[i].params.max_tokens for i in items))
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        with self._lock:  # one generate at a time: a seeded request sets the global RNG state
            for items in ordered:
                for i, output in zip(items, self._generate_batch(items, requests, listener)):
                    outputs[i] = output
        return outputs

    def _generate_batch(self, items: list[int], all_requests: list[GenerationRequest],
                        listener: GenerationListener | None) -> list[GenerationOutput]:
        start = time.perf_counter()
        requests = [all_requests[i] for i in items]
        ids = [self.prompt_ids(r) for r in requests]
        rows = [_Row(i, r.params, len(p)) for i, r, p in zip(items, requests, ids)]
        tracker = RowTracker(rows, self.tokenizer, self.eos_ids, start, listener)
        embeds, attention = self._inputs(ids, [r.image_embeds for r in requests])
        params = requests[0].params
        kwargs = {
            "inputs_embeds": embeds,
            "attention_mask": attention,
            "max_new_tokens": max(r.params.max_tokens for r in requests),
            "pad_token_id": self._pad_id(),
            "do_sample": params.temperature > 0,
            "stopping_criteria": StoppingCriteriaList([tracker]),
        }
        if params.temperature > 0:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=None)
        if params.temperature > 0 and params.seed is not None:
            with torch.random.fork_rng(devices=[embeds.device] if embeds.device.type == "cuda" else []):
                torch.manual_seed(params.seed)
                self.model.generate(**kwargs)
        else:
            self.model.generate(**kwargs)
        return tracker.end()

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
