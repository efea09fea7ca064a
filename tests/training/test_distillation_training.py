"""Distillation training: class groups, the student's loss, self-paced expert weights, teachers and experts."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fakes import class_colour, write_jpeg
from torch import nn

from dermlab.config import Config, apply_overrides, load_config
from dermlab.data.preprocessing import Preprocessing
from dermlab.data.run_data import prepare_run_data
from dermlab.data.transforms import create_transform
from dermlab.errors import CheckpointError, ConfigError
from dermlab.losses import create_loss
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
from dermlab.models.factory import DermClassifier, create_model, resolve_preprocessing
from dermlab.training.class_groups import group_classes_by_count
from dermlab.training.distillation import CHECKPOINT_KEY, Distillation, DistillationTerm, expert_weight
from dermlab.training.experts import read_experts, train_experts
from dermlab.data.datamodule import FeatureDataset
from dermlab.training.features import compute_features
from dermlab.training.module import ClassifierModule
from dermlab.training.run import train_run
from dermlab.training.teachers import Teacher, TeacherBank, convert_normalisation, load_teachers

# the module's self.log outside a Trainer only warns: these tests call its hooks directly
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

TINY = ["model.name=test_efficientnet", "model.weights=none", "model.input_size=[32,32]", "data.num_workers=0", "data.batch_size=8"]
# unequal classes, so the count groups are clear: train counts about 9, 7 | 5, 4 | 3, 3
SIZES = {"a": 15, "b": 12, "c": 8, "d": 7, "e": 5, "f": 5}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DERMLAB_PROGRESS", "0")


@pytest.fixture
def skewed_dir(tmp_path: Path) -> Path:
    root = tmp_path / "skewed"
    for class_index, (name, count) in enumerate(SIZES.items()):
        for i in range(count):
            write_jpeg(root / name / f"{name}{i:02d}.jpg", color=class_colour(class_index, 3 * i))
    return root


# --------------------------------------------------------------------------------------------- helpers
class _Flatten(nn.Module):
    """A stand-in backbone: the first ``num_features`` values of the flattened input."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1)[:, : self.num_features]


