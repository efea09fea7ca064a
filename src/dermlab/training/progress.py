"""Training progress people can read: one bar per stage on a terminal, one plain line per epoch in a log file.

``DERMLAB_PROGRESS`` is read here and nowhere else:

- unset, ``auto`` or ``1``: a bar when stdout is a terminal, plain lines when it is not (a CI log, ``> log``);
- ``bar`` or ``lines``: that, wherever stdout goes;
- ``0`` or ``off``: no progress output at all.

A bar never writes into a log file, so a log holds no carriage returns and no empty lines from nested bars: just
one line per epoch with its metrics (and, in an epoch longer than a minute, a line a minute with the batch count).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from dermlab.errors import ConfigError

__all__ = ["ProgressMode", "progress_mode", "show_bars", "StageProgress", "stage_progress_callbacks", "step_progress"]

ProgressMode = Literal["bar", "lines", "off"]

_ENVIRONMENT = "DERMLAB_PROGRESS"
_CHOICES: dict[str, ProgressMode | None] = {
    "": None, "auto": None, "1": None, "bar": "bar", "lines": "lines", "0": "off", "off": "off",
}
_LINE_INTERVAL_S = 60.0  # inside a long epoch, plain lines say how far it got at most once a minute
_SKIPPED_METRICS = {"run_epoch"}


def progress_mode() -> ProgressMode:
    """``bar``, ``lines`` or ``off``, from ``DERMLAB_PROGRESS`` and whether stdout is a terminal."""
    raw = os.environ.get(_ENVIRONMENT, "").strip().lower()
    if raw not in _CHOICES:
        valid = ", ".join(name for name in _CHOICES if name)
        raise ConfigError(f"{_ENVIRONMENT}={raw!r} is not one of {valid}")
    chosen = _CHOICES[raw]
    if chosen is not None:
        return chosen
    return "bar" if _stdout_is_terminal() else "lines"


def show_bars() -> bool:
    """Whether progress bars may be drawn (a terminal, or ``DERMLAB_PROGRESS=bar``)."""
    return progress_mode() == "bar"


def _stdout_is_terminal() -> bool:
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def _format_value(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _epoch_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The scalar ``train/*`` and ``val/*`` metrics logged this epoch, by name."""
    metrics: dict[str, float] = {}
    for name, value in sorted(trainer.callback_metrics.items()):
        if name in _SKIPPED_METRICS or not name.startswith(("train/", "val/")):
            continue
        try:
            metrics[name] = float(value)
        except (TypeError, ValueError):
            continue
    return metrics


class StageProgress(ProgressBar):
    """Progress of one training stage: a bar over all its batches (``bar``) or a line per epoch (``lines``).

    Both print one line per finished epoch, after validation: ``stage1 epoch 2/5: train/loss 0.91, val/... (3.2 s)``;
    the bar stays below those lines and is redrawn in place, so the terminal shows one bar per stage.
    """

    def __init__(self, stage: str, mode: ProgressMode, line_interval_s: float | None = None) -> None:
        super().__init__()
        if mode not in ("bar", "lines"):
            raise ConfigError(f"StageProgress needs mode bar or lines, got {mode!r}")
        self.stage = stage
        self.mode = mode
        self.line_interval_s = _LINE_INTERVAL_S if line_interval_s is None else line_interval_s
        self._enabled = True
        self._bar: Any = None
        self._epoch_started = 0.0
        self._last_line = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _active(self, trainer: L.Trainer) -> bool:
        return self._enabled and trainer.is_global_zero

    def _batches_per_epoch(self) -> int | None:
        total = self.total_train_batches
        return int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or self.mode != "bar":
            return
        from tqdm.auto import tqdm

        per_epoch = self._batches_per_epoch()
        total = per_epoch * trainer.max_epochs if per_epoch is not None and trainer.max_epochs else None
        done = per_epoch * trainer.current_epoch if per_epoch is not None else 0  # a resumed stage starts part-way
        self._bar = tqdm(
            total=total, initial=done, desc=self.stage, unit="batch", file=sys.stdout, dynamic_ncols=True, leave=True
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = self._last_line = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._active(trainer):
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.perf_counter()
        if self.mode == "lines" and now - self._last_line >= self.line_interval_s:
            self._last_line = now
            per_epoch = self._batches_per_epoch()
            of = f"/{per_epoch}" if per_epoch is not None else ""
            self._write(f"{self._epoch_label(trainer)}: batch {batch_idx + 1}{of} ({now - self._epoch_started:.0f} s)")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        metrics = ", ".join(f"{name} {_format_value(value)}" for name, value in _epoch_metrics(trainer).items())
        elapsed = time.perf_counter() - self._epoch_started
        self._write(f"{self._epoch_label(trainer)}: {metrics or 'no metrics'} ({elapsed:.1f} s)")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)

    def _epoch_label(self, trainer: L.Trainer) -> str:
        return f"{self.stage} epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)


def stage_progress_callbacks(stage: str) -> tuple[list[L.Callback], bool]:
    """``(callbacks, enable_progress_bar)`` for a stage's ``Trainer``, by :func:`progress_mode`."""
    mode = progress_mode()
    if mode == "off":
        return [], False
    return [StageProgress(stage, mode)], True


class _StepProgress:
    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self.count = 0

    def update(self, count: int = 1) -> None:
        self.count += count
        if self._bar is not None:
            self._bar.update(count)


@contextmanager
def step_progress(description: str, total: int, unit: str = "batch") -> Iterator[_StepProgress]:
    """Progress of a step outside training (caching features): one bar on a terminal, one line when done in a
    log file (``caching features of train: 24 batch in 3.1 s``), nothing with ``DERMLAB_PROGRESS=0``."""
    mode = progress_mode()
    bar = None
    if mode == "bar":
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=description, unit=unit, file=sys.stdout, dynamic_ncols=True, leave=False)
    started = time.perf_counter()
    progress = _StepProgress(bar)
    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
    if mode == "lines":
        plural = unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
        print(f"{description}: {progress.count} {plural} in {time.perf_counter() - started:.1f} s", flush=True)
