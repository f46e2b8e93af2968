"""The ingress's prompt checks, with the model's own processor: what the replica would refuse, refused first.

The chat template is rendered and tokenized here, exactly as the replica will, so a conversation
that cannot be rendered, text that smuggles in the image placeholder, or a prompt that with its
image and `max_tokens` does not fit the model's context is a 422 naming the field: it never
reaches a batch, where it would cost its batch-mates time.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

from service.api.errors import APIError
from service.api.images import processor_short_side
from service.engine.prompts import PromptError, render_prompt
from service.engine.types import Conversation


class PromptChecker:
    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.image_token: str = processor.image_token
        self.image_short_side = processor_short_side(processor.image_processor)
        """What request images are shrunk to at the ingress, so no more pixels than the processor uses
        travel to the model replica."""

    @classmethod
    def load(cls, model_path: str) -> PromptChecker:
        """The processor (tokenizer and chat template; no weights) from the model's directory or hub id."""
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(model_path))

    def refuse_image_token(self, text: str, param: str) -> None:
        if self.image_token in text:
            raise APIError(422, f"text may not contain the image placeholder {self.image_token!r}: the image goes "
                                "in its own part (image_url in chat, `image` in /v1/steer)", param)

    def prompt_tokens(self, conversation: Conversation, image_tokens: int) -> int:
        """Tokens of the rendered prompt with its image placeholder expanded to `image_tokens` rows."""
        try:
            text = render_prompt(self.processor, conversation)
        except PromptError as err:
            raise APIError(422, str(err), "messages") from err
        except TemplateError as err:  # the chat template's own refusal (e.g. of a role order)
            raise APIError(422, f"the model's chat template refuses these messages: {err}", "messages") from err
        return len(self.processor.tokenizer(text)["input_ids"]) - 1 + image_tokens

    def check_context(self, prompt_tokens: int, max_tokens: int, context_tokens: int, param: str) -> None:
        if prompt_tokens + max_tokens > context_tokens:
            raise APIError(422, f"the prompt takes {prompt_tokens} tokens (image included) and max_tokens is "
                                f"{max_tokens}: {prompt_tokens + max_tokens} is more than the model's context of "
                                f"{context_tokens} tokens", param)
