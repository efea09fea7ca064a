"""`dermlab --version` prints the installed package's version."""

from __future__ import annotations

import importlib.metadata

import pytest

import dermlab
from dermlab.cli import main


def test_version_flag_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dermlab {importlib.metadata.version('dermlab')}"
    assert dermlab.__version__ == importlib.metadata.version("dermlab")  # pyproject and __init__ agree
