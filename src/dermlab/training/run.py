"""One training run, from a config to a finished run folder (see docs/architecture.md for its layout).

Stage 1 trains the head with the backbone frozen (from cached features when it can), stage 2 unfreezes the
last N blocks (or all) at a lower learning rate. Each stage keeps its own ``last.ckpt`` so ``resume`` continues
at the right stage, epoch and step; the best checkpoint over both stages becomes ``checkpoints/best.ckpt``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from dermlab.config import Config, save_config
from dermlab.data.cache import create_image_loader
from dermlab.data.datamodule import DermDataModule
from dermlab.data.datasets import DatasetTable, load_dataset
from dermlab.data.duplicates import duplicates_cache_dir, record_excluded_copies, resolve_copies
from dermlab.data.splits import create_splits, load_splits, save_splits
from dermlab.data.transforms import create_transform
from dermlab.errors import ConfigError, DataError
from dermlab.io import atomic_save, atomic_write_json
from dermlab.losses import create_loss
from dermlab.models.checkpoint import checkpoint_metadata
from dermlab.models.factory import create_model, resolve_preprocessing
from dermlab.models.freezing import freeze_backbone, unfreeze_last_blocks
from dermlab.models.fusion import check_fusion_config, encode_metadata
from dermlab.training.curriculum import create_curriculum_sampler
from dermlab.training.ema import RunSizedEMA
from dermlab.training.distillation import Distillation, create_distillation
from dermlab.training.checkpoint_io import AtomicCheckpointIO, LastCheckpoint, remove_stale_temporaries
from dermlab.training.features import FeatureDataset, ViewCyclingSampler, compute_features, load_or_compute_features
from dermlab.training.loggers import AppendingCSVLogger
from dermlab.training.module import ClassifierModule
from dermlab.training.progress import show_bars, stage_progress_callbacks
from dermlab.training.samplers import create_sampler
from dermlab.training.signals import GracefulInterrupt, TrainingInterrupted, stop_reason

__all__ = ["TrainingResult", "train_run", "prepare_run_data", "RunData"]

log = logging.getLogger(__name__)


@dataclass
class RunData:
    table: DatasetTable
    frame: pd.DataFrame  # the dataset frame with a ``split`` column
    classes: list[str]
    unfiltered: pd.DataFrame | None = None  # with data.class_subset: the frame before other classes were dropped


@dataclass
class TrainingResult:
    run_dir: Path
    best_checkpoint: Path
    best_score: float | None
    wall_time_s: float
    is_global_zero: bool = True


def prepare_run_data(config: Config, run_dir: Path) -> RunData:
    """Read the dataset and the split: reuse ``run_dir/splits.csv`` (or ``data.splits_file``), else make it."""
    if not config.data.path:
        raise ConfigError("data.path is not set: pass the dataset folder (dermlab train DATA ...)")
    table = load_dataset(config.data.path, config.data)
    # copies (data.duplicates): merged into the split groups; test-folder copies and label conflicts left out
    copies = resolve_copies(
        table,
        config.data,
        cache_dir=duplicates_cache_dir(config.data, run_dir),
        workers=config.data.num_workers,
        progress=show_bars(),
    )
    table = copies.table
    splits_path = run_dir / "splits.csv"
    source = splits_path if splits_path.is_file() else (Path(config.data.splits_file) if config.data.splits_file else None)
    if source is not None:
        splits = load_splits(source, table, left_out=copies.excluded["image_id"])
    else:
        splits = create_splits(table, ratios=tuple(config.data.split_ratios), seed=config.data.split_seed)
    if source != splits_path:
        save_splits(table, splits, splits_path)
        for line in record_excluded_copies(copies, run_dir):  # counted once, when the split is made
            log.warning(line)
    frame = table.frame.copy()
    frame["split"] = splits.reindex(frame.index).fillna("").to_numpy()
    frame = frame[frame["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    classes, unfiltered = list(table.classes), None
    if config.data.class_subset is not None:
        subset = config.data.class_subset
        unknown = [name for name in subset if name not in classes]
        if unknown:
            raise ConfigError(f"data.class_subset: class {unknown[0]!r} is not in {config.data.path} (classes: {', '.join(classes)})")
        unfiltered = frame
        classes = [name for name in classes if name in subset]
        frame = frame[frame["label"].isin(classes)].reset_index(drop=True)
    for split in ("train", "val"):
        if not (frame["split"] == split).any():
            raise DataError(f"{config.data.path}: the {split} split is empty; check data.split_ratios")
    return RunData(table=table, frame=frame, classes=classes, unfiltered=unfiltered)


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


def _uses_cached_features(config: Config, multi_process: bool) -> bool:
    return config.train.cached_features and not multi_process and config.train.stage1_epochs > 0


def _uses_cached_trunk(config: Config, multi_process: bool) -> bool:
    return config.train.stage2_cached_views > 0 and not multi_process


def train_run(config: Config, run_dir: str | Path, resume: bool = False) -> TrainingResult:
    """Train per ``config`` into ``run_dir``; with ``resume`` continue from the last checkpoint of the run."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    if config_path.is_file() and not resume and any((run_dir / "checkpoints").glob("*/last.ckpt")):
        raise ConfigError(f"{run_dir}: this run folder already holds a run; pass --resume to continue it or pick a new --out")
    L.seed_everything(config.train.seed, workers=True, verbose=False)
    check_fusion_config(config)
    data = prepare_run_data(config, run_dir)
    save_config(config, config_path)
    atomic_write_json(run_dir / "classes.json", data.classes)

    model = create_model(config.model, len(data.classes))
    preprocessing = resolve_preprocessing(model, config.model)
    metadata = checkpoint_metadata(config, data.classes, preprocessing)
    train_frame = data.frame[data.frame["split"] == "train"].reset_index(drop=True)
    class_index = {name: i for i, name in enumerate(data.classes)}
    train_labels = [class_index[label] for label in train_frame["label"]]
    counts = Counter(train_labels)
    class_counts = [counts.get(i, 0) for i in range(len(data.classes))]
    loss = create_loss(config.loss.name, class_counts, **config.loss.options)

    train_transform = create_transform(config.data.augmentation, preprocessing, train=True)
    eval_transform = create_transform("none", preprocessing, train=False)
    distill = create_distillation(config, data.frame, data.classes, model, preprocessing, eval_transform, _feature_cache_dir(config, run_dir))
    loggers = [
        AppendingCSVLogger(run_dir, name="logs", version=""),
        TensorBoardLogger(run_dir / "logs", name="tensorboard", version="", default_hp_metric=False),
    ]
    checkpoints_dir = run_dir / "checkpoints"
    stage1_dir, stage2_dir = checkpoints_dir / "stage1", checkpoints_dir / "stage2"
    devices = config.train.devices
    multi_process = (devices.isdigit() and int(devices) > 1) or config.train.num_nodes > 1 or "ddp" in config.train.strategy
    module_kwargs = dict(
        optimizer=config.train.optimizer,
        weight_decay=config.train.weight_decay,
        scheduler=config.train.scheduler,
        warmup_epochs=config.train.warmup_epochs,
        seed=config.train.seed,
        metadata=metadata,
    )
    best_candidates: list[tuple[float, Path]] = []
    trainer: L.Trainer | None = None

    # ---------------------------------------------------------------- stage 1: frozen backbone
    if config.train.stage1_epochs > 0:
        done = _stage_done(stage1_dir)
        freeze_backbone(model)
        if done is None:
            if _uses_cached_features(config, multi_process):
                module, trainer, train_loader, val_loader = _stage1_from_features(
                    config, data, model, loss, preprocessing, train_transform, eval_transform, run_dir, module_kwargs, stage1_dir, loggers, distill
                )
                trainer.fit(module, train_loader, val_loader, ckpt_path=_resume_path(stage1_dir, resume))
            else:
                module = _training_module(distill, model, loss, data.classes, lr=config.train.stage1_lr, frozen_backbone=True, **module_kwargs, **_mixing(config, len(data.classes)))
                datamodule = _datamodule(config, data, train_transform, eval_transform, train_labels, config.data.batch_size)
                trainer = _make_trainer(config, stage1_dir, config.train.stage1_epochs, loggers, [])
                trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(stage1_dir, resume))
            done = _finish_stage(trainer, stage1_dir)
        if done.get("best_score") is not None:
            best_candidates.append((done["best_score"], Path(done["best_path"])))
        # stage 2 starts from the best stage-1 head
        start = Path(done["best_path"]) if done.get("best_path") else stage1_dir / "last.ckpt"
        probe = ClassifierModule(model, loss, data.classes, **module_kwargs)
        _load_model_weights(probe, start)
        if distill is not None:
            distill.load_state(start)  # stage 2 continues with the expert weights stage 1 ended on

    # ---------------------------------------------------------------- stage 2: unfreeze
    if config.train.stage2_epochs > 0:
        unfreeze_last_blocks(model, config.train.unfreeze)
        done = _stage_done(stage2_dir)
        if done is None and _uses_cached_trunk(config, multi_process):
            if distill is not None:
                raise ConfigError("train.stage2_cached_views does not combine with distillation; set it to 0")
            module, trainer, train_loader, val_loader = _stage2_from_trunk(
                config, data, model, loss, preprocessing, train_transform, eval_transform, run_dir, module_kwargs, stage2_dir, loggers
            )
            trainer.fit(module, train_loader, val_loader, ckpt_path=_resume_path(stage2_dir, resume))
            done = _finish_stage(trainer, stage2_dir)
        elif done is None:
            module = _training_module(
                distill, model, loss, data.classes, lr=config.train.stage2_lr, epoch_offset=config.train.stage1_epochs,
                layer_decay=config.train.layer_decay, **module_kwargs, **_mixing(config, len(data.classes)),
            )
            batch_size = config.train.stage2_batch_size or config.data.batch_size
            datamodule = _datamodule(config, data, train_transform, eval_transform, train_labels, batch_size, epoch_offset=config.train.stage1_epochs)
            averaging = [RunSizedEMA(config.train.ema_half_life)] if config.train.ema else []
            trainer = _make_trainer(config, stage2_dir, config.train.stage2_epochs, loggers, averaging)
            trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(stage2_dir, resume))
            done = _finish_stage(trainer, stage2_dir)
        if done.get("best_score") is not None:
            best_candidates.append((done["best_score"], Path(done["best_path"])))

    is_global_zero = trainer.is_global_zero if trainer is not None else True
    if not best_candidates:  # no validation metric: the last checkpoint of the last stage
        final_dir = stage2_dir if config.train.stage2_epochs > 0 else stage1_dir
        best_score, best_path = None, final_dir / "last.ckpt"
    else:
        pick = max if config.train.monitor_mode == "max" else min
        best_score, best_path = pick(best_candidates, key=lambda item: item[0])
    final_best = checkpoints_dir / "best.ckpt"
    final_last = checkpoints_dir / "last.ckpt"
    if is_global_zero:
        _atomic_copy(best_path, final_best)
        last_source = stage2_dir / "last.ckpt" if config.train.stage2_epochs > 0 else stage1_dir / "last.ckpt"
        _atomic_copy(last_source, final_last)
    return TrainingResult(run_dir, final_best, best_score, time.perf_counter() - started, is_global_zero)


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


