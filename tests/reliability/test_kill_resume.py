"""Interrupted training loses nothing: killed at a random moment and resumed, a run ends where an uninterrupted
run with the same seed ends; Ctrl+C stops cleanly after saving; checkpoint files are never half-written.

The end-to-end tests run ``python -m dermlab train`` in subprocesses on a tiny synthetic HAM10000 folder with
``test_efficientnet`` at 32 px (two stages, the first from cached features), so a real SIGKILL hits a real
process. The kill moment is fixed by default; ``DERMLAB_KILL_SEED=N`` replays another, ``DERMLAB_KILL_SEED=random``
draws one (``make fuzz``), and ``DERMLAB_KILL_TRIALS=N`` runs N kills in a row.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import write_ham10000
from dermlab.errors import CheckpointError
from dermlab.training.checkpoint_io import AtomicCheckpointIO, read_training_checkpoint, remove_stale_temporaries

TOLERANCE = 1e-6
"""Largest difference allowed between a resumed and an uninterrupted run (CPU, deterministic=True); the runs
measured so far agree exactly (difference 0.0)."""

TRAIN_FLAGS = [
    "--model", "test_efficientnet", "--weights", "none", "--accelerator", "cpu",
    "--set", "model.input_size=[32,32]", "--set", "data.num_workers=0", "--set", "data.batch_size=8",
    "--set", "train.stage1_epochs=1", "--set", "train.stage2_epochs=3", "--set", "train.feature_views=1",
    "--set", "train.stage1_lr=0.05", "--set", "train.stage2_lr=0.01", "--set", "train.seed=3",
    "--set", "data.augmentation=reference-b",  # random flips and rotations, keyed per draw, at a third of derm's cost
]
TIMEOUT_S = 300


def _command(data: Path, out: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "dermlab", "train", str(data), "--out", str(out), *TRAIN_FLAGS] + (["--resume"] if resume else [])


def _env() -> dict[str, str]:
    return {**os.environ, "DERMLAB_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}


def _start(data: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    return subprocess.Popen(_command(data, out, resume), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(data: Path, out: Path, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(_command(data, out, resume), env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> float:
    started = time.monotonic()
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before {what}: {process.stderr.read()[-3000:]}")
        if time.monotonic() - started > TIMEOUT_S:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic()


EVENTS = [
    ("checkpoints/stage1/last.ckpt", 1),  # stage 1 (cached features) saved its only epoch
    ("checkpoints/stage2/last.ckpt", 1),  # stage 2, epochs 0, 1 and 2 saved
    ("checkpoints/stage2/last.ckpt", 2),
    ("checkpoints/stage2/last.ckpt", 3),
    ("checkpoints/best.ckpt", 1),  # training finished; evaluation of val and test follows
    ("eval/val/predictions.csv", 1),  # val scored; test, plots and report follow
]
"""Moments that every run passes through, in order: (file, how many times it has been written)."""


class _Watcher:
    """Counts the versions of files a run writes (each atomic write is a new inode with a new mtime)."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.versions: dict[str, set[tuple[int, int]]] = {}

    def writes(self, relative: str) -> int:
        try:
            stat = (self.run / relative).stat()
        except FileNotFoundError:
            return len(self.versions.get(relative, ()))
        self.versions.setdefault(relative, set()).add((stat.st_ino, stat.st_mtime_ns))
        return len(self.versions[relative])

    def wait(self, event: tuple[str, int], process: subprocess.Popen) -> float:
        relative, count = event
        return _wait_for(lambda: self.writes(relative) >= count, process, f"write {count} of {relative}")


@dataclass
class Reference:
    data: Path
    run: Path
    gaps: list[float]  # seconds from each of EVENTS to the next one (the last: to the end of the run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The dataset and an uninterrupted run of the same command, timed event by event."""
    base = tmp_path_factory.mktemp("kill-resume")
    data = write_ham10000(base / "HAM10000", images_per_class=4)  # 28 images: 14 train, 7 val, 7 test
    run = base / "uninterrupted"
    process = _start(data, run)
    watcher = _Watcher(run)
    times = [watcher.wait(event, process) for event in EVENTS]
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, err[-3000:]
    times.append(time.monotonic())
    return Reference(data, run, [later - earlier for earlier, later in zip(times, times[1:])])


