"""`SteeringEngine.steer` and `.encode`: one typed call, per-job errors, streamed text, early completion."""

from __future__ import annotations

import pytest
import torch

from sae_modules.intervention_spec import Intervention
from service.engine.contracts import ShapeError, check_image_embeds
from service.engine.engine import SteeringEngine
from service.engine.types import (
    EncodeJob,
    EncodeResult,
    JobError,
    SamplingParams,
    SteerJob,
    SteerResult,
    SteerSpec,
    user_turn,
)
from tests.service_fixtures import noise_image, write_tiny_sae

PROMPT = "describe the image ."
PIN = Intervention(latent=20, value=50.0)
OVERFLOW = [Intervention(latent=20, value=1e4)] + [Intervention(latent=20, mode="mul", value=1e4)] * 3


@pytest.fixture(scope="module")
def engine(tiny_llava_dir, tmp_path_factory) -> SteeringEngine:
    return SteeringEngine.load(str(tiny_llava_dir), {"a": str(write_tiny_sae(tmp_path_factory.mktemp("sae") / "s"))})


def job(seed: int, spec: SteerSpec | None = None, max_tokens: int = 6, prompt: str = PROMPT) -> SteerJob:
    return SteerJob(noise_image(seed), user_turn(prompt), spec or SteerSpec(), SamplingParams(max_tokens=max_tokens))


class Recorder:
    """A JobListener that keeps every event in order, and cancels the jobs it is told to."""

    def __init__(self, cancel: frozenset[int] = frozenset(), stream: bool = True) -> None:
        self.events: list[tuple] = []
        self.cancel = cancel
        self.stream = stream

    def streams(self, job: int) -> bool:
        return self.stream

    def delta(self, job: int, kind: str, text: str) -> None:
        self.events.append(("delta", job, kind, text))

    def done(self, job: int, outcome: SteerResult | JobError) -> None:
        self.events.append(("done", job, outcome))

    def cancelled(self, job: int) -> bool:
        return job in self.cancel

    def text(self, job: int, kind: str) -> str:
        return "".join(e[3] for e in self.events if e[0] == "delta" and e[1] == job and e[2] == kind)


def test_bad_jobs_fail_alone_and_good_ones_match_their_solo_runs(engine) -> None:
    good = [job(0, SteerSpec([PIN], want_default=True)), job(1), job(2, SteerSpec([PIN]))]
    bad = [job(3, SteerSpec(OVERFLOW)), job(4, prompt="describe <image> ."), job(5, SteerSpec(sae_id="nope")),
           job(6, SteerSpec([Intervention(latent=999, value=1.0)]))]
    outcomes = engine.steer([bad[0], good[0], bad[1], good[1], bad[2], good[2], bad[3]])
    errors = [outcomes[i] for i in (0, 2, 4, 6)]
    assert [(e.status, e.param) for e in errors] == [(422, "interventions"), (422, "messages"), (404, "sae"),
                                                     (422, "interventions.0.latent")]
    assert "interventions [0, 1, 2, 3]" in errors[0].message and "bound" in errors[0].message
    for got, alone in zip([outcomes[i] for i in (1, 3, 5)], good):
        expected = engine.steer([alone])[0]
        assert isinstance(got, SteerResult) and got.outputs == expected.outputs
        assert got.batch_size == 7


def test_streamed_deltas_add_up_to_the_answer_and_short_jobs_finish_first(engine) -> None:
    recorder = Recorder()
    jobs = [job(0, SteerSpec([PIN], want_default=True), max_tokens=12), job(1, max_tokens=2)]
    outcomes = engine.steer(jobs, recorder)
    for i, outcome in enumerate(outcomes):
        for output in outcome.outputs:
            assert recorder.text(i, output.type) == output.text
    done = [e[1] for e in recorder.events if e[0] == "done"]
    assert done == [1, 0], "the 2-token job must be answered before the 12-token one ends"
    quiet = Recorder(stream=False)
    assert [o.outputs for o in engine.steer(jobs, quiet)] == [o.outputs for o in outcomes]
    assert [e[0] for e in quiet.events] == ["done", "done"], "a job not streamed hears only its outcome"
    refused = Recorder()
    engine.steer([job(0, max_tokens=8), job(1, SteerSpec(OVERFLOW)), job(2, SteerSpec(sae_id="nope"))], refused)
    assert [e[1] for e in refused.events if e[0] == "done"][:2] == [2, 1], "refusals come before any generation"
    assert refused.events.index(next(e for e in refused.events if e[1] == 1)) < \
        refused.events.index(next(e for e in refused.events if e[0] == "delta"))
    last_delta_of_long = max(n for n, e in enumerate(recorder.events) if e[0] == "delta" and e[1] == 0)
    assert recorder.events.index(("done", 1, outcomes[1])) < last_delta_of_long


def test_a_cancelled_job_stops_early_without_changing_its_batch_mates(engine) -> None:
    jobs = [job(0, max_tokens=12), job(1, max_tokens=12)]
    alone = engine.steer([jobs[1]])[0]
    outcomes = engine.steer(jobs, Recorder(cancel=frozenset({0})))
    assert outcomes[0].outputs[0].usage.completion_tokens == 1
    assert outcomes[1].outputs == alone.outputs


def test_encode_jobs_with_an_unknown_sae_fail_alone(engine) -> None:
    outcomes = engine.encode([EncodeJob(noise_image(0), top_k=3), EncodeJob(noise_image(0), sae_id="x")])
    assert isinstance(outcomes[0], EncodeResult) and len(outcomes[0].latents) == 3
    assert outcomes[1] == JobError(status=404, message=outcomes[1].message, param="sae")


def test_shape_contract_names_the_tensor_and_both_shapes(engine) -> None:
    with pytest.raises(ShapeError, match=r"image_embeds must have shape \[16, 64\], got \[16, 63\]"):
        check_image_embeds(torch.zeros(16, 63), 16, 64)
    with pytest.raises(ShapeError, match=r"pixel_values must have shape \[2, 3, 56, 56\]"):
        engine.steer_embeds(torch.zeros(2, 3, 50, 56), [SteerSpec(), SteerSpec()])


def test_info_reports_what_the_ingress_checks_against(engine) -> None:
    info = engine.info("tiny")
    assert (info.model_id, info.n_tokens, info.image_tokens, info.context_tokens) == ("tiny", 17, 16, 256)
    assert info.saes[0].layer == engine.sae_block("a") == 1


def test_a_seeded_job_answers_the_same_alone_streamed_or_in_a_batch(engine) -> None:
    seeded = SteerJob(noise_image(0), user_turn(PROMPT), SteerSpec([PIN], want_default=True),
                      SamplingParams(max_tokens=12, temperature=1.2, seed=7))
    alone = engine.steer([seeded])[0]
    streamed = engine.steer([seeded], Recorder())[0]
    batched = engine.steer([job(1, max_tokens=3), seeded, job(2, SteerSpec([PIN]))], Recorder())[1]
    assert alone.outputs == streamed.outputs == batched.outputs
