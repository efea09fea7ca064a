"""Adapting a trained run to another clinic's images without their labels (``dermlab adapt``).

Methods (:data:`ADAPTATION_METHODS`):

- ``adabn`` (Li et al. 2016): every BatchNorm layer's running mean and variance are re-estimated on the target
  images (a cumulative average over one pass, the model otherwise in eval mode); no weight changes.
- ``tent`` (Wang et al. 2021): a few epochs of entropy minimisation of the softmax over the target images,
  updating only the BatchNorm affine parameters (normalising with each batch's statistics, as TENT does); then
  the running statistics are re-estimated as in ``adabn``, so the adapted model answers one image at a time.
- ``prior`` (Saerens et al. 2002): for a change of the class mix (another clinic sees more melanomas), the
  target's class shares are estimated by EM from the run's calibrated probabilities (its TTA views and
  temperature) and the head's bias moves by ``temperature * log(target share / training share)``; the network's
  features, and so its feature statistics and rankings within a pair of classes, do not change. The decision
  rule's class shares become the target's, so the balanced rule (``log p - tau * log shares``) removes the shares
  the adapted posteriors now carry: with ``tau = 1`` it decides exactly as before adapting.

The result is an ordinary run folder: ``config.yaml``, ``classes.json`` and ``splits.csv`` of the source run,
``checkpoints/best.ckpt`` with the adapted weights and the source's temperature, abstention, decision rule and
TTA views (after ``adabn`` or ``tent`` not its feature statistics, which describe the source network's features:
the adapted run gives no familiarity warning, and a run whose abstention rule uses ``mahalanobis`` is refused),
and ``lineage.json`` (source run, method, how many target images, their digest). Labels are never
read: a folder of class sub-folders is just a folder of images here. A metadata-fusion model adapts on the answers
it gives with each image's age, sex and site when they are given (``metadata``), as it will be scored and used;
without them every image is all unknown.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dermlab.data.images import IMAGE_EXTENSIONS, read_image
from dermlab.data.metadata import METADATA_WIDTH, PatientMetadata, encode_patient_metadata
from dermlab.data.transforms import create_transform
from dermlab.errors import ConfigError, DataError
from dermlab.evaluation.abstention import needs_features, needs_levels
from dermlab.evaluation.inference import checkpoint_temperature
from dermlab.io import atomic_write_json
from dermlab.models.checkpoint import LoadedModel, load_checkpoint, run_dir_of, save_checkpoint
from dermlab.models.classifier import uses_metadata
from dermlab.registry import Registry

__all__ = ["ADAPTATION_METHODS", "AdaptedRun", "adapt_model", "adapt_run", "class_mix_line", "em_class_shares", "list_images",
           "metadata_rows"]

Batch = tuple[torch.Tensor, "torch.Tensor | None"]  # images, and their encoded metadata for a fusion model
Batches = Callable[[], Iterator[Batch]]
ADAPTATION_METHODS: Registry[Callable[..., dict[str, Any]]] = Registry("adaptation method")


@dataclass
class AdaptedRun:
    out: Path
    method: str
    images: int
    details: dict[str, Any]
    classes: tuple[str, ...] = ()


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files of ``inputs`` (files, or folders searched recursively), in a stable order, no repeats."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(sorted((p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=str))
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such image file or folder")
    return list(dict.fromkeys(paths))


class _Images(Dataset):
    def __init__(self, paths: Sequence[Path], transform: Any, metadata: torch.Tensor | None = None) -> None:
        self.paths, self.transform = list(paths), transform
        self.metadata = metadata if metadata is not None else torch.empty(len(self.paths), 0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(read_image(self.paths[index])), self.metadata[index]


def _outputs(model: nn.Module, images: torch.Tensor, metadata: torch.Tensor | None) -> torch.Tensor:
    return model(images) if metadata is None else model(images, metadata)


def metadata_rows(paths: Sequence[Path], records: Mapping[str, PatientMetadata]) -> torch.Tensor:
    """The encoded metadata of each of ``paths`` (looked up by image id, the file name without its suffix; an image
    without a record is all unknown), for :func:`adapt_model`'s ``metadata``."""
    return encode_patient_metadata([records.get(Path(path).stem) for path in paths])


def _batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        raise ConfigError("the model has no BatchNorm layers: adabn and tent have nothing to adapt")
    return layers


@ADAPTATION_METHODS.register("adabn")
def _adabn(model: nn.Module, batches: Batches, **_: Any) -> dict[str, Any]:
    """Re-estimate every BatchNorm layer's running statistics on the target images (one pass, no gradients)."""
    layers = _batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the whole pass, not an exponential one
        layer.train()
    seen = 0
    with torch.no_grad():
        for images, metadata in batches():
            _outputs(model, images, metadata)
            seen += images.shape[0]
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
    return {"batchnorm_layers": len(layers), "images_seen": seen}


