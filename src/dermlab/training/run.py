"""One training run, from a config to a finished run folder (see docs/architecture.md for its layout).

A run is the list of stages :func:`~dermlab.training.stages.plan_stages` declares from the config (stage 1 the
head with the backbone frozen, stage 2 the last N block groups or all of them). :func:`train_run` walks it:
each stage builds its inputs with the builder :data:`STAGE_BUILDERS` names for them (pixels, cached features,
cached trunk maps), fits, and keeps its own ``last.ckpt`` so ``resume`` continues at the right stage, epoch and
step; each stage starts from the previous stage's best checkpoint, and the best checkpoint over the stages
becomes ``checkpoints/best.ckpt``. :func:`train_and_summarise` also finishes the run: the TTA views,
temperature, abstention and decision rules fitted on val, ``metrics.json``, the report and the model card.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from dermlab.config import Config, save_config
from dermlab.data.cache import create_image_loader
from dermlab.data.datamodule import CachedSplit, DermDataModule, FeatureDataModule
from dermlab.data.metadata import encode_metadata
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.run_data import RunData, prepare_run_data
from dermlab.data.splits import split_rows
from dermlab.data.transforms import create_transform
from dermlab.errors import ConfigError
from dermlab.io import atomic_save, atomic_write_json
from dermlab.losses import create_loss
from dermlab.models.checkpoint import checkpoint_metadata
from dermlab.models.classifier import DermClassifier
from dermlab.models.factory import create_model, resolve_preprocessing
from dermlab.models.freezing import (
    freeze_backbone,
    freeze_batchnorm_statistics,
    set_frozen_batchnorm_eval,
    unfreeze_last_blocks,
)
from dermlab.training.checkpoint_io import AtomicCheckpointIO, LastCheckpoint, remove_stale_temporaries
from dermlab.training.checks import check_combinations, check_names
from dermlab.training.curriculum import create_curriculum_sampler
from dermlab.training.distillation import Distillation, create_distillation, distillation_summary
from dermlab.training.ema import RunSizedEMA
from dermlab.training.features import compute_features, feature_cache_key, load_or_compute_features
from dermlab.training.loggers import AppendingCSVLogger
from dermlab.training.module import ClassifierModule
from dermlab.training.progress import progress_mode, show_bars, stage_progress_callbacks
from dermlab.training.samplers import create_sampler
from dermlab.training.signals import GracefulInterrupt, TrainingInterrupted, stop_reason
from dermlab.training.stages import Stage, plan_stages

__all__ = ["STAGE_BUILDERS", "FinishedRun", "TrainingResult", "summarise_trained_run", "train_and_summarise", "train_run"]

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    run_dir: Path
    best_checkpoint: Path
    best_score: float | None
    wall_time_s: float
    is_global_zero: bool = True
    data: RunData | None = None  # the run's data as training read it (so finishing the run reads it no more)
    stages: list[str] = field(default_factory=list)  # each stage's description, in order


@dataclass
class FinishedRun:
    training: TrainingResult
    summary: dict[str, Any] | None  # metrics.json's content; None on the other processes of a DDP run


@dataclass
class _RunParts:
    """What every stage of one run shares: its config, data, model, loss, transforms, teachers and loggers."""

    config: Config
    run_dir: Path
    data: RunData
    model: DermClassifier
    loss: nn.Module
    preprocessing: Preprocessing
    train_transform: Any
    eval_transform: Any
    distill: Distillation | None
    loggers: list
    module_kwargs: dict[str, Any]

    @property
    def feature_cache_dir(self) -> Path:
        return _feature_cache_dir(self.config, self.run_dir)


def _feature_cache_dir(config: Config, run_dir: Path) -> Path:
    """Where cached features and trunk maps go: ``data.cache_dir/features``, shared by runs, else the run folder."""
    return Path(config.data.cache_dir) / "features" if config.data.cache_dir else run_dir / "cache"


# --------------------------------------------------------------------------------------------- the run
def train_run(config: Config, run_dir: str | Path, resume: bool = False) -> TrainingResult:
    """Train per ``config`` into ``run_dir``; with ``resume`` continue from the last checkpoint of the run."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    if config_path.is_file() and not resume and any((run_dir / "checkpoints").glob("*/last.ckpt")):
        raise ConfigError(f"{run_dir}: this run folder already holds a run; pass --resume to continue it or pick a new --out")
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    check_combinations(config)
    check_names(config)
    stages = plan_stages(config)
    data = prepare_run_data(config, run_dir, progress=show_bars())
    save_config(config, config_path)
    atomic_write_json(run_dir / "classes.json", data.classes)
    parts = _run_parts(config, run_dir, data)
    descriptions = [stage.describe(config.mixing.method) for stage in stages]
    if progress_mode() != "off":  # DERMLAB_PROGRESS=0 prints nothing; the lines are in metrics.json either way
        for line in descriptions:
            print(line, flush=True)

    checkpoints_dir = run_dir / "checkpoints"
    best_candidates: list[tuple[float, Path]] = []
    trainer: L.Trainer | None = None
    for position, stage in enumerate(stages):
        stage_dir = checkpoints_dir / stage.name
        if stage.frozen_backbone:
            freeze_backbone(parts.model)
        else:
            unfreeze_last_blocks(parts.model, stage.unfreeze)
            if stage.frozen_batchnorm:
                freeze_batchnorm_statistics(parts.model)
        parts.model.train()  # the modes the stage trains in: Lightning keeps the ones it finds when fit starts
        set_frozen_batchnorm_eval(parts.model)
        done = _stage_done(stage_dir)
        if done is None:
            module, datamodule, callbacks = STAGE_BUILDERS[stage.inputs](stage, parts)
            trainer = _make_trainer(config, stage_dir, stage.epochs, parts.loggers, callbacks)
            trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(stage_dir, resume))
            done = _finish_stage(trainer, stage_dir)
        if done.get("best_score") is not None:
            best_candidates.append((done["best_score"], Path(done["best_path"])))
        if position + 1 < len(stages):  # the next stage starts from this stage's best checkpoint
            start = Path(done["best_path"]) if done.get("best_path") else stage_dir / "last.ckpt"
            _load_model_weights(ClassifierModule(parts.model, parts.loss, data.classes, **parts.module_kwargs), start)
            if parts.distill is not None:
                parts.distill.load_state(start)  # the next stage continues with the expert weights this one ended on

    is_global_zero = trainer.is_global_zero if trainer is not None else True
    last_dir = checkpoints_dir / stages[-1].name
    if not best_candidates:  # no validation metric: the last checkpoint of the last stage
        best_score, best_path = None, last_dir / "last.ckpt"
    else:
        pick = max if config.train.monitor_mode == "max" else min
        best_score, best_path = pick(best_candidates, key=lambda item: item[0])
    final_best = checkpoints_dir / "best.ckpt"
    if is_global_zero:
        _atomic_copy(best_path, final_best)
        _atomic_copy(last_dir / "last.ckpt", checkpoints_dir / "last.ckpt")
    return TrainingResult(run_dir, final_best, best_score, time.perf_counter() - started, is_global_zero, data, descriptions)


