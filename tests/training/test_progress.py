"""Logs people can read: one bar per stage on a terminal, one plain line per epoch in a log file."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

from dermlab.config import Config, apply_overrides
from dermlab.errors import ConfigError
from dermlab.training import progress
from dermlab.training.run import train_run

TINY = ["model.name=test_efficientnet", "model.weights=none", "model.input_size=[32,32]", "data.num_workers=0",
        "data.batch_size=8", "train.stage1_epochs=2", "train.stage2_epochs=1", "train.feature_views=1"]
EPOCH_LINE = re.compile(r"^(stage[12]) epoch (\d+)/(\d+): (.+) \(\d+\.\d s\)$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("value", "terminal", "mode"),
    [(None, False, "lines"), (None, True, "bar"), ("auto", True, "bar"), ("1", False, "lines"),
     ("bar", False, "bar"), ("lines", True, "lines"), ("0", True, "off"), ("off", False, "off"), (" Lines ", True, "lines")],
)
def test_progress_mode_follows_the_environment_and_the_terminal(monkeypatch, value, terminal, mode) -> None:
    if value is None:
        monkeypatch.delenv("DERMLAB_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("DERMLAB_PROGRESS", value)
    monkeypatch.setattr(sys, "stdout", _Terminal() if terminal else io.StringIO())
    assert progress.progress_mode() == mode
    assert progress.show_bars() == (mode == "bar")


def test_an_unknown_progress_setting_is_one_line(monkeypatch) -> None:
    monkeypatch.setenv("DERMLAB_PROGRESS", "fancy")
    with pytest.raises(ConfigError, match="DERMLAB_PROGRESS='fancy' is not one of .*bar.*lines"):
        progress.progress_mode()


@pytest.mark.slow  # trains for real (two stages, three epochs)
def test_a_log_file_gets_one_plain_line_per_epoch_and_no_bar(ham_dir: Path, tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.delenv("DERMLAB_PROGRESS", raising=False)  # the default: decided by stdout, which is not a terminal
    train_run(apply_overrides(Config(), [f"data.path={ham_dir}", *TINY]), tmp_path / "run")
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert "\r" not in log and "\x1b" not in log  # no bar refreshes, no cursor movement
    lines = captured.out.splitlines()
    assert "" not in lines  # no empty lines from nested bars
    epochs = [EPOCH_LINE.match(line) for line in lines if EPOCH_LINE.match(line)]
    assert [(m[1], int(m[2]), int(m[3])) for m in epochs] == [("stage1", 1, 2), ("stage1", 2, 2), ("stage2", 1, 1)]
    for match in epochs:
        assert "train/loss " in match[4] and "val/loss " in match[4] and "val/balanced_accuracy " in match[4]
    plan = [line for line in lines if re.match(r"^stage\d: (the head|the whole network|the last)", line)]
    assert [line.split(":")[0] for line in plan] == ["stage1", "stage2"] and lines[:2] == plan  # the stages, first
    steps = [line for line in lines if not EPOCH_LINE.match(line) and line not in plan]
    assert all(line.startswith("caching features of ") for line in steps), steps  # one line per cached split


@pytest.mark.slow
def test_a_terminal_gets_one_bar_per_stage(ham_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import tqdm.auto

    bars: list = []

    class CountingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", CountingBar)
    monkeypatch.setenv("DERMLAB_PROGRESS", "bar")
    train_run(apply_overrides(Config(), [f"data.path={ham_dir}", *TINY]), tmp_path / "run")
    stages = [bar for bar in bars if bar.desc.startswith("stage")]
    assert [bar.desc for bar in stages] == ["stage1", "stage2"]
    assert all(bar.n == bar.total and bar.total > 0 for bar in stages)  # every batch of every epoch, one bar
    out = capsys.readouterr().out.replace("\r", "\n")  # a bar redraws its line in place
    assert sum(bool(EPOCH_LINE.match(line)) for line in out.splitlines()) == 3  # the epoch lines, above the bar


@pytest.mark.slow
def test_progress_off_prints_nothing(ham_dir: Path, tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    train_run(apply_overrides(Config(), [f"data.path={ham_dir}", *TINY, "train.stage1_epochs=1", "train.stage2_epochs=0"]), tmp_path / "run")
    assert capfd.readouterr().out == ""


@pytest.mark.slow
def test_a_long_epoch_in_a_log_file_says_how_far_it_got(ham_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DERMLAB_PROGRESS", "lines")
    monkeypatch.setattr(progress, "_LINE_INTERVAL_S", 0.0)  # every batch counts as "a minute later"
    train_run(apply_overrides(Config(), [f"data.path={ham_dir}", *TINY, "train.stage1_epochs=1", "train.stage2_epochs=0"]), tmp_path / "run")
    lines = capsys.readouterr().out.splitlines()
    batches = [line for line in lines if re.match(r"^stage1 epoch 1/1: batch \d+/\d+ \(\d+ s\)$", line)]
    total = int(batches[0].split("/")[2].split()[0]) if batches else 0
    assert total > 1 and len(batches) == total
    assert sum(bool(EPOCH_LINE.match(line)) for line in lines) == 1