def _assert_close(expected: object, actual: object, where: str) -> float:
    """Equal structure and values, numbers within TOLERANCE; returns the largest difference seen."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), where
        return max([_assert_close(expected[key], actual[key], f"{where}.{key}") for key in expected], default=0.0)
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        return max([_assert_close(e, a, f"{where}[{i}]") for i, (e, a) in enumerate(zip(expected, actual))], default=0.0)
    if isinstance(expected, float) and isinstance(actual, float):
        if math.isnan(expected) and math.isnan(actual):
            return 0.0
        assert abs(expected - actual) <= TOLERANCE, f"{where}: {expected} != {actual}"
        return abs(expected - actual)
    assert expected == actual, f"{where}: {expected!r} != {actual!r}"
    return 0.0


def _state_difference(a: Path, b: Path) -> float:
    first = torch.load(a, map_location="cpu", weights_only=True)
    second = torch.load(b, map_location="cpu", weights_only=True)
    assert (first["epoch"], first["global_step"]) == (second["epoch"], second["global_step"]), (a, b)
    assert first["state_dict"].keys() == second["state_dict"].keys()
    return max((first["state_dict"][k].double() - second["state_dict"][k].double()).abs().max().item() for k in first["state_dict"])


def assert_same_outcome(reference: Path, resumed: Path) -> float:
    """metrics.json (val and test), per-image predictions and probabilities, weights and training log agree;
    returns the largest difference found."""
    expected = json.loads((reference / "metrics.json").read_text())
    actual = json.loads((resumed / "metrics.json").read_text())
    differences = []
    for split in ("val", "test"):
        differences.append(_assert_close(expected[split], actual[split], split))
        old = pd.read_csv(reference / "eval" / split / "predictions.csv")
        new = pd.read_csv(resumed / "eval" / split / "predictions.csv")
        assert old["image_id"].tolist() == new["image_id"].tolist()
        assert old["predicted"].tolist() == new["predicted"].tolist()
        probabilities = [c for c in old.columns if c.startswith("prob_")]
        assert probabilities
        differences.append((old[probabilities] - new[probabilities]).abs().to_numpy().max())
    for name in ("best.ckpt", "last.ckpt", "stage1/last.ckpt", "stage2/last.ckpt"):
        differences.append(_state_difference(reference / "checkpoints" / name, resumed / "checkpoints" / name))
    # the log: every validation row is there once, with the same values. A kill in the short window around an
    # epoch's end can lose that epoch's train/loss row or repeat it (docs/reliability.md, known limits); the
    # weights and metrics above are compared exactly either way.
    old_log = pd.read_csv(reference / "logs" / "metrics.csv")
    new_log = pd.read_csv(resumed / "logs" / "metrics.csv")[old_log.columns]
    assert abs(len(new_log) - len(old_log)) <= 1, (old_log, new_log)
    old_val = old_log.dropna(subset=["val/loss"]).reset_index(drop=True)
    new_val = new_log.dropna(subset=["val/loss"]).reset_index(drop=True)
    assert old_val.shape == new_val.shape, (old_val, new_val)
    assert (old_val.isna() == new_val.isna()).all().all()
    differences.append((old_val.fillna(0) - new_val.fillna(0)).abs().to_numpy().max())
    worst = float(max(differences))
    assert worst <= TOLERANCE, differences
    return worst


def _where(run: Path) -> str:
    """Which stage and epoch the newest checkpoint of a killed run holds."""
    found = []
    for stage in sorted(run.glob("checkpoints/stage*")):
        last = stage / "last.ckpt"
        if last.is_file():
            found.append(f"{stage.name} epoch {read_training_checkpoint(last)['epoch']}{' (done)' if (stage / 'done.json').is_file() else ''}")
    return ", ".join(found) or "no checkpoint"


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches_uninterrupted_run(reference: Reference, tmp_path: Path) -> None:
    # A fixed moment by default, so the suite cannot fail by the luck of the draw; `DERMLAB_KILL_SEED=random`
    # (as `make fuzz` sets it) draws new moments, and any seed it prints replays one.
    chosen = os.environ.get("DERMLAB_KILL_SEED", "20261122")
    seed = random.randrange(2**31) if chosen == "random" else int(chosen)
    trials = int(os.environ.get("DERMLAB_KILL_TRIALS", "1"))
    rng = random.Random(seed)
    print(f"\nDERMLAB_KILL_SEED={seed} DERMLAB_KILL_TRIALS={trials}", flush=True)
    for trial in range(trials):
        run = tmp_path / f"killed-{trial}"
        # a random moment of the run: one of its phases, then a random point inside that phase (scaled down a
        # little so that timing noise rarely carries the kill past the phase, or past the end of the run)
        phase = rng.randrange(len(EVENTS))
        delay = rng.uniform(0.0, 0.8 * reference.gaps[phase])
        process = _start(reference.data, run)
        watcher = _Watcher(run)
        for event in EVENTS[: phase + 1]:
            anchor = watcher.wait(event, process)
        time.sleep(max(0.0, anchor + delay - time.monotonic()))
        killed = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=TIMEOUT_S)
        state = _where(run)
        left = len(list(run.rglob(".*.tmp")))  # temporary files the kill cut short; never read, removed on resume
        resumed = _run(reference.data, run, resume=True)
        assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
        difference = assert_same_outcome(reference.run, run)
        assert not list(run.rglob(".*.tmp")), "a temporary file survived the resume"
        event = f"write {EVENTS[phase][1]} of {EVENTS[phase][0]}"
        print(
            f"trial {trial}: SIGKILL {delay:.2f} s after {event} ({'killed' if killed else 'had already finished'}; "
            f"{state}; {left} temporary file(s) left); resumed: same outcome, largest difference {difference:.1e}",
            flush=True,
        )


@pytest.mark.slow
def test_sigint_finishes_the_epoch_saves_and_resume_completes(reference: Reference, tmp_path: Path) -> None:
    run = tmp_path / "interrupted"
    process = _start(reference.data, run)
    _Watcher(run).wait(("checkpoints/stage2/last.ckpt", 1), process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err, err[-3000:]
    last = read_training_checkpoint(run / "checkpoints" / "stage2" / "last.ckpt")
    if not (run / "checkpoints" / "stage2" / "done.json").is_file():
        assert last["epoch"] < 2 and "continue with --resume" in err  # stopped before the stage's last epoch
    assert not (run / "metrics.json").exists()
    resumed = _run(reference.data, run, resume=True)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    print(f"\nSIGINT, then --resume: largest difference {assert_same_outcome(reference.run, run):.1e}")


@pytest.mark.slow
def test_sigterm_stops_with_a_failing_status_and_keeps_the_last_checkpoint(reference: Reference, tmp_path: Path) -> None:
    """Lightning turns SIGTERM into SystemExit() (status 0); a job scheduler must see that the run did not finish."""
    run = tmp_path / "terminated"
    process = _start(reference.data, run)
    _Watcher(run).wait(("checkpoints/stage2/last.ckpt", 1), process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "continue with --resume" in err, err[-3000:]
    assert read_training_checkpoint(run / "checkpoints" / "stage2" / "last.ckpt")["epoch"] >= 0
    assert not (run / "metrics.json").exists()


@pytest.mark.slow
def test_a_damaged_last_checkpoint_is_never_trusted(reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from dermlab.cli import main

    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    run = tmp_path / "damaged"
    shutil.copytree(reference.run, run)
    (run / "checkpoints" / "stage2" / "done.json").unlink()  # as if killed during stage 2
    last = run / "checkpoints" / "stage2" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])  # e.g. a disk that lost the tail
    (run / "checkpoints" / "stage2" / ".last.ckpt.x1y2.tmp").write_bytes(b"half a write")
    assert main(["train", str(reference.data), "--out", str(run), "--resume", *TRAIN_FLAGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {last}: damaged checkpoint") and "\n" not in err and "delete it" in err
    assert not (run / "checkpoints" / "stage2" / ".last.ckpt.x1y2.tmp").exists()


# ---------------------------------------------------------------------------- the pieces, without training

def _payload(value: float, size: int = 256) -> dict:
    return {"state_dict": {"w": torch.full((size, size), value)}, "loops": {}, "epoch": 0, "global_step": int(value), "optimizer_states": []}


def test_checkpoint_write_that_dies_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_payload(1.0), path)

    def dies_half_way(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError):
        io.save_checkpoint(_payload(2.0), path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


_WRITER = """
import sys, torch
from dermlab.training.checkpoint_io import AtomicCheckpointIO
io, path, step = AtomicCheckpointIO(), sys.argv[1], 0
while True:
    step += 1
    io.save_checkpoint({"state_dict": {"w": torch.full((512, 512), float(step))}, "loops": {}, "epoch": step,
                        "global_step": step, "optimizer_states": []}, path)
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_leaves_a_torn_file(tmp_path: Path) -> None:
    """A process rewriting a 1 MB checkpoint in a loop, killed at random moments: the file always loads whole."""
    rng = random.Random(int(os.environ.get("DERMLAB_KILL_SEED", "0")))
    path = tmp_path / "last.ckpt"
    kills = 0
    for _ in range(2):
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], env=_env(), stderr=subprocess.PIPE, text=True)
        _Watcher(tmp_path).wait(("last.ckpt", 2), writer)
        time.sleep(rng.uniform(0.05, 0.5))
        writer.send_signal(signal.SIGKILL)
        writer.communicate(timeout=60)
        kills += 1
        checkpoint = read_training_checkpoint(path)
        weights = checkpoint["state_dict"]["w"]
        assert torch.equal(weights, torch.full((512, 512), float(checkpoint["global_step"])))
        remove_stale_temporaries(tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert kills == 2


def _torch_bytes(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "damaged checkpoint"),
        (_torch_bytes({"state_dict": {}}), "not a training checkpoint"),  # readable, but nothing to resume from
        (b"PK\x03\x04garbage", "damaged checkpoint"),
    ],
    ids=["empty", "no-training-state", "torn-zip"],
)
def test_resume_loader_names_a_damaged_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        AtomicCheckpointIO().load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {expected}") and "\n" not in message


