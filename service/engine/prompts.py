"""Turn a conversation into the prompt text both backends feed their language model.

Both render the model's own chat template with the processor, so a request reads the same to
vLLM and to transformers; only the image placeholder's expansion differs (vLLM expands it itself).
"""

from __future__ import annotations

from sae_modules.errors import VlmSteerError
from service.engine.types import Conversation


class PromptError(VlmSteerError):
    """A conversation that cannot be rendered for this model; the message says why."""


def render_prompt(processor: object, conversation: Conversation) -> str:
    """The chat-template text with exactly one image placeholder, ready for the assistant's answer."""
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    count = text.count(processor.image_token)
    if count != 1:
        raise PromptError(f"the conversation must hold exactly one image, found {count}", "messages")
    return text


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def shown_prefix(text: str, stops: list[str]) -> str:
    """The part of a growing answer safe to stream now: up to its last whitespace (a token may still
    change how the last word decodes) and short of anything that could become the start of a stop string."""
    hold = max((len(stop) - 1 for stop in stops), default=0)
    safe = text[: len(text) - hold] if hold else text
    return safe[: max(safe.rfind(" "), safe.rfind("\n")) + 1]