@ADAPTATION_METHODS.register("tent")
def _tent(model: nn.Module, batches: Batches, *, epochs: int = 1, lr: float = 1e-3, **_: Any) -> dict[str, Any]:
    """Entropy minimisation of the BatchNorm affine parameters on batch statistics, then AdaBN statistics."""
    layers = _batchnorm_layers(model)
    affine = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    if not affine:
        raise ConfigError("the model's BatchNorm layers have no affine parameters: tent has nothing to train")
    trainable = {id(p): p.requires_grad for p in model.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in affine:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(affine, lr=lr)
    model.eval()
    for layer in layers:
        layer.train()  # normalise with the batch's own statistics
    entropies = []
    for _epoch in range(epochs):
        for images, metadata in batches():
            if images.shape[0] < 2:
                continue  # batch statistics of one image are not statistics
            log_probabilities = torch.log_softmax(_outputs(model, images, metadata).float(), dim=1)
            entropy = -(log_probabilities.exp() * log_probabilities).sum(dim=1).mean()
            optimizer.zero_grad()
            entropy.backward()
            optimizer.step()
            entropies.append(float(entropy.detach()))
    for parameter in model.parameters():
        parameter.requires_grad_(trainable[id(parameter)])
    details = _adabn(model, batches)
    return {**details, "epochs": epochs, "lr": lr, "steps": len(entropies),
            "entropy_first": entropies[0] if entropies else None, "entropy_last": entropies[-1] if entropies else None}


@ADAPTATION_METHODS.register("prior")
def _prior(
    model: nn.Module,
    batches: Batches,
    *,
    temperature: float = 1.0,
    train_prior: Sequence[float] | None = None,
    views: Sequence[str] = ("identity",),
    iterations: int = 200,
    **_: Any,
) -> dict[str, Any]:
    """The target's class shares by EM over the calibrated probabilities (Saerens et al. 2002); the head's bias
    then moves by ``temperature * log(target share / training share)``, so every prediction is the posterior
    under the target's shares. The network's features do not change."""
    from dermlab.evaluation.tta import view_logits

    if train_prior is None:
        raise ConfigError("prior needs the run's training class shares (its fitted decision rule: evaluation.logit_adjustment)")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or head.bias is None:
        raise ConfigError("prior needs a model with one linear head with a bias (not an ensemble)")
    model.eval()
    with torch.no_grad():
        probabilities = torch.cat([
            torch.softmax(view_logits(partial(_outputs, model, metadata=metadata), images, views).double() / temperature, dim=-1).mean(dim=0)
            for images, metadata in batches()
        ])
    source = torch.as_tensor(list(train_prior), dtype=torch.float64)
    if source.shape != (probabilities.shape[1],) or not bool((source > 0).all()):
        raise ConfigError(f"prior: the training class shares must be {probabilities.shape[1]} numbers > 0, got {list(train_prior)}")
    target, steps = em_class_shares(probabilities, source / source.sum(), iterations)
    with torch.no_grad():
        head.bias += (temperature * torch.log(target / (source / source.sum()))).to(head.bias.dtype)
    return {"images_seen": int(probabilities.shape[0]), "train_prior": (source / source.sum()).tolist(),
            "target_prior": target.tolist(), "em_iterations": steps}


_prior.changes_features = False  # type: ignore[attr-defined]


def em_class_shares(probabilities: torch.Tensor, prior: torch.Tensor, iterations: int = 200, tolerance: float = 1e-7) -> tuple[torch.Tensor, int]:
    """Saerens et al.'s EM: the class shares ``pi'`` of a target set from posteriors ``(N, C)`` computed under
    training shares ``prior``; each step re-weights the posteriors by ``pi' / prior`` and averages them."""
    shares = prior.clone()
    for step in range(1, iterations + 1):
        weighted = probabilities * (shares / prior)
        updated = (weighted / weighted.sum(dim=1, keepdim=True)).mean(dim=0).clamp(min=1e-6)
        updated = updated / updated.sum()
        converged = float((updated - shares).abs().max()) < tolerance
        shares = updated
        if converged:
            return shares, step
    return shares, iterations


def class_mix_line(classes: Sequence[str], details: dict[str, Any]) -> str | None:
    """The console line of the class mix ``prior`` estimated (``details`` from :func:`adapt_model`); None for the
    methods that estimate none."""
    if "target_prior" not in details:
        return None
    shares = ", ".join(f"{name} {share:.3f}" for name, share in zip(classes, details["target_prior"]))
    return f"estimated class mix of these images (EM): {shares}"


def _refuse_untrained_statistics(loaded: LoadedModel, method: str) -> None:
    """Refuse adabn / tent on a network whose BatchNorm statistics never followed its training batches: its
    layers learned around the pretrained statistics, which re-estimating them would replace."""
    layers = [m for m in loaded.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers and all(m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0 for m in layers):
        raise ConfigError(
            f"{loaded.path}: its BatchNorm statistics were never trained (frozen as loaded: train.frozen_batchnorm, "
            f"or a run trained before dermlab set train mode at each epoch), so its layers learned around the "
            f"pretrained statistics and {method} would replace them (measured: in-distribution accuracy 0.826 -> "
            "0.678); retrain with train.frozen_batchnorm=false to adapt its statistics (--method prior, which moves "
            "only the head's bias, is allowed)"
        )


def _changes_features(method: str) -> bool:
    return bool(getattr(ADAPTATION_METHODS.get(method), "changes_features", True))


def adapt_model(loaded: LoadedModel, paths: Sequence[Path], method: str = "adabn", *, batch_size: int = 32,
                num_workers: int = 0, seed: int = 0, metadata: torch.Tensor | None = None, **options: Any) -> dict[str, Any]:
    """Adapt ``loaded.model`` in place on the images at ``paths`` (see the module docstring).

    ``metadata``: for a metadata-fusion model, the encoded age, sex and site of each image (``(len(paths),
    METADATA_WIDTH)``, :func:`metadata_rows`), so it adapts on the answers it will give with them; without it every
    image is all unknown. Refused for a model that takes no metadata (it would be silently dropped)."""
    adapt = ADAPTATION_METHODS.get(method)
    if not paths:
        raise DataError("no images to adapt on")
    metadata = _checked_metadata(loaded, metadata, len(paths))
    rule = loaded.extras.get("abstention") or {}
    scores = list(rule.get("thresholds") or {})
    if _changes_features(method) and (needs_features(scores) or needs_levels(scores)):
        used = " and ".join(name for name, needs in (("mahalanobis", needs_features), ("level", needs_levels)) if needs(scores))
        raise ConfigError(
            f"{loaded.path}: its abstention rule uses {used}, a distance to the training images' features, which "
            f"{method} changes; adapt a run whose evaluation.abstain_scores have no feature or level score, or use prior"
        )
    if _changes_features(method):
        _refuse_untrained_statistics(loaded, method)
        for key in ("feature_statistics", "level_statistics"):  # they describe the source network's features, not the adapted one's
            loaded.extras.pop(key, None)
    decision = loaded.extras.get("decision") or {}
    options = {"temperature": checkpoint_temperature(loaded.extras, str(loaded.path)),
               "train_prior": decision.get("class_prior"),
               "views": tuple(loaded.extras.get("tta_views") or loaded.config.evaluation.tta or ("identity",)), **options}
    dataset = _Images(paths, create_transform("none", loaded.preprocessing, train=False), metadata)
    model = loaded.model

    def batches() -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(seed)  # the same order on every pass
        for images, rows in DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers):
            yield images, (rows if metadata is not None else None)

    details = adapt(model, batches, **options)
    if "target_prior" in details and decision:
        # the adapted posteriors carry the target's shares, so the balanced rule must take those out, not the
        # training shares: with the training shares it would correct for the class mix twice
        loaded.extras["decision"] = {**decision, "class_prior": list(details["target_prior"])}
    model.eval()
    return details


def _checked_metadata(loaded: LoadedModel, metadata: torch.Tensor | None, images: int) -> torch.Tensor | None:
    if metadata is None:
        return None
    if not uses_metadata(loaded.model):
        raise ConfigError(f"{loaded.path}: its model takes no metadata (trained without model.metadata_fusion); "
                          "adapt without it, it would be silently dropped")
    if tuple(metadata.shape) != (images, METADATA_WIDTH):
        raise ConfigError(f"metadata for adapting must be {images} rows of {METADATA_WIDTH} encoded values, got {tuple(metadata.shape)}")
    return metadata.float()


def _digest(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths, key=str):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def adapt_run(run: str | Path, images: Sequence[str | Path], out: str | Path, method: str = "adabn", *,
              metadata: Mapping[str, PatientMetadata] | None = None, **options: Any) -> AdaptedRun:
    """Write the adapted copy of ``run`` into ``out`` (an ordinary run folder; see the module docstring).
    ``metadata``: image id -> age, sex and site (:func:`dermlab.data.metadata.read_metadata_csv`) for a fusion model."""
    out = Path(out)
    if (out / "checkpoints").exists() or (out / "config.yaml").exists():
        raise ConfigError(f"{out}: this folder already holds a run; pick a new --out")
    source = run_dir_of(run)
    loaded = load_checkpoint(run)
    paths = list_images(images)
    encoded = metadata_rows(paths, metadata) if metadata is not None else None
    details = adapt_model(loaded, paths, method, metadata=encoded, **options)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "classes.json", "splits.csv"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    adaptation = {"method": method, "source": str(loaded.path), "images": len(paths), "images_digest": _digest(paths),
                  "inputs": [str(p) for p in images], **details}
    if metadata is not None:
        adaptation["images_with_metadata"] = sum(Path(p).stem in metadata for p in paths)
    extras = {key: value for key, value in loaded.extras.items() if key != "adaptation"}
    save_checkpoint(out / "checkpoints" / "best.ckpt", loaded.model, loaded.config, loaded.classes, loaded.preprocessing,
                    **extras, adaptation=adaptation)
    atomic_write_json(out / "lineage.json", {"made_with": "dermlab adapt", **adaptation})
    return AdaptedRun(out, method, len(paths), details, tuple(loaded.classes))