PRE = Preprocessing((2, 2), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _teacher(name: str, columns: list[int], classes: list[str], seed: int, backbone: nn.Module | None = None) -> Teacher:
    torch.manual_seed(seed)
    model = DermClassifier(backbone or _Flatten(4), len(columns)).eval()
    return Teacher(name, Path(name), model, [classes[c] for c in columns], PRE, columns)


def _distillation(bank: TeacherBank, classes: list[str], *overrides: str, student: nn.Module | None = None) -> Distillation:
    config = apply_overrides(Config(), ["distill.method=lfme", *overrides])
    return Distillation(
        config.distill, bank, total_epochs=10, student_model=student or DermClassifier(_Flatten(4), len(classes)),
        student_preprocessing=PRE, frame=pd.DataFrame(), classes=classes, eval_transform=None, cache_dir=Path("unused"),
    )


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(teacher: list[float], student: list[float], temperature: float) -> float:
    p, q = _softmax(teacher, temperature), _softmax(student, temperature)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# --------------------------------------------------------------------------------------------- class groups
def test_ham10000_like_counts_fall_into_many_medium_few() -> None:
    counts = {"nv": 3212, "mel": 532, "bkl": 534, "bcc": 238, "akiec": 153, "vasc": 63, "df": 46}
    groups = group_classes_by_count(counts)
    assert [g.name for g in groups] == ["many", "medium", "few"]
    assert [g.classes for g in groups] == [["nv", "bkl", "mel"], ["bcc", "akiec"], ["vasc", "df"]]
    assert groups[0].counts == [3212, 534, 532]
    by_threshold = group_classes_by_count(counts, thresholds=[100, 500])  # any order
    assert [g.classes for g in by_threshold] == [["nv", "bkl", "mel"], ["bcc", "akiec"], ["vasc", "df"]]
    with pytest.raises(ConfigError, match="'many'.*at least 2"):
        group_classes_by_count(counts, thresholds=[1000, 100])  # nv alone: nothing to distil
    with pytest.raises(ConfigError, match="7 classes into 4 groups"):
        group_classes_by_count(counts, groups=4)


def test_automatic_groups_are_the_least_spread_split() -> None:
    generator = np.random.default_rng(0)
    for _ in range(5):
        counts = {f"c{i}": int(n) for i, n in enumerate(generator.integers(5, 5000, size=8))}
        groups = group_classes_by_count(counts, groups=3)
        values = sorted(counts.values(), reverse=True)
        logs = np.log(values)

        def spread(cuts: tuple[int, ...]) -> float:
            bounds = [0, *cuts, len(values)]
            return sum(float(((logs[a:b] - logs[a:b].mean()) ** 2).sum()) for a, b in zip(bounds, bounds[1:]))

        feasible = [c for c in itertools.combinations(range(2, 7), 2) if c[1] - c[0] >= 2 and 8 - c[1] >= 2]
        best = min(spread(c) for c in feasible)
        sizes = [len(g.classes) for g in groups]
        chosen = (sizes[0], sizes[0] + sizes[1])
        assert spread(chosen) == pytest.approx(best)
        assert all(min(a.counts) >= max(b.counts) for a, b in zip(groups, groups[1:]))


# --------------------------------------------------------------------------------------------- normalisation
def test_normalisation_conversion_matches_normalising_the_raw_image() -> None:
    raw = torch.rand(2, 3, 8, 8)
    student = Preprocessing((8, 8), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    teacher = Preprocessing((8, 8), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    shape = (1, 3, 1, 1)
    normalised = (raw - torch.tensor(student.mean).view(shape)) / torch.tensor(student.std).view(shape)
    converted = convert_normalisation(normalised, student, teacher)
    expected = (raw - torch.tensor(teacher.mean).view(shape)) / torch.tensor(teacher.std).view(shape)
    assert torch.allclose(converted, expected, atol=1e-5)
    assert convert_normalisation(normalised, student, student) is normalised
    bigger = Preprocessing((12, 16), teacher.mean, teacher.std)
    resized = convert_normalisation(normalised, student, bigger)
    assert resized.shape == (2, 3, 12, 16)
    raw_resized = torch.nn.functional.interpolate(raw, size=(12, 16), mode="bilinear", antialias=True)
    assert torch.allclose(resized, (raw_resized - torch.tensor(teacher.mean).view(shape)) / torch.tensor(teacher.std).view(shape), atol=1e-5)


def test_teachers_with_one_backbone_share_a_pass_and_see_converted_inputs() -> None:
    classes = ["a", "b", "c", "d"]
    shared = _Flatten(4)
    first = _teacher("first", [0, 1], classes, 0, shared)
    second = _teacher("second", [2, 3], classes, 1, shared)
    other = Teacher("other", Path("other"), DermClassifier(_Flatten(4), 4).eval(), classes,
                    Preprocessing((2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), [0, 1, 2, 3])
    with torch.no_grad():
        other.model.backbone.scale.fill_(2.0)
    bank = TeacherBank([first, second], PRE, 4)
    assert bank.families == [[0, 1]]
    inputs = torch.randn(3, 3, 2, 2)
    logits = bank.logits(inputs)
    assert [tuple(t.shape) for t in logits] == [(3, 2), (3, 2)]
    assert torch.allclose(logits[0], first.model(inputs))
    kd_bank = TeacherBank([other], PRE, 4)
    raw = inputs * 0.25 + 0.5  # other teacher's normalisation is the identity on raw pixels
    assert torch.allclose(kd_bank.logits(inputs)[0], other.model(raw), atol=1e-5)
    assert not logits[0].is_inference()  # usable in the student's graph


@pytest.mark.parametrize("change", [{"color_constancy": "shades_of_gray"}, {"resize_mode": "letterbox"}])
def test_a_teacher_whose_pixels_cannot_be_converted_is_refused(change) -> None:
    """Mean, std and size convert to the teacher's; colour constancy and framing do not: refused by name."""
    classes = ["a", "b"]
    teacher = _teacher("t", [0, 1], classes, 0)
    TeacherBank([dataclasses.replace(teacher, preprocessing=dataclasses.replace(PRE, input_size=(4, 4)))], PRE, 2)
    odd = dataclasses.replace(teacher, preprocessing=dataclasses.replace(PRE, **change))
    with pytest.raises(ConfigError, match="teacher t: its preprocessing .* cannot be converted"):
        TeacherBank([odd], PRE, 2)


def test_easiness_is_the_covering_experts_true_class_probability() -> None:
    classes = ["a", "b", "c", "d", "e"]
    bank = TeacherBank([_teacher("x", [0, 1], classes, 0), _teacher("y", [3, 2], classes, 1)], PRE, 5)
    expert_x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0], [0.0, 0.0]])
    expert_y = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 3.0], [0.5, -0.5]])
    targets = torch.tensor([0, 1, 2, 4])  # class 2 is expert y's second output; nobody teaches class 4
    easiness = bank.easiness([expert_x, expert_y], targets)
    expected = [_softmax([2.0, 0.0])[0], _softmax([0.0, 1.0])[1], _softmax([1.0, 3.0])[1], 1.0]
    assert easiness.tolist() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------- the loss