def train_and_summarise(
    config: Config, run_dir: str | Path, resume: bool = False, extras: dict[str, Any] | None = None
) -> FinishedRun:
    """:func:`train_run`, then :func:`summarise_trained_run`: the whole of ``dermlab train``."""
    result = train_run(config, run_dir, resume=resume)
    return FinishedRun(result, summarise_trained_run(result, config, extras) if result.is_global_zero else None)


def summarise_trained_run(result: TrainingResult, config: Config, extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score a just-trained run on val and test with ``summarise_run`` (metrics.json, report, model card).

    ``extras`` join metrics.json beside the wall time, the best validation score, the monitor, the stages and,
    for a distilled student, its distillation state (teachers, groups, expert weights). The data are the ones
    training read, so the dataset is not read again.
    """
    from dermlab.evaluation.run_summary import summarise_run

    remove_stale_temporaries(result.run_dir, recursive=True)  # e.g. a plot whose write a kill cut short
    facts: dict[str, Any] = {
        "wall_time_s": round(result.wall_time_s, 1),
        "best_val_score": result.best_score,
        "monitor": config.train.monitor,
        "stages": result.stages,
    }
    state = distillation_summary(result.best_checkpoint)
    if state:
        facts["distill"] = state
    if config.data.class_subset is not None:
        facts["class_subset"] = list(config.data.class_subset)
    return summarise_run(result.run_dir, result.data.frame, extras={**facts, **(extras or {})}, num_workers=config.data.num_workers)


def _run_parts(config: Config, run_dir: Path, data: RunData) -> _RunParts:
    model = create_model(config.model, len(data.classes))
    preprocessing = resolve_preprocessing(model, config.model)
    loss = create_loss(config.loss.name, data.class_counts("train"), **config.loss.options)
    train_transform = create_transform(config.data.augmentation, preprocessing, train=True)
    eval_transform = create_transform("none", preprocessing, train=False)
    distill = create_distillation(config, data.frame, data.classes, model, preprocessing, eval_transform, _feature_cache_dir(config, run_dir))
    loggers = [
        AppendingCSVLogger(run_dir, name="logs", version=""),
        TensorBoardLogger(run_dir / "logs", name="tensorboard", version="", default_hp_metric=False),
    ]
    module_kwargs = dict(
        optimizer=config.train.optimizer,
        weight_decay=config.train.weight_decay,
        scheduler=config.train.scheduler,
        warmup_epochs=config.train.warmup_epochs,
        seed=config.train.seed,
        metadata=checkpoint_metadata(config, data.classes, preprocessing),
    )
    return _RunParts(config, run_dir, data, model, loss, preprocessing, train_transform, eval_transform, distill, loggers, module_kwargs)


# --------------------------------------------------------------------------------------------- stage inputs
StageBuild = tuple[ClassifierModule, L.LightningDataModule, list]  # the module, its data, its callbacks


def _pixel_stage(stage: Stage, parts: _RunParts) -> StageBuild:
    """A stage on images: the data module with the run's sampler and curriculum, mixing and EMA as declared."""
    options: dict[str, Any] = {"frozen_backbone": True} if stage.frozen_backbone else {"epoch_offset": stage.epoch_offset, "layer_decay": stage.layer_decay}
    module = _training_module(parts, lr=stage.lr, **options, **_mixing(parts.config, stage.mixing, len(parts.data.classes)))
    datamodule = _datamodule(parts, stage.batch_size, epoch_offset=stage.epoch_offset)
    callbacks = [RunSizedEMA(stage.ema_half_life)] if stage.ema else []
    return module, datamodule, callbacks


def _feature_stage(stage: Stage, parts: _RunParts) -> StageBuild:
    """The linear probe on cached pooled features (``stage.views`` augmented views per training image)."""
    train, val = _cached_splits(parts, stage.views)
    wrap = None
    if parts.distill is not None:

        def wrap(dataset):
            return parts.distill.feature_dataset(
                dataset, (val.features, val.labels), frame=train.frame, keep=train.keep, transform=parts.train_transform, views=stage.views
            )

    mixing = _mixing(parts.config, stage.mixing, len(parts.data.classes))  # Mixup of the pooled features
    module = _training_module(parts, lr=stage.lr, features_input=True, frozen_backbone=True, **mixing)
    return module, _feature_datamodule(parts, train, val, stage.batch_size, wrap_train=wrap), []


def _trunk_stage(stage: Stage, parts: _RunParts) -> StageBuild:
    """The unfrozen tail over cached output maps of the frozen trunk (``stage.views`` augmented views)."""
    from dermlab.models.trunk import split_frozen_trunk

    model = parts.model
    split = split_frozen_trunk(model)
    was_training = model.training
    model.eval()  # the trunk is frozen: BatchNorm statistics and dropout off while its outputs are cached
    train, val = _cached_splits(parts, stage.views, forward=split.trunk, cut=split.index)
    model.train(was_training)
    module = ClassifierModule(
        model, parts.loss, parts.data.classes, lr=stage.lr, epoch_offset=stage.epoch_offset,
        feature_fn=split.tail, **parts.module_kwargs, **_mixing(parts.config, stage.mixing, len(parts.data.classes)),
    )
    datamodule = _feature_datamodule(parts, train, val, stage.batch_size, epoch_offset=stage.epoch_offset)
    return module, datamodule, []


#: a stage's input kind (:data:`dermlab.training.stages.STAGE_INPUTS`) -> what builds its module, inputs and callbacks
STAGE_BUILDERS: dict[str, Callable[[Stage, _RunParts], StageBuild]] = {
    "pixels": _pixel_stage,
    "features": _feature_stage,
    "trunk": _trunk_stage,
}


def _mixing(config: Config, method: str, num_classes: int) -> dict[str, Any]:
    if method == "none":
        return {}
    from dermlab.training.mixing import create_mixer, mixed_loss

    return {"mixer": create_mixer(config.mixing, num_classes), "mixed_loss": mixed_loss}


def _training_module(parts: _RunParts, **kwargs: Any) -> ClassifierModule:
    """A ClassifierModule, with the distillation term in its loss when ``distill.method`` asks for teachers."""
    term = parts.distill.create_term() if parts.distill is not None else None
    return ClassifierModule(parts.model, parts.loss, parts.data.classes, term=term, **kwargs, **parts.module_kwargs)


def _train_sampler(parts: _RunParts, labels: list[int], epoch_offset: int) -> Any:
    """The run's sampler (``data.sampler``) over the training labels, under its curriculum when it has one."""
    config = parts.config
    sampler = create_sampler(labels, config.data.sampler, seed=config.train.seed)
    return create_curriculum_sampler(config, labels, sampler, epoch_offset=epoch_offset)


def _datamodule(parts: _RunParts, batch_size: int, epoch_offset: int = 0) -> DermDataModule:
    config, data = parts.config, parts.data
    return DermDataModule(
        data.frame,
        data.classes,
        parts.train_transform,
        parts.eval_transform,
        batch_size=batch_size,
        eval_batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
        seed=config.train.seed,
        train_sampler=_train_sampler(parts, data.labels("train"), epoch_offset),
        pin_memory=torch.cuda.is_available(),
        # data.cache_dir: images decoded and resized once (for every split), then read from a memory map
        image_loader=create_image_loader(
            data.frame["path"], config.data.cache_dir, parts.eval_transform, workers=config.data.num_workers, progress=show_bars()
        ),
        metadata_encoder=encode_metadata if config.model.metadata_fusion else None,
    )


def _feature_datamodule(
    parts: _RunParts, train: CachedSplit, val: CachedSplit, batch_size: int, epoch_offset: int = 0, wrap_train: Any = None
) -> FeatureDataModule:
    """The loaders over cached outputs, drawing the training images as the pixel stages do (sampler, curriculum)."""
    config = parts.config
    return FeatureDataModule(
        train,
        val,
        batch_size=batch_size,
        eval_batch_size=config.data.eval_batch_size,
        seed=config.train.seed,
        train_sampler=_train_sampler(parts, train.labels, epoch_offset),
        metadata_encoder=encode_metadata if config.model.metadata_fusion else None,
        wrap_train=wrap_train,
    )


def _cached_splits(parts: _RunParts, views: int, forward: Any = None, cut: int | None = None) -> tuple[CachedSplit, CachedSplit]:
    """Backbone outputs of the train (``views`` augmented views) and val images, from the cache or computed.

    Pooled features by default; with ``forward`` (a frozen trunk cut before module ``cut``) its output maps,
    stored as float16. The cache key holds the transform's every step and parameter, so an edited augmentation
    preset never reuses stale features.
    """
    config, data, model = parts.config, parts.data, parts.model
    device = "cuda" if torch.cuda.is_available() and config.train.accelerator in ("auto", "gpu", "cuda") else "cpu"
    # a class subset (an LFME expert) caches the whole split, so experts and their student share one cache
    source, source_classes = (data.frame, data.classes) if data.unfiltered is None else (data.unfiltered, data.table.classes)
    if config.train.channels_last:  # as the trainer will: NHWC convolutions are faster on CPU and GPU
        model.to(memory_format=torch.channels_last)
    splits = []
    for split, transform, n_views in (("train", parts.train_transform, views), ("val", parts.eval_transform, 1)):
        frame = split_rows(source, split)
        key = feature_cache_key(config, parts.preprocessing, transform, n_views, frame, model, trunk_cut=cut)
        features = load_or_compute_features(
            parts.feature_cache_dir,
            key,
            lambda frame=frame, transform=transform, n_views=n_views: compute_features(
                model, frame, source_classes, transform, views=n_views, seed=config.train.seed,
                batch_size=config.data.eval_batch_size, num_workers=config.data.num_workers, device=device,
                forward=forward, dtype=torch.float32 if forward is None else torch.float16,
                description=f"caching {'trunk maps' if forward is not None else 'features'} of {split}",
            ),
        )
        keep = frame["label"].isin(data.classes).to_numpy()
        if not keep.all():
            features = features[:, torch.tensor(keep)]
        labels = [data.class_index[label] for label in frame["label"][keep]]
        splits.append(CachedSplit(features, labels, frame, keep))
    return splits[0], splits[1]


# --------------------------------------------------------------------------------------------- trainer and stages
def _trainer_devices(value: str) -> Any:
    return int(value) if value.isdigit() else value


class _ChannelsLastAndCompile(L.Callback):
    """``train.channels_last`` / ``train.compile``, applied to the network in place before fitting.

    Channels-last weights make convolutions run NHWC (each conv then emits NHWC, so inputs need no
    conversion); ``nn.Module.compile`` compiles in place, so state-dict keys and checkpoints do not change.
    """

    def __init__(self, channels_last: bool, compile: bool) -> None:
        self.channels_last = channels_last
        self.compile = compile

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile and not getattr(pl_module, "features_input", False):  # cached features run the head only
            model.compile()


def _make_trainer(config: Config, stage_dir: Path, epochs: int, loggers: list, extra_callbacks: list) -> L.Trainer:
    train = config.train
    checkpoint = ModelCheckpoint(
        dirpath=stage_dir,
        filename="best",
        monitor=train.monitor,
        mode=train.monitor_mode,
        save_last=False,  # LastCheckpoint below: Lightning's save_last skips epochs without a new best
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
        save_on_train_epoch_end=True,  # after validation: a resumed run starts cleanly at the next epoch
    )
    # order matters: last.ckpt is written after best.ckpt so it holds this epoch's best-checkpoint state
    callbacks: list = [checkpoint, LastCheckpoint(stage_dir), GracefulInterrupt(), *extra_callbacks]
    if train.channels_last or train.compile:
        callbacks.append(_ChannelsLastAndCompile(train.channels_last, train.compile))
    if train.patience > 0:
        callbacks.append(EarlyStopping(monitor=train.monitor, mode=train.monitor_mode, patience=train.patience))
    progress, show_progress = stage_progress_callbacks(stage_dir.name)  # a bar on a terminal, else a line per epoch
    callbacks.extend(progress)
    return L.Trainer(
        default_root_dir=stage_dir,
        max_epochs=epochs,
        accelerator=train.accelerator,
        devices=_trainer_devices(train.devices),
        strategy=train.strategy,
        num_nodes=train.num_nodes,
        precision=train.precision,
        deterministic=train.deterministic,
        plugins=[AtomicCheckpointIO()],  # temp file + rename in the run folder; weights_only reads
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        limit_train_batches=train.limit_train_batches,
        limit_val_batches=train.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )


def _stage_done(stage_dir: Path) -> dict | None:
    marker = stage_dir / "done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _resume_path(stage_dir: Path, resume: bool) -> str | None:
    if resume:
        remove_stale_temporaries(stage_dir)  # left by a kill during a write; the renamed files are whole
    last = stage_dir / "last.ckpt"
    return str(last) if resume and last.is_file() else None


def _load_model_weights(module: ClassifierModule, checkpoint_path: Path) -> None:
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state, strict=True)


def _atomic_copy(source: Path, target: Path) -> None:
    atomic_save(target, lambda tmp: shutil.copyfile(source, tmp))


def _finish_stage(trainer: L.Trainer, stage_dir: Path) -> dict:
    callback = trainer.checkpoint_callback
    best_path = callback.best_model_path if callback is not None and callback.best_model_path else ""
    score = callback.best_model_score if callback is not None else None
    done = {
        "best_path": best_path,
        "best_score": float(score) if score is not None else None,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
    }
    reason = stop_reason(trainer)
    if reason == "interrupted":  # stopped on Ctrl+C after saving: the stage is not done
        raise TrainingInterrupted(
            f"stopped after epoch {trainer.current_epoch} of {trainer.max_epochs}; {stage_dir / 'last.ckpt'} is "
            "saved; continue with --resume"
        )
    if trainer.is_global_zero:
        atomic_write_json(stage_dir / "done.json", done)
    trainer.strategy.barrier()
    if reason == "interrupted-after-stage":
        raise TrainingInterrupted(f"stopped after finishing {stage_dir.name}; continue with --resume")
    return done
