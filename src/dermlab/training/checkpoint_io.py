"""Training checkpoints that a kill never leaves half-written and that are never trusted when damaged.

Lightning's own writer stages the file through an fsspec transaction whose temporary file lives in the
system temp folder; when that is another filesystem (a tmpfs ``/tmp``, a scratch disk) the final "rename" is
a copy, so a kill mid-copy leaves a truncated ``last.ckpt`` in the run folder, and any kill leaves a stray
temporary file behind. :class:`AtomicCheckpointIO` writes a temporary file in the checkpoint's own folder,
fsyncs it and renames it over the target (:func:`dermlab.io.atomic_save`), and reads with
``weights_only=True``, turning a damaged or unsafe file into one :class:`~dermlab.errors.CheckpointError`.

:class:`LastCheckpoint` writes ``last.ckpt`` at the end of every epoch. Lightning 2.6's ``save_last`` only
refreshes ``last.ckpt`` in an epoch where the monitored metric improved, so a resumed run would restart from
an older epoch and the run's final ``last.ckpt`` would not be the last epoch.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger

from dermlab.errors import CheckpointError
from dermlab.io import atomic_save, atomic_write_json, atomic_write_text

__all__ = [
    "AtomicCheckpointIO",
    "LastCheckpoint",
    "read_training_checkpoint",
    "remove_stale_temporaries",
    "TRAINING_CHECKPOINT_KEYS",
]

TRAINING_CHECKPOINT_KEYS = ("state_dict", "loops", "epoch", "global_step", "optimizer_states")
"""What a Lightning checkpoint needs to continue training; a file without them cannot be resumed from."""


def read_training_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning training checkpoint with ``weights_only=True``; a damaged or unsafe file raises.

    Raises ``CheckpointError("<path>: ...")`` naming what is wrong and what to do about it.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(f"{path}: refused to load, the file holds more than weights ({first})") from None
    except Exception as error:  # noqa: BLE001 - a torn file fails in many ways (zip, pickle, storage)
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: damaged checkpoint, cannot resume from it ({detail}); delete it to restart this stage"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (holds {type(checkpoint).__name__})")
    missing = [key for key in TRAINING_CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path}: not a training checkpoint (no {missing[0]!r}); delete it to restart this stage"
        )
    return checkpoint


def remove_stale_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete temporary files that a killed :func:`~dermlab.io.atomic_save` left in ``folder`` (and below it
    with ``recursive``). Only call it when nothing else is writing there.

    They are never read (a later run only trusts the renamed file) but can be as large as a checkpoint.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = "**/.*.tmp" if recursive else ".*.tmp"
    stale = [entry for entry in folder.glob(pattern) if entry.is_file()]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` with atomic local writes and ``weights_only=True`` reads.

    Pass it as ``L.Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_save(Path(path), lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # weights_only is always True: a checkpoint is data, never code, whatever the caller asks for
        return read_training_checkpoint(path, map_location=map_location)


class LastCheckpoint(Checkpoint):
    """Write ``dirpath/last.ckpt`` at the end of every training epoch, after validation, and keep the CSV log
    in step with it.

    A ``Checkpoint`` subclass, so Lightning runs it with the monitoring callbacks, after early stopping and
    after a ``ModelCheckpoint`` listed before it: the saved callback state already holds this epoch's best.

    The checkpoint records how many rows ``metrics.csv`` had when it was written. When training continues from
    it, rows that a killed attempt logged after that point (the validation of an epoch that is now repeated)
    are dropped, so a resumed run's log has the same rows as an uninterrupted one. A stage that is started
    afresh (no checkpoint yet) trims to the row count noted in ``dirpath/log_start.json`` when it first began.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self._saved_step = -1
        self._log_rows: int | None = None
        self._epoch: int | None = None
        self._restored: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.filename}]"

    def state_dict(self) -> dict[str, Any]:
        return {"log_rows": self._log_rows, "epoch": self._epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        log_file = _csv_log_file(trainer)
        if log_file is None:
            return
        start_file = self.dirpath / "log_start.json"
        if self._restored is not None and self._restored.get("log_rows") is not None:
            _trim_log(log_file, int(self._restored["log_rows"]), self._restored.get("epoch"))
        elif start_file.is_file():  # an earlier attempt of this stage died before its first checkpoint
            _trim_log(log_file, int(json.loads(start_file.read_text())["log_rows"]), None)
        else:
            atomic_write_json(start_file, {"log_rows": _count_log_rows(log_file)})

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self._saved_step == trainer.global_step:
            return
        for logger in trainer.loggers:  # rows logged so far reach the disk before the checkpoint does
            logger.save()
        log_file = _csv_log_file(trainer) if trainer.is_global_zero else None
        self._log_rows = _count_log_rows(log_file) if log_file is not None else None
        self._epoch = trainer.current_epoch
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state, to resume from
        self._saved_step = trainer.global_step


def _csv_log_file(trainer: L.Trainer) -> Path | None:
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            return Path(logger.experiment.metrics_file_path)
    return None


def _read_log(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.reader(stream))


def _count_log_rows(path: Path) -> int:
    return max(0, len(_read_log(path)) - 1)


def _trim_log(path: Path, keep: int, epoch: int | None) -> None:
    """Keep the header, the first ``keep`` rows and the rows right after them that belong to ``epoch`` (its
    epoch-end training metrics are logged just after the checkpoint is written)."""
    records = _read_log(path)
    if len(records) <= keep + 1:
        return
    header, rows = records[0], records[1:]
    kept = rows[:keep]
    column = header.index("epoch") if "epoch" in header else None
    for row in rows[keep:]:
        if epoch is None or column is None or column >= len(row) or not _is_number(row[column], epoch):
            break
        kept.append(row)
    if len(kept) == len(rows):
        return
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *kept])  # "\r\n" line ends, as Lightning's writer
    atomic_write_text(path, buffer.getvalue())


def _is_number(text: str, value: int) -> bool:
    try:
        return float(text) == value
    except ValueError:
        return False
