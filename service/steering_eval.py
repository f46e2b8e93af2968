"""The steering engine as the generation step of `vlm-steer evaluate steering`.

sae_modules never imports the service, so the evaluation takes `answer(image, latent, value)` as a
parameter; this is the one place that builds it from a `SteeringEngine`.
"""

from __future__ import annotations

from PIL import Image

from sae_modules.evaluation.errors import EvaluationError
from sae_modules.evaluation.steering_score import PROMPT, Answer
from sae_modules.intervention_spec import Intervention
from service.engine.engine import JobFailed, SteeringEngine, steer_one
from service.engine.loading import EngineLoadError, SAEMismatchError
from service.engine.types import SamplingParams, SteerSpec

ANSWER_TOKENS = 5
SAE_ID = "sae"


def engine_answerer(model: str, sae: str, layer: int, device: str) -> Answer:
    """Greedy one-word answers from `model` with one latent of `sae` pinned (None: the unedited model).

    `layer` is the block the SAE reads (the paper's checkpoints do not record it); load problems (a
    width or block that does not fit the model) become EvaluationError naming the field, so the CLI
    prints one line instead of a traceback.
    """
    try:
        engine = SteeringEngine.load(model, {SAE_ID: sae}, device=device, sae_layers={SAE_ID: layer})
    except SAEMismatchError as err:
        raise EvaluationError(str(err), err.field) from None
    except EngineLoadError as err:
        raise EvaluationError(str(err), "model") from None
    params = SamplingParams(max_tokens=ANSWER_TOKENS)

    def answer(image: Image.Image, latent: int | None, value: float) -> str:
        steered = latent is not None
        edits = [Intervention(latent=latent, value=value)] if steered else []
        spec = SteerSpec(interventions=edits, want_steered=steered, want_default=not steered)
        try:
            return steer_one(engine, image, PROMPT, spec, params).outputs[0].text
        except JobFailed as err:
            raise EvaluationError(str(err), err.error.param or "latents") from None

    return answer