def test_stale_temporaries_are_removed_and_real_files_kept(tmp_path: Path) -> None:
    for name in (".last.ckpt.abc123.tmp", ".best.ckpt.zz.tmp", "last.ckpt", "done.json", "eval/val/.roc.png.q1.tmp", "eval/val/roc.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".best.ckpt.zz.tmp", ".last.ckpt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.json", "eval", "last.ckpt"]
    assert [p.name for p in remove_stale_temporaries(tmp_path, recursive=True)] == [".roc.png.q1.tmp"]
    assert [p.name for p in (tmp_path / "eval" / "val").iterdir()] == ["roc.png"]


def test_log_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path: Path) -> None:
    from dermlab.training.checkpoint_io import _trim_log

    log = tmp_path / "metrics.csv"
    rows = [
        "epoch,step,train/loss,val/loss",
        "0,4,,1.9", "0,4,1.8,",  # epoch 0: validation, then (after the checkpoint) the epoch's training loss
        "1,9,,1.7",  # epoch 1 validated, then killed before its checkpoint
    ]
    log.write_text("\r\n".join(rows) + "\r\n")
    _trim_log(log, keep=1, epoch=0)  # the checkpoint of epoch 0 was written when the log had one row
    assert log.read_text().splitlines() == rows[:3]
    _trim_log(log, keep=1, epoch=None)  # a stage restarted from scratch: back to where it began
    assert log.read_text().splitlines() == rows[:2]