def _mixing(config: Config, num_classes: int) -> dict[str, Any]:
    if config.mixing.method == "none":
        return {}
    from dermlab.training.mixing import create_mixer, mixed_loss

    return {"mixer": create_mixer(config.mixing, num_classes), "mixed_loss": mixed_loss}


def _training_module(distill: Distillation | None, *args: Any, **kwargs: Any) -> ClassifierModule:
    """A ClassifierModule, or its distillation subclass when ``distill.method`` asks for teachers."""
    return ClassifierModule(*args, **kwargs) if distill is None else distill.create_module(*args, **kwargs)


def _feature_cache_dir(config: Config, run_dir: Path) -> Path:
    return Path(config.data.cache_dir) / "features" if config.data.cache_dir else run_dir / "cache"


def _datamodule(config: Config, data: RunData, train_transform, eval_transform, train_labels: list[int], batch_size: int, epoch_offset: int = 0) -> DermDataModule:
    sampler = create_sampler(train_labels, config.data.sampler, seed=config.train.seed)
    sampler = create_curriculum_sampler(config, train_labels, sampler, epoch_offset=epoch_offset)
    return DermDataModule(
        data.frame,
        data.classes,
        train_transform,
        eval_transform,
        batch_size=batch_size,
        eval_batch_size=config.data.eval_batch_size,
        num_workers=config.data.num_workers,
        seed=config.train.seed,
        train_sampler=sampler,
        pin_memory=torch.cuda.is_available(),
        # data.cache_dir: images decoded and resized once (for every split), then read from a memory map
        image_loader=create_image_loader(
            data.frame["path"], config.data.cache_dir, eval_transform, workers=config.data.num_workers, progress=show_bars()
        ),
        metadata_encoder=encode_metadata if config.model.metadata_fusion else None,
    )


