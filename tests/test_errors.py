"""One error hierarchy: every library error a user can cause maps to one HTTP status and one exit code."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from sae_modules.activations.errors import ExtractError
from sae_modules.activations.shards import ShardError
from sae_modules.cli_errors import EXIT_CODES, IO_EXIT_CODE, reported_errors
from sae_modules.errors import ErrorKind, VlmSteerError
from sae_modules.formats.errors import CheckpointError
from sae_modules.intervention_spec import InterventionError
from sae_modules.metrics import MetricsInputError
from service.config import ConfigError
from service.engine.engine import JobFailed, UnknownSAEError
from service.engine.loading import EngineLoadError, SAEMismatchError
from service.engine.prompts import PromptError
from service.engine.types import JobError
from service.error_status import HTTP_STATUS, http_status, kind_of_status

LIBRARY_ERRORS = [ExtractError, ShardError, CheckpointError, InterventionError, MetricsInputError, ConfigError,
                  SAEMismatchError, PromptError, EngineLoadError]


@pytest.mark.parametrize("error", LIBRARY_ERRORS)
def test_library_errors_share_the_base_and_carry_their_field(error: type[VlmSteerError]) -> None:
    err = error("bad thing", "some.field")
    assert isinstance(err, VlmSteerError) and isinstance(err, ValueError)
    assert err.field == "some.field" and str(err) == "bad thing"
    assert http_status(err) in (404, 422, 503) and EXIT_CODES[err.kind] in (1, 2)


def test_kinds_map_to_statuses_and_back() -> None:
    assert http_status(UnknownSAEError("x", ["demo"])) == 404
    assert http_status(InterventionError("latent out of range", "interventions.0.latent")) == 422
    assert http_status(EngineLoadError("no model")) == 503
    for kind, status in HTTP_STATUS.items():
        assert kind_of_status(status) is kind
    assert kind_of_status(500) is ErrorKind.UNAVAILABLE and kind_of_status(413) is ErrorKind.INVALID


def test_a_failed_job_keeps_its_status_kind_and_field() -> None:
    failed = JobFailed(JobError(status=404, message="unknown SAE 'x'", param="sae"))
    assert failed.kind is ErrorKind.NOT_FOUND and failed.field == "sae" and http_status(failed) == 404


def _command(raised: Exception):
    app = typer.Typer()

    @app.command()
    def run() -> None:
        with reported_errors({"layer": "--layer"}, io_action="could not write out/"):
            raise raised

    return app


@pytest.mark.parametrize(("raised", "code", "line"), [
    (SAEMismatchError("the SAE records no layer", "layer"), 2, "error: --layer: the SAE records no layer"),
    (CheckpointError("not a checkpoint", "sae"), 2, "error: sae: not a checkpoint"),
    (EngineLoadError("cannot load the model"), 1, "error: cannot load the model"),
    (PermissionError(13, "Permission denied"), IO_EXIT_CODE, "error: could not write out/: [Errno 13] Permission denied"),
])
def test_cli_reports_one_line_with_the_flag_and_the_kind_s_exit_code(raised, code, line) -> None:
    result = CliRunner().invoke(_command(raised), [])
    assert result.exit_code == code
    assert result.stderr.strip() == line and "Traceback" not in result.output