STUDENT = [[1.0, 0.0, -1.0, 2.0], [0.5, 1.5, 0.0, -0.5], [-1.0, 0.2, 1.0, 0.3]]
EXPERT_0 = [[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # classes a, b
EXPERT_1 = [[0.5, 1.0], [1.0, -1.0], [0.0, 2.0]]  # classes c, d
TARGETS = [0, 1, 3]


def _student_module(curriculum: str = "none", kd_weight: float = 0.7, temperature: float = 2.0, *overrides: str) -> ClassifierModule:
    classes = ["a", "b", "c", "d"]
    bank = TeacherBank([_teacher("low", [0, 1], classes, 0), _teacher("high", [2, 3], classes, 1)], PRE, 4)
    distillation = _distillation(bank, classes, f"distill.curriculum={curriculum}", f"distill.kd_weight={kd_weight}",
                                 f"distill.temperature={temperature}", *overrides)
    distillation.expert_accuracy = [0.8, 0.5]
    student = DermClassifier(_Flatten(4), 4, drop_rate=0.0)
    with torch.no_grad():  # the head passes features through: the batch's features are the student's logits
        student.head.weight.copy_(torch.eye(4))
        student.head.bias.zero_()
    return ClassifierModule(student, create_loss("cross_entropy", [1, 1, 1, 1]), classes, term=DistillationTerm(distillation),
                            features_input=True)


def _features_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    packed = torch.cat([torch.tensor(EXPERT_0), torch.tensor(EXPERT_1)], dim=1)
    return torch.tensor(STUDENT), torch.tensor(TARGETS), packed


def test_student_loss_equals_the_hand_computed_value() -> None:
    module = _student_module()
    module.term.expert_weights = [1.0, 0.5]
    loss = module.training_step(_features_batch(), 0).detach()
    ce = sum(-math.log(_softmax(s)[t]) for s, t in zip(STUDENT, TARGETS)) / 3
    kl_low = sum(_kl(e, s[:2], 2.0) for e, s in zip(EXPERT_0, STUDENT)) / 3
    kl_high = sum(_kl(e, s[2:], 2.0) for e, s in zip(EXPERT_1, STUDENT)) / 3
    expected = ce + 0.7 * (1.0 * 4 * kl_low + 0.5 * 4 * kl_high)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    module.term.expert_weights = [0.0, 0.0]
    assert float(module.training_step(_features_batch(), 0).detach()) == pytest.approx(ce, rel=1e-5)


def test_expert_terms_can_average_over_their_own_classes_images_only() -> None:
    module = _student_module("none", 0.7, 2.0, "distill.expert_samples=group")
    module.term.expert_weights = [1.0, 0.5]
    loss = module.training_step(_features_batch(), 0).detach()
    ce = sum(-math.log(_softmax(s)[t]) for s, t in zip(STUDENT, TARGETS)) / 3
    kl_low = sum(_kl(EXPERT_0[i], STUDENT[i][:2], 2.0) for i in (0, 1)) / 2  # targets a and b
    kl_high = _kl(EXPERT_1[2], STUDENT[2][2:], 2.0)  # target d
    assert float(loss) == pytest.approx(ce + 0.7 * (4 * kl_low + 0.5 * 4 * kl_high), rel=1e-5)


def test_instance_curriculum_weighs_each_term_by_the_experts_confidence() -> None:
    module = _student_module(curriculum="instance", kd_weight=1.0)
    loss = module.training_step(_features_batch(), 0).detach()  # epoch 0: the ramp is 0, weights are the easiness
    easiness = [_softmax(EXPERT_0[0])[0], _softmax(EXPERT_0[1])[1], _softmax(EXPERT_1[2])[1]]
    total = sum(easiness)
    ce = sum(w * -math.log(_softmax(s)[t]) for w, s, t in zip(easiness, STUDENT, TARGETS)) / total
    kl_low = sum(w * _kl(e, s[:2], 2.0) for w, e, s in zip(easiness, EXPERT_0, STUDENT)) / total
    kl_high = sum(w * _kl(e, s[2:], 2.0) for w, e, s in zip(easiness, EXPERT_1, STUDENT)) / total
    assert float(loss) == pytest.approx(ce + 4 * (kl_low + kl_high), rel=1e-5)


def test_teachers_stay_out_of_the_students_state_dict() -> None:
    module = _student_module()
    plain = ClassifierModule(DermClassifier(_Flatten(4), 4), create_loss("cross_entropy", [1, 1, 1, 1]), ["a", "b", "c", "d"])
    assert module.state_dict().keys() == plain.state_dict().keys()
    assert all(not p.requires_grad or p.data_ptr() != q.data_ptr() for p in module.parameters()
               for t in module.term.distillation.bank.teachers for q in t.model.parameters())


# --------------------------------------------------------------------------------------------- expert weights
def test_expert_weight_follows_the_lfme_schedule() -> None:
    # expert at 0.8, alpha 0.3: weight 1 up to a student accuracy of 0.24, then linear to 0 at 0.8
    values = [expert_weight(s, 0.8, 0.3) for s in (0.0, 0.2, 0.24, 0.38, 0.52, 0.66, 0.8, 0.9)]
    assert values == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert expert_weight(0.5, 0.0) == 0.0  # an expert that gets nothing right teaches nothing
    assert expert_weight(0.2, float("nan")) == 1.0  # no validation image of the group: keep it


def _validate(module: ClassifierModule, correct: tuple[int, int]) -> None:
    """One fake validation epoch: 10 images of each group, ``correct[g]`` of them predicted right."""
    targets, predictions = [], []
    for group, (first, second) in enumerate(((0, 1), (2, 3))):
        for i in range(10):
            target = first if i % 2 == 0 else second
            wrong = 3 - target if group == 0 else 0  # an error anywhere, even outside the group
            targets.append(target)
            predictions.append(target if i < correct[group] else wrong)
    probabilities = torch.nn.functional.one_hot(torch.tensor(predictions), 4).float() * 0.9 + 0.025
    module.val_stats.update(probabilities, torch.tensor(targets))
    module.val_auroc.update(probabilities, torch.tensor(targets))
    module.on_validation_epoch_end()


def test_expert_weights_fade_as_the_student_catches_up() -> None:
    module = _student_module()  # experts' val accuracy: 0.8 (classes a, b) and 0.5 (c, d); alpha 0.3
    history = []
    for correct in ((1, 1), (3, 2), (5, 3), (7, 4), (8, 5), (9, 6)):
        _validate(module, correct)
        history.append(list(module.term.expert_weights))
    # by hand: w = 1 while s <= 0.3 e, then (e - s) / (0.7 e), 0 from s = e on
    first = [1.0, 0.5 / 0.56, 0.3 / 0.56, 0.1 / 0.56, 0.0, 0.0]  # e = 0.8, s = 0.1 0.3 0.5 0.7 0.8 0.9
    second = [1.0, 0.3 / 0.35, 0.2 / 0.35, 0.1 / 0.35, 0.0, 0.0]  # e = 0.5, s = 0.1 0.2 0.3 0.4 0.5 0.6
    assert [w for w, _ in history] == pytest.approx(first)
    assert [w for _, w in history] == pytest.approx(second)


def _separable(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, 3, 2, 2)`` images whose first channel's pixel ``c`` lights up for class ``c`` (4 classes)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(count) % 4
    images = 0.8 * torch.randn(count, 3, 2, 2, generator=generator)  # noisy enough that accuracy rises gradually
    images[:, 0].view(count, 4)[torch.arange(count), targets] += 3.0  # _Flatten reads channel 0's 4 pixels
    return images, targets


def test_expert_weights_fall_as_the_student_learns_in_training() -> None:
    """A few real optimisation steps: the student catches up with two perfect experts, their weights fade."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    classes = ["a", "b", "c", "d"]
    teachers = [_teacher("low", [0, 1], classes, 0), _teacher("high", [2, 3], classes, 1)]
    for teacher in teachers:  # each expert reads its own classes' pixels: right on every image of its group
        with torch.no_grad():
            teacher.model.head.weight.copy_(2.0 * torch.eye(4)[teacher.columns])
            teacher.model.head.bias.zero_()
    distillation = _distillation(TeacherBank(teachers, PRE, 4), classes, "distill.alpha=0.3")
    distillation.expert_accuracy = [1.0, 1.0]
    torch.manual_seed(0)
    student = DermClassifier(_Flatten(4), 4, drop_rate=0.0)
    with torch.no_grad():  # starts by picking the dimmest pixel, wrong on almost every image: far behind the experts
        student.head.weight.copy_(-0.3 * torch.eye(4))
        student.head.bias.zero_()
    module = ClassifierModule(student, create_loss("cross_entropy", [1, 1, 1, 1]), classes, term=DistillationTerm(distillation),
                              lr=0.05, scheduler="constant", weight_decay=0.0)
    history: list[list[float]] = []

    class _Weights(L.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            history.append(list(pl_module.term.expert_weights))

    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[_Weights()])
    train = DataLoader(TensorDataset(*_separable(32, seed=0)), batch_size=8, shuffle=False)
    val = DataLoader(TensorDataset(*_separable(32, seed=1)), batch_size=32)
    trainer.validate(module, val, verbose=False)  # the student before training
    trainer.fit(module, train, val)
    start, end = history[0], history[-1]
    assert start == [1.0, 1.0]  # at most alpha times the experts' accuracy: full weight
    assert len(history) == 7 and all(e < s for s, e in zip(start, end))
    assert max(end) < 0.3
    assert any(0.0 < w < 1.0 for weights in history for w in weights)  # the linear fade, not just on / off
    with torch.no_grad():
        images, targets = _separable(32, seed=1)
        assert float((student(images).argmax(1) == targets).float().mean()) > 0.8  # it did learn


def test_expert_weights_are_saved_and_restored_with_the_checkpoint(tmp_path: Path) -> None:
    module = _student_module()
    module.term.expert_weights = [0.25, 0.75]
    checkpoint: dict = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["expert_weights"] == [0.25, 0.75]
    assert checkpoint[CHECKPOINT_KEY]["expert_classes"] == [["a", "b"], ["c", "d"]]
    restored = _student_module()
    restored.on_load_checkpoint(checkpoint)
    assert restored.term.expert_weights == [0.25, 0.75]
    torch.save(checkpoint, tmp_path / "stage1.ckpt")
    distillation = restored.term.distillation
    distillation.load_state(tmp_path / "stage1.ckpt")
    assert distillation.initial_weights == [0.25, 0.75]  # the next stage starts where this one ended


# --------------------------------------------------------------------------------------------- teachers
def _save_tiny(path: Path, classes: list[str], size: int = 32) -> Path:
    config = apply_overrides(Config(), [*TINY, f"model.input_size=[{size},{size}]"])
    model = create_model(config.model, len(classes))
    return save_checkpoint(path, model, config, classes, resolve_preprocessing(model, config.model))


def test_load_teachers_checks_classes(tmp_path: Path) -> None:
    classes = ["a", "b", "c", "d"]
    low = _save_tiny(tmp_path / "low.ckpt", ["b", "a"])
    high = _save_tiny(tmp_path / "high.ckpt", ["c", "d"])
    teachers = load_teachers([low, high], classes, "lfme")
    assert [t.columns for t in teachers] == [[1, 0], [2, 3]]
    assert not any(p.requires_grad for t in teachers for p in t.model.parameters())
    with pytest.raises(ConfigError, match="kd needs the student's classes"):
        load_teachers([low], classes, "kd")
    with pytest.raises(ConfigError, match="already taught"):
        load_teachers([low, _save_tiny(tmp_path / "again.ckpt", ["a", "c"])], classes, "lfme")
    with pytest.raises(ConfigError, match="'z' is not one of the student's classes"):
        load_teachers([_save_tiny(tmp_path / "z.ckpt", ["a", "z"])], classes, "lfme")
    with pytest.raises(ConfigError, match="exactly one teacher"):
        load_teachers([low, high], classes, "kd")


def test_teacher_logits_for_cached_views_match_the_shortcut(ham_dir: Path, tmp_path: Path) -> None:
    """Teachers run on the images see exactly the augmented views the features were cached from."""
    config = apply_overrides(Config(), [f"data.path={ham_dir}", *TINY, "data.augmentation=derm"])
    data = prepare_run_data(config, tmp_path / "run")
    student = create_model(config.model, len(data.classes))
    preprocessing = resolve_preprocessing(student, config.model)
    teacher_model = create_model(config.model, 3)
    teacher_model.backbone.load_state_dict(student.backbone.state_dict())  # same frozen backbone
    teacher = Teacher("t", tmp_path / "t.ckpt", teacher_model.eval(), data.classes[:3], preprocessing, [0, 1, 2])
    bank = TeacherBank([teacher], preprocessing, len(data.classes))
    distillation = Distillation(
        config.distill, bank, total_epochs=2, student_model=student, student_preprocessing=preprocessing, frame=data.frame,
        classes=data.classes, eval_transform=None, cache_dir=tmp_path / "cache",
    )
    assert distillation.shares_backbone
    train = data.frame[data.frame["split"] == "train"].head(6).reset_index(drop=True)
    transform = create_transform("derm", preprocessing, train=True)
    features = compute_features(student, train, data.classes, transform, views=2, seed=0)
    labels = [data.classes.index(x) for x in train["label"]]
    keep = np.ones(len(train), dtype=bool)
    val = (features[:1], labels)
    dataset = FeatureDataset(features, labels)
    shortcut = distillation.feature_dataset(dataset, val, frame=train, keep=keep, transform=transform, views=2)
    (tmp_path / "t.ckpt").write_bytes(b"x")  # the cache key reads its size and time
    distillation.shares_backbone = False
    from_images = distillation.feature_dataset(dataset, val, frame=train, keep=keep, transform=transform, views=2)
    assert from_images.teacher_logits.shape == (2, len(train), 3)
    assert torch.allclose(shortcut.teacher_logits, from_images.teacher_logits, atol=1e-4)
    assert not torch.allclose(from_images.teacher_logits[0], from_images.teacher_logits[1])  # two different views
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the teachers' logits were cached
    inputs, label, logits = from_images[len(train) + 2]  # view 1, image 2
    assert torch.equal(inputs, features[1, 2]) and int(label) == labels[2]
    assert torch.equal(logits, from_images.teacher_logits[1, 2])


# --------------------------------------------------------------------------------------------- end to end
def test_class_subset_keeps_only_the_subsets_images(skewed_dir: Path, tmp_path: Path) -> None:
    config = apply_overrides(Config(), [f"data.path={skewed_dir}", *TINY, 'data.class_subset=["e", "c"]'])
    data = prepare_run_data(config, tmp_path / "run")
    assert data.classes == ["c", "e"]  # the dataset's order
    assert set(data.frame["label"]) == {"c", "e"}
    assert len(data.frame) == SIZES["c"] + SIZES["e"]
    assert len(data.unfiltered) == sum(SIZES.values())
    with pytest.raises(ConfigError, match="'zz' is not in"):
        prepare_run_data(apply_overrides(config, ['data.class_subset=["c", "zz"]']), tmp_path / "other")
    with pytest.raises(ConfigError, match="at least two"):
        apply_overrides(config, ['data.class_subset=["c"]'])


@pytest.mark.slow
def test_experts_see_only_their_groups_images(skewed_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dermlab.data.datamodule as datamodule

    seen: list[tuple[str, list]] = []

    class RecordingFeatures(datamodule.FeatureDataset):
        def __init__(self, features, labels, *args, **kwargs):
            super().__init__(features, labels, *args, **kwargs)
            seen.append(("features", [features.shape[1], list(labels)]))

    class RecordingImages(datamodule.ImageDataset):
        def __init__(self, frame, classes, transform, *args, **kwargs):
            super().__init__(frame, classes, transform, *args, **kwargs)
            seen.append(("images", list(frame["path"])))

    monkeypatch.setattr(datamodule, "FeatureDataset", RecordingFeatures)
    monkeypatch.setattr(datamodule, "ImageDataset", RecordingImages)
    base = apply_overrides(Config(), [f"data.path={skewed_dir}", *TINY, "train.stage1_epochs=1", "train.stage2_epochs=1",
                                      f"data.cache_dir={tmp_path / 'cache'}", "data.augmentation=none"])
    train_run(apply_overrides(base, ["train.stage2_epochs=0"]), tmp_path / "student")
    split = pd.read_csv(tmp_path / "student" / "splits.csv")
    seen.clear()
    runs = train_experts(base, tmp_path / "student", tmp_path / "experts")
    manifest = json.loads((tmp_path / "experts" / "experts.json").read_text())
    assert [g["classes"] for g in manifest["groups"]] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert read_experts(tmp_path / "experts") == (runs, tmp_path.joinpath("student", "splits.csv").resolve())
    for group, run_dir in zip(manifest["groups"], runs):
        loaded = load_checkpoint(run_dir)
        assert loaded.classes == group["classes"]
        assert loaded.model.head.out_features == 2
        assert load_config(run_dir / "config.yaml").data.class_subset == group["classes"]
        expected_train = split[(split["split"] == "train") & split["label"].isin(group["classes"])]
        assert group["train_counts"] == [int((expected_train["label"] == c).sum()) for c in group["classes"]]
    # stage 1 (cached features) and stage 2 (images) of each expert: training and validation data
    feature_sets = [payload for kind, payload in seen if kind == "features"]
    image_sets = [payload for kind, payload in seen if kind == "images"]
    assert len(feature_sets) == 2 * len(runs)
    for group, (train_set, val_set) in zip(manifest["groups"], zip(feature_sets[::2], feature_sets[1::2])):
        rows = split[split["label"].isin(group["classes"])]
        assert train_set[0] == int((rows["split"] == "train").sum())
        assert val_set[0] == int((rows["split"] == "val").sum())
        assert set(train_set[1]) == {0, 1}
    assert image_sets  # stage 2 read images: every one from the expert's own classes
    for paths, group in zip(image_sets, [g for g in manifest["groups"] for _ in range(len(image_sets) // 3)]):
        assert {Path(p).parent.name for p in paths} <= set(group["classes"])
    # a second call reuses the finished experts
    stamps = [(r / "checkpoints" / "best.ckpt").stat().st_mtime_ns for r in runs]
    train_experts(base, tmp_path / "student", tmp_path / "experts")
    assert [(r / "checkpoints" / "best.ckpt").stat().st_mtime_ns for r in runs] == stamps


@pytest.mark.slow
def test_lfme_student_trains_end_to_end_with_curriculum(skewed_dir: Path, tmp_path: Path) -> None:
    base = apply_overrides(Config(), [f"data.path={skewed_dir}", *TINY, "train.stage1_epochs=2", "train.stage2_epochs=0",
                                      "train.stage1_lr=0.01", f"data.cache_dir={tmp_path / 'cache'}", "data.augmentation=none"])
    train_run(base, tmp_path / "alone")
    runs = train_experts(base, tmp_path / "alone", tmp_path / "experts")
    student = apply_overrides(base, [
        "train.stage2_epochs=1", "distill.method=lfme", f"distill.teachers={json.dumps([str(r) for r in runs])}",
        f"data.splits_file={tmp_path / 'alone' / 'splits.csv'}", "distill.curriculum=instance",
    ])
    result = train_run(student, tmp_path / "lfme")
    logged = pd.read_csv(tmp_path / "lfme" / "logs" / "metrics.csv")
    for name in ("many", "medium", "few"):
        weights = logged[f"distill/w_{name}"].dropna()
        assert len(weights) == 3 and weights.between(0, 1).all()
    assert logged["train/distill"].dropna().gt(0).all()
    checkpoint = torch.load(result.best_checkpoint, weights_only=True)
    state = checkpoint[CHECKPOINT_KEY]
    assert state["expert_names"] == ["many", "medium", "few"]
    assert all(0.0 <= a <= 1.0 for a in state["expert_val_accuracy"])
    assert all(key.startswith("model.") for key in checkpoint["state_dict"])
    loaded = load_checkpoint(tmp_path / "lfme")  # an ordinary checkpoint: no teacher needed to use it
    assert loaded.classes == list(SIZES) and loaded.config.distill.teachers == [str(r) for r in runs]


@pytest.mark.slow
def test_kd_converts_inputs_for_a_teacher_of_another_size(ham_dir: Path, tmp_path: Path) -> None:
    base = apply_overrides(Config(), [f"data.path={ham_dir}", *TINY, "train.stage1_epochs=1", "train.stage2_epochs=0",
                                      "data.augmentation=none"])
    train_run(base, tmp_path / "teacher")
    student = apply_overrides(base, [
        "model.input_size=[40,40]", "train.stage2_epochs=1", "distill.method=kd", "distill.curriculum=balanced_subset",
        f"distill.teachers={json.dumps([str(tmp_path / 'teacher')])}", f"data.splits_file={tmp_path / 'teacher' / 'splits.csv'}",
    ])
    train_run(student, tmp_path / "student")
    logged = pd.read_csv(tmp_path / "student" / "logs" / "metrics.csv")
    assert len(logged["train/distill"].dropna()) == 2  # stage 1 (teacher run on the cached views) and stage 2
    assert logged["train/distill"].dropna().gt(0).all()
    assert load_checkpoint(tmp_path / "student").preprocessing.input_size == (40, 40)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        bad = apply_overrides(student, [f"distill.teachers={json.dumps([str(tmp_path)])}"])
        train_run(bad, tmp_path / "bad")


@pytest.mark.slow
def test_distill_commands(skewed_dir: Path, tmp_path: Path) -> None:
    from dermlab.cli import main

    settings = ["model.name=test_efficientnet", "model.weights=none", "model.input_size=[32,32]", "data.num_workers=0", "train.stage1_epochs=1",
                "train.stage2_epochs=0", f"data.cache_dir={tmp_path / 'cache'}", "data.augmentation=none"]
    train_run(apply_overrides(Config(), [f"data.path={skewed_dir}", *settings]), tmp_path / "alone")
    common = [item for setting in settings for item in ("--set", setting)]
    assert main(["distill", "experts", str(skewed_dir), "--student-split", str(tmp_path / "alone"),
                 "--out", str(tmp_path / "experts"), "--thresholds", "6", *common]) == 0
    assert main(["distill", "student", str(skewed_dir), "--experts", str(tmp_path / "experts"),
                 "--out", str(tmp_path / "lfme"), "--curriculum", "balanced_subset", *common]) == 0
    metrics = json.loads((tmp_path / "lfme" / "metrics.json").read_text())
    assert metrics["distill"]["expert_names"] == ["many", "few"]
    assert metrics["distill"]["expert_classes"] == [["a", "b"], ["c", "d", "e", "f"]]
    assert "test" in metrics
    config = load_config(tmp_path / "lfme" / "config.yaml")
    assert config.distill.method == "lfme" and config.distill.curriculum == "balanced_subset"
    assert config.data.splits_file == str((tmp_path / "alone" / "splits.csv").resolve())
    assert "distill:" in (tmp_path / "lfme" / "report.html").read_text()
    expert_metrics = json.loads((tmp_path / "experts" / "few" / "metrics.json").read_text())
    assert expert_metrics["class_subset"] == ["c", "d", "e", "f"]


@pytest.mark.slow
def test_kd_from_an_ensemble_of_two_runs(ham_dir: Path, tmp_path: Path) -> None:
    from dermlab.training.ensemble import create_ensemble_run

    base = apply_overrides(Config(), [f"data.path={ham_dir}", *TINY, "train.stage1_epochs=1", "train.stage2_epochs=0",
                                      "data.augmentation=none", "evaluation.bootstrap_resamples=0"])
    train_run(base, tmp_path / "a")
    split = f"data.splits_file={tmp_path / 'a' / 'splits.csv'}"
    train_run(apply_overrides(base, ["train.seed=3", split]), tmp_path / "b")
    create_ensemble_run([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "ens")
    teachers = load_teachers([tmp_path / "ens"], load_checkpoint(tmp_path / "a").classes, "kd")
    bank = TeacherBank(teachers, teachers[0].preprocessing, len(teachers[0].classes))
    assert not bank.shares_backbone(load_checkpoint(tmp_path / "a").model, teachers[0].preprocessing)
    x = torch.randn(2, 3, 32, 32)
    ensemble_logits = bank.logits(x)[0]
    with torch.inference_mode():
        by_hand = torch.log((load_checkpoint(tmp_path / "a").model(x).softmax(1) + load_checkpoint(tmp_path / "b").model(x).softmax(1)) / 2)
    assert torch.allclose(ensemble_logits, by_hand, atol=1e-5)  # the teacher's logits: log of the members' mean
    student = apply_overrides(base, ["train.stage2_epochs=1", "distill.method=kd", split,
                                     f"distill.teachers={json.dumps([str(tmp_path / 'ens')])}"])
    result = train_run(student, tmp_path / "student")
    logged = pd.read_csv(tmp_path / "student" / "logs" / "metrics.csv")
    assert logged["train/distill"].dropna().gt(0).all() and result.best_checkpoint.is_file()


def test_expert_class_counts_leave_out_the_copies_the_split_left_out(folders_split_dir: Path, tmp_path: Path) -> None:
    """A publisher's test images copied into train are left out of the split; the experts' grouping must read the
    split the same way (it once read the raw table and refused the split for the rows it did not have)."""
    from dermlab.config import Config, apply_overrides
    from dermlab.data.run_data import prepare_run_data
    from dermlab.training.experts import train_class_counts

    import shutil

    for folder in sorted((folders_split_dir / "test").iterdir()):
        shutil.copyfile(folder / "test00.jpg", folders_split_dir / "train" / folder.name / "copy_of_test00.jpg")
    config = apply_overrides(Config(), [f"data.path={folders_split_dir}"])
    data = prepare_run_data(config, tmp_path / "student")
    assert len(pd.read_csv(tmp_path / "student" / "excluded_copies.csv")) == 3
    counts = train_class_counts(config, tmp_path / "student" / "splits.csv")
    assert list(counts.values()) == data.class_counts("train") and list(counts) == data.classes