def _cached_splits(config, data, model, preprocessing, train_transform, eval_transform, run_dir, views, forward=None, cut=None):
    """Backbone outputs of the train (``views`` augmented views) and val images, from the cache or computed.

    Pooled features by default; with ``forward`` (a frozen trunk cut before module ``cut``) its output maps,
    stored as float16. Returns ``{split: (features, labels, frame, keep)}``.
    """
    device = "cuda" if torch.cuda.is_available() and config.train.accelerator in ("auto", "gpu", "cuda") else "cpu"
    cache_dir = _feature_cache_dir(config, run_dir)
    # a class subset (an LFME expert) caches the whole split, so experts and their student share one cache
    source, source_classes = (data.frame, data.classes) if data.unfiltered is None else (data.unfiltered, data.table.classes)
    if config.train.channels_last:  # as the trainer will: NHWC convolutions are faster on CPU and GPU
        model.to(memory_format=torch.channels_last)
    splits = {}
    for split, transform, n_views in (("train", train_transform, views), ("val", eval_transform, 1)):
        frame = source[source["split"] == split].reset_index(drop=True)
        key = {
            "model": config.model.name,
            "weights": config.model.weights,
            "pretrained": config.model.pretrained,
            "preprocessing": preprocessing.to_dict(),
            "augmentation": config.data.augmentation if split == "train" else "none",
            "views": n_views,
            "seed": config.train.seed,
            "images": frame["image_id"].tolist(),
            "state": _weights_fingerprint(model),
        }
        if cut is not None:
            key["trunk_cut"] = cut
        features = load_or_compute_features(
            cache_dir,
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
        labels = [data.classes.index(label) for label in frame["label"][keep]]
        splits[split] = (features, labels, frame, keep)
    return splits


def _feature_loaders(config, splits, batch_size, epoch_offset=0, wrap_train=None):
    """Train loader cycling the cached views (with the run's sampler and curriculum) and the val loader."""
    train_features, train_labels, train_frame, train_keep = splits["train"]
    base = create_sampler(train_labels, config.data.sampler, seed=config.train.seed)
    base = create_curriculum_sampler(config, train_labels, base, epoch_offset=epoch_offset)
    sampler = ViewCyclingSampler(len(train_labels), train_features.shape[0], seed=config.train.seed, base=base)
    train_dataset = FeatureDataset(train_features, train_labels, metadata=_fusion_metadata(config, train_frame, train_keep))
    if wrap_train is not None:
        train_dataset = wrap_train(train_dataset)
    train_loader = DataLoader(train_dataset, batch_size=batch_size, sampler=sampler)
    val_metadata = _fusion_metadata(config, splits["val"][2], splits["val"][3])
    val_loader = DataLoader(FeatureDataset(*splits["val"][:2], metadata=val_metadata), batch_size=config.data.eval_batch_size)
    return train_loader, val_loader


def _stage1_from_features(config, data, model, loss, preprocessing, train_transform, eval_transform, run_dir, module_kwargs, stage1_dir, loggers, distill=None):
    views = 1 if config.data.augmentation == "none" else config.train.feature_views
    splits = _cached_splits(config, data, model, preprocessing, train_transform, eval_transform, run_dir, views)
    wrap = None
    if distill is not None:
        _, _, train_frame, train_keep = splits["train"]

        def wrap(dataset):
            return distill.feature_dataset(
                dataset, splits["val"][:2], frame=train_frame, keep=train_keep, transform=train_transform, views=views
            )

    train_loader, val_loader = _feature_loaders(config, splits, config.data.batch_size, wrap_train=wrap)
    module = _training_module(distill, model, loss, data.classes, lr=config.train.stage1_lr, features_input=True, frozen_backbone=True, **module_kwargs)
    trainer = _make_trainer(config, stage1_dir, config.train.stage1_epochs, loggers, [])
    return module, trainer, train_loader, val_loader


def _stage2_from_trunk(config, data, model, loss, preprocessing, train_transform, eval_transform, run_dir, module_kwargs, stage2_dir, loggers):
    """Stage 2 over cached outputs of the frozen trunk (``train.stage2_cached_views`` augmented views)."""
    from dermlab.models.trunk import split_frozen_trunk

    split = split_frozen_trunk(model)
    views = 1 if config.data.augmentation == "none" else config.train.stage2_cached_views
    was_training = model.training
    model.eval()  # the trunk is frozen: BatchNorm statistics and dropout off while its outputs are cached
    splits = _cached_splits(
        config, data, model, preprocessing, train_transform, eval_transform, run_dir, views, forward=split.trunk, cut=split.index
    )
    model.train(was_training)
    batch_size = config.train.stage2_batch_size or config.data.batch_size
    train_loader, val_loader = _feature_loaders(config, splits, batch_size, epoch_offset=config.train.stage1_epochs)
    module = ClassifierModule(
        model, loss, data.classes, lr=config.train.stage2_lr, epoch_offset=config.train.stage1_epochs,
        feature_fn=split.tail, **module_kwargs, **_mixing(config, len(data.classes)),
    )
    trainer = _make_trainer(config, stage2_dir, config.train.stage2_epochs, loggers, [])
    return module, trainer, train_loader, val_loader


def _fusion_metadata(config: Config, frame: pd.DataFrame, keep: Any) -> torch.Tensor | None:
    """Encoded metadata of the kept rows of ``frame`` for metadata fusion; None when fusion is off."""
    return encode_metadata(frame[keep].reset_index(drop=True)) if config.model.metadata_fusion else None


def _weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of the backbone weights, so a different initialisation never reuses a cache."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in list(model.backbone.state_dict().items())[:: max(1, len(model.backbone.state_dict()) // 16)]:
        digest.update(name.encode())
        digest.update(tensor.detach().float().flatten()[:256].numpy().tobytes())
    return digest.hexdigest()[:16]
