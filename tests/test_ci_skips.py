"""The CI rule for skips (tests/ci_skips.py), run on a small inner test session."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INNER = """
import pytest

def test_needs_a_tool():
    pytest.skip("sometool is not installed")

@pytest.mark.opt_in
def test_asked_for_only():
    pytest.skip("opt-in")

@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest('pytest_plugins = ["ci_skips"]\n')
    pytester.makeini("[pytest]\nmarkers =\n    opt_in: opt-in\n")
    pytester.makepyfile(INNER)
    return pytester


def test_in_ci_a_skip_fails_but_opt_in_and_xfail_do_not(inner: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, skipped=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped in CI*sometool is not installed*"])


def test_outside_ci_a_skip_is_a_skip(inner: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    inner.runpytest("-p", "no:cacheprovider").assert_outcomes(skipped=2, xfailed=1)
