"""Ctrl+C during training: finish the epoch, save, stop cleanly, and say how to continue.

The first SIGINT asks the trainer to stop at the end of the current epoch, after ``last.ckpt`` was written,
so ``--resume`` continues exactly where an uninterrupted run would be (a mid-epoch checkpoint could not: the
data order of a half-finished epoch is not part of the checkpoint). A second SIGINT stops at once; the
previous epoch's ``last.ckpt`` is still whole because checkpoints are written atomically.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping

__all__ = ["GracefulInterrupt", "TrainingInterrupted", "stop_reason"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request after saving; the message names the checkpoint and how to continue."""


class GracefulInterrupt(L.Callback):
    """Turns the first SIGINT into "stop after this epoch"; the second one into an immediate stop."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped = False
        self._previous: Any = None
        self._installed = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
            return
        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)
        self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\ninterrupt: finishing this epoch, then saving and stopping (Ctrl+C again stops at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank must agree, or DDP would hang waiting for the rank that stopped
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            trainer.should_stop = True
            self.stopped = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            self._installed = False


def stop_reason(trainer: L.Trainer) -> str | None:
    """``"interrupted"`` when a :class:`GracefulInterrupt` stopped ``trainer`` before its last epoch,
    ``"interrupted-after-stage"`` when Ctrl+C came during the stage's last epoch, else ``None``."""
    interrupt = next((c for c in trainer.callbacks if isinstance(c, GracefulInterrupt)), None)
    if interrupt is None or not interrupt.requested:
        return None
    early_stopped = any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks)
    finished = early_stopped or trainer.max_epochs is None or trainer.current_epoch >= trainer.max_epochs
    return "interrupted-after-stage" if finished else "interrupted"
