"""The steering engine as the generation step of `vlm-steer evaluate steering`.

sae_modules never imports the service, so the evaluation takes `answer(image, latent, value)` as a
parameter; this is the one place that builds it from a `SteeringEngine`.
"""

from __future__ import annotations

from PIL import Image

from sae_modules.evaluation.steering_score import PROMPT, Answer
from sae_modules.intervention_spec import Intervention
from service.engine.engine import SteeringEngine
from service.engine.types import SamplingParams, SteerSpec

ANSWER_TOKENS = 5


def engine_answerer(model: str, sae: str, device: str) -> Answer:
    """Greedy one-word answers from `model` with one latent of `sae` pinned (None: the unedited model)."""
    engine = SteeringEngine.load(model, {"sae": sae}, device="cpu" if device == "auto" else device)
    params = SamplingParams(max_tokens=ANSWER_TOKENS)

    def answer(image: Image.Image, latent: int | None, value: float) -> str:
        steered = latent is not None
        edits = [Intervention(latent=latent, value=value)] if steered else []
        spec = SteerSpec(interventions=edits, want_steered=steered, want_default=not steered)
        return engine.run(image, PROMPT, spec, params)["steered" if steered else "default"]["text"]

    return answer
