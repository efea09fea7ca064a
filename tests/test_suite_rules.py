"""The suite's own rules: deterministic Hypothesis, a per-test time limit, and no silent skips under CI."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import settings

TESTS = Path(__file__).resolve().parent
SKIPPING_TESTS = """
import pytest

def test_skips():
    pytest.skip("no browser here")

def test_passes():
    pass

@pytest.mark.xfail(strict=True)
def test_expected_failure():
    assert False
"""


@pytest.mark.skipif("HYPOTHESIS_PROFILE" in os.environ, reason="a profile was chosen by hand (make fuzz)")
def test_hypothesis_is_derandomized_by_default() -> None:
    assert settings.default.derandomize and settings.default.database is None


def test_every_test_has_a_time_limit() -> None:
    options = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < int(options["timeout"]) <= 900


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> pytest.RunResult:
    pytester.makepyfile(test_inner=SKIPPING_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    return pytester.runpytest_subprocess("-p", "ci_rules", "-p", "no:cacheprovider")


def test_a_skip_fails_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, failed=1, xfailed=1)
    result.stdout.fnmatch_lines(["*skipped under CI=true*no browser here*"])


def test_a_module_skipped_at_import_fails_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_module='import pytest\npytest.importorskip("no_such_module_here")\n\ndef test_x():\n    pass\n')
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "ci_rules", "-p", "no:cacheprovider", "test_module.py")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped under CI=true*no_such_module_here*"])


def test_a_skip_stays_a_skip_outside_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=1, xfailed=1)
