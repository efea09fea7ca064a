"""dermlab adapt: BatchNorm statistics (AdaBN) and entropy minimisation (TENT) on unlabelled images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dermlab.config import Config, ModelConfig
from dermlab.errors import ConfigError, DataError
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing
from dermlab.training.adapt import adapt_run, list_images

CLASSES = ["nv", "mel"]


def _run(root: Path, statistics_trained: bool = True) -> Path:
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32]))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    if statistics_trained:  # as after training with its BatchNorm statistics following the batches
        for layer in model.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.num_batches_tracked.fill_(10)
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, config, CLASSES, resolve_preprocessing(model, config.model),
                    temperature=1.5)
    (root / "splits.csv").write_text("image_id,split\na,train\n")
    return root


def _images(folder: Path, count: int = 6, brightness: int = 200) -> Path:
    """``count`` bright noisy PNGs in class sub-folders (which adapt must ignore as labels)."""
    rng = np.random.default_rng(1)
    for index in range(count):
        target = folder / ("mel" if index % 2 else "nv") / f"{index}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(rng.normal(brightness, 20, (36, 36, 3)), 0, 255).astype(np.uint8)).save(target)
    return folder


def _running_means(model: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_adabn_sets_the_first_layers_statistics_to_those_of_the_target_images(tmp_path: Path) -> None:
    source = _run(tmp_path / "run")
    images = _images(tmp_path / "target")
    adapted = adapt_run(source, [images], tmp_path / "adapted", method="adabn", batch_size=3)  # equal batches: mean of means
    assert adapted.images == 6
    before, after = load_checkpoint(source), load_checkpoint(tmp_path / "adapted")
    # the first BatchNorm follows the stem conv: its running mean is the mean of the conv's outputs on these images
    stem = after.model.backbone.conv_stem
    from dermlab.data.transforms import create_transform

    transform = create_transform("none", after.preprocessing, train=False)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in list_images([images])])
    with torch.no_grad():
        expected = stem(batch).mean(dim=(0, 2, 3))
    assert torch.allclose(_running_means(after.model)[0], expected, atol=1e-4)
    assert not torch.allclose(_running_means(before.model)[0], expected, atol=1e-2)
    # only statistics change: every learned weight is the source's
    weights = {k: v for k, v in after.model.state_dict().items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(v, before.model.state_dict()[k]) for k, v in weights.items())
    # an ordinary run folder that says where it came from, keeping the source's calibration
    assert after.extras["temperature"] == 1.5
    assert after.extras["adaptation"]["method"] == "adabn" and after.extras["adaptation"]["images"] == 6
    lineage = json.loads((tmp_path / "adapted" / "lineage.json").read_text())
    assert lineage["made_with"] == "dermlab adapt" and len(lineage["images_digest"]) == 16
    assert (tmp_path / "adapted" / "splits.csv").read_text() == (source / "splits.csv").read_text()


def test_tent_trains_only_the_batchnorm_affine_parameters_and_lowers_the_entropy(tmp_path: Path) -> None:
    source = _run(tmp_path / "run")
    images = _images(tmp_path / "target", count=8)
    adapted = adapt_run(source, [images], tmp_path / "adapted", method="tent", batch_size=4, epochs=5, lr=0.05)
    assert adapted.details["steps"] == 10
    assert adapted.details["entropy_last"] < adapted.details["entropy_first"]
    before, after = load_checkpoint(source).model.state_dict(), load_checkpoint(tmp_path / "adapted").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    bn_names = {name for name, m in load_checkpoint(source).model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert changed and all(k.rsplit(".", 1)[0] in bn_names for k in changed)
    assert any(k.endswith(".weight") for k in changed)  # affine parameters moved, not only statistics


def test_bad_inputs_are_refused_with_the_reason(tmp_path: Path) -> None:
    source = _run(tmp_path / "run")
    with pytest.raises(DataError, match="missing: no such image file or folder"):
        adapt_run(source, [tmp_path / "missing"], tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images to adapt on"):
        adapt_run(source, [tmp_path / "empty"], tmp_path / "b")
    with pytest.raises(ConfigError, match="unknown adaptation method 'bn'"):
        adapt_run(source, [_images(tmp_path / "target")], tmp_path / "c", method="bn")
    adapt_run(source, [tmp_path / "target"], tmp_path / "d")
    with pytest.raises(ConfigError, match="already holds a run"):
        adapt_run(source, [tmp_path / "target"], tmp_path / "d")


def test_predict_adapt_predicts_with_the_model_adapted_on_those_images(tmp_path: Path, capsys) -> None:
    import pandas as pd

    from dermlab.cli import main

    source = _run(tmp_path / "run")
    images = _images(tmp_path / "target")
    assert main(["predict", str(source), str(images), "--out", str(tmp_path / "plain.csv")]) == 0
    assert main(["predict", str(source), str(images), "--adapt", "adabn", "--batch-size", "6", "--out", str(tmp_path / "adapted.csv")]) == 0
    assert "adapted with adabn on the 6 images given" in capsys.readouterr().err
    plain, adapted = pd.read_csv(tmp_path / "plain.csv"), pd.read_csv(tmp_path / "adapted.csv")
    assert list(plain["path"]) == list(adapted["path"])
    assert not np.allclose(plain["prob_mel"], adapted["prob_mel"])  # other statistics, other probabilities
    # the same as adapting into a run folder and predicting with it (one batch of all six: the same statistics)
    adapt_run(source, [images], tmp_path / "adapted-run", method="adabn", batch_size=6)
    assert main(["predict", str(tmp_path / "adapted-run"), str(images), "--out", str(tmp_path / "from-run.csv")]) == 0
    assert np.allclose(pd.read_csv(tmp_path / "from-run.csv")["prob_mel"], adapted["prob_mel"], atol=1e-5)
    assert main(["predict", str(source), str(images), "--adapt", "adabn", "--engine", "onnx"]) == 2
    assert "does not work with --engine onnx" in capsys.readouterr().err


def test_an_adapted_run_drops_the_feature_statistics_and_a_feature_score_rule_is_refused(tmp_path: Path) -> None:
    from dermlab.evaluation.familiarity import fit_feature_statistics
    from dermlab.evaluation.level_statistics import fit_level_statistics

    rng = np.random.default_rng(0)
    source = _run(tmp_path / "run")
    loaded = load_checkpoint(source)
    width = loaded.model.num_features
    statistics = fit_feature_statistics(rng.normal(size=(20, width)), rng.normal(size=(10, width)), components=4).to_dict()
    images = _images(tmp_path / "target")
    levels = fit_level_statistics({"blocks.0": rng.normal(size=(20, 4))}, {"blocks.0": rng.normal(size=(10, 4))}, components=2).to_dict()
    save_checkpoint(source / "checkpoints" / "best.ckpt", loaded.model, loaded.config, CLASSES, loaded.preprocessing,
                    temperature=1.5, feature_statistics=statistics, level_statistics=levels)
    adapt_run(source, [images], tmp_path / "adapted", method="adabn", batch_size=3)
    assert {"feature_statistics", "level_statistics"} <= set(load_checkpoint(source).extras)
    assert not {"feature_statistics", "level_statistics"} & set(load_checkpoint(tmp_path / "adapted").extras)
    rule = {"thresholds": {"mahalanobis": -3.0}, "false_rejection": 0.05}
    save_checkpoint(source / "checkpoints" / "best.ckpt", loaded.model, loaded.config, CLASSES, loaded.preprocessing,
                    feature_statistics=statistics, abstention=rule)
    with pytest.raises(ConfigError, match="mahalanobis"):
        adapt_run(source, [images], tmp_path / "adapted2", method="adabn", batch_size=3)
    assert not (tmp_path / "adapted2").exists()
    save_checkpoint(source / "checkpoints" / "best.ckpt", loaded.model, loaded.config, CLASSES, loaded.preprocessing,
                    feature_statistics=statistics, level_statistics=levels,
                    abstention={"thresholds": {"energy": 0.0, "level": -2.0}, "false_rejection": 0.05})
    with pytest.raises(ConfigError, match="uses level, a distance"):
        adapt_run(source, [images], tmp_path / "adapted3", method="tent", batch_size=3)
    assert not (tmp_path / "adapted3").exists()


def test_em_recovers_the_class_shares_of_a_target_set_from_calibrated_posteriors() -> None:
    """Posteriors of a known generative model under training shares; the target set has other shares."""
    from dermlab.training.adapt import em_class_shares

    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    train, target = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.5, 0.3])
    labels = rng.choice(3, size=6000, p=target)
    points = means[labels] + rng.normal(size=(6000, 2))
    likelihood = np.exp(-0.5 * ((points[:, None, :] - means[None]) ** 2).sum(-1))
    posteriors = likelihood * train / (likelihood * train).sum(1, keepdims=True)  # exactly calibrated for train shares
    shares, steps = em_class_shares(torch.from_numpy(posteriors), torch.from_numpy(train))
    np.testing.assert_allclose(shares.numpy(), np.bincount(labels) / labels.size, atol=0.03)
    assert 1 < steps < 200
    one_step, _ = em_class_shares(torch.from_numpy(posteriors), torch.from_numpy(train), iterations=1)
    assert np.abs(one_step.numpy() - train).max() > 0.05  # one step already moves toward the target


def test_prior_adaptation_moves_only_the_head_bias_and_keeps_the_feature_statistics(tmp_path: Path) -> None:
    from dermlab.evaluation.familiarity import fit_feature_statistics

    source = _run(tmp_path / "run")
    loaded = load_checkpoint(source)
    width = loaded.model.num_features
    rng = np.random.default_rng(0)
    statistics = fit_feature_statistics(rng.normal(size=(20, width)), rng.normal(size=(10, width)), components=4).to_dict()
    decision = {"tau": 1.0, "class_prior": [0.9, 0.1], "default": "argmax"}
    save_checkpoint(source / "checkpoints" / "best.ckpt", loaded.model, loaded.config, CLASSES, loaded.preprocessing,
                    temperature=1.5, decision=decision, feature_statistics=statistics)
    adapt_run(source, [_images(tmp_path / "target")], tmp_path / "adapted", method="prior", batch_size=3)
    before, after = load_checkpoint(source), load_checkpoint(tmp_path / "adapted")
    lineage = json.loads((tmp_path / "adapted" / "lineage.json").read_text())
    target = np.array(lineage["target_prior"])
    expected_shift = 1.5 * np.log(target / np.array([0.9, 0.1]))
    np.testing.assert_allclose((after.model.head.bias - before.model.head.bias).detach().numpy(), expected_shift, rtol=1e-5, atol=1e-6)
    changed = [name for name, value in after.model.state_dict().items() if not torch.equal(value, before.model.state_dict()[name])]
    assert changed == ["head.bias"]
    assert "feature_statistics" in after.extras  # the features did not change


def test_after_prior_adaptation_the_balanced_rule_takes_out_the_target_shares_and_decides_as_before(tmp_path: Path, capsys) -> None:
    """The adapted posteriors carry the target's shares; a balanced rule (tau 1) still removing the training
    shares would correct twice. With the target's shares it gives the source's balanced probabilities."""
    import pandas as pd

    from dermlab.cli import main
    from dermlab.evaluation.decision import adjust_probabilities

    source = _run(tmp_path / "run")
    loaded = load_checkpoint(source)
    save_checkpoint(source / "checkpoints" / "best.ckpt", loaded.model, loaded.config, CLASSES, loaded.preprocessing,
                    temperature=1.5, decision={"tau": 1.0, "class_prior": [0.9, 0.1], "default": "argmax"})
    images = _images(tmp_path / "target")
    assert main(["adapt", str(source), str(images), "--out", str(tmp_path / "adapted"), "--method", "prior", "--batch-size", "3"]) == 0
    before, after = load_checkpoint(source), load_checkpoint(tmp_path / "adapted")
    target = json.loads((tmp_path / "adapted" / "lineage.json").read_text())["target_prior"]
    assert f"estimated class mix of these images (EM): nv {target[0]:.3f}, mel {target[1]:.3f}" in capsys.readouterr().out
    assert after.extras["decision"]["class_prior"] == pytest.approx(target)
    assert abs(target[0] - 0.9) > 0.01  # EM did move the shares, so the check below can fail
    inputs = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        probabilities = {name: torch.softmax(run.model.eval()(inputs) / 1.5, dim=-1).numpy() for name, run in (("before", before), ("after", after))}
    balanced = {name: adjust_probabilities(probabilities[name], 1.0, run.extras["decision"]["class_prior"]) for name, run in (("before", before), ("after", after))}
    assert np.abs(probabilities["after"] - probabilities["before"]).max() > 1e-3  # the argmax probabilities moved
    np.testing.assert_allclose(balanced["after"], balanced["before"], atol=1e-5)
    # predict --adapt prior: the same adaptation for one batch, and it says what mix it found
    assert main(["predict", str(source), str(images), "--adapt", "prior", "--out", str(tmp_path / "once.csv")]) == 0
    assert f"estimated class mix of these images (EM): nv {target[0]:.3f}, mel {target[1]:.3f}" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "adapted"), str(images), "--out", str(tmp_path / "run.csv")]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "once.csv")["prob_mel"], pd.read_csv(tmp_path / "run.csv")["prob_mel"], atol=1e-5)


def test_prior_adaptation_needs_the_training_class_shares(tmp_path: Path) -> None:
    source = _run(tmp_path / "run")  # no fitted decision rule
    with pytest.raises(ConfigError, match="training class shares"):
        adapt_run(source, [_images(tmp_path / "target")], tmp_path / "adapted", method="prior", batch_size=3)


def test_adabn_and_tent_are_refused_for_a_network_whose_batchnorm_statistics_never_trained(tmp_path: Path) -> None:
    """Frozen statistics (train.frozen_batchnorm, or the old mode bug): its layers learned around them."""
    source = _run(tmp_path / "run", statistics_trained=False)
    for method in ("adabn", "tent"):
        with pytest.raises(ConfigError, match="never trained"):
            adapt_run(source, [_images(tmp_path / "target")], tmp_path / method, method=method, batch_size=3)
        assert not (tmp_path / method).exists()


def _fusion_run(root: Path) -> Path:
    """A tiny metadata-fusion run with a fitted decision rule (prior needs its training shares)."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(name="test_efficientnet", weights="none", input_size=[32, 32], metadata_fusion=True))
    model = create_model(config.model, len(CLASSES), load_weights=False)
    with torch.no_grad():  # a head that leans on the metadata: with it, p(mel) falls with age around the prior
        model.head.weight[:, model.num_features:] *= 300.0
        model.head.bias.copy_(1.5 * torch.log(torch.tensor([0.9, 0.1])) - torch.tensor([0.0, 5.5]))
    save_checkpoint(root / "checkpoints" / "best.ckpt", model, config, CLASSES, resolve_preprocessing(model, config.model),
                    temperature=1.5, decision={"tau": 1.0, "class_prior": [0.9, 0.1], "default": "argmax"})
    (root / "splits.csv").write_text("image_id,split\na,train\n")
    return root


def test_prior_adaptation_of_a_fusion_model_estimates_the_mix_from_its_answers_with_the_metadata(tmp_path: Path, capsys) -> None:
    import pandas as pd

    from dermlab.cli import main
    from dermlab.data.metadata import encode_patient_metadata, read_metadata_csv
    from dermlab.data.transforms import create_transform
    from dermlab.evaluation.tta import view_logits
    from dermlab.training.adapt import em_class_shares

    source = _fusion_run(tmp_path / "run")
    images = _images(tmp_path / "target")
    csv = tmp_path / "meta.csv"
    csv.write_text("image_id,age,sex,localization\n" + "".join(f"{i},{20 + 12 * i},{'male' if i % 2 else 'female'},back\n" for i in range(5)))
    assert main(["adapt", str(source), str(images), "--out", str(tmp_path / "with"), "--method", "prior",
                 "--batch-size", "3", "--metadata", str(csv)]) == 0
    adapt_run(source, [images], tmp_path / "without", method="prior", batch_size=3)
    lineage = {name: json.loads((tmp_path / name / "lineage.json").read_text()) for name in ("with", "without")}
    assert lineage["with"]["images_with_metadata"] == 5 and "images_with_metadata" not in lineage["without"]
    # the estimate is EM over the posteriors the model gives with each image's metadata (image 5 has no row: unknown)
    loaded = load_checkpoint(source)
    paths = list_images([images])
    records = read_metadata_csv(csv)
    transform = create_transform("none", loaded.preprocessing, train=False)
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    encoded = encode_patient_metadata([records.get(p.stem) for p in paths])
    views = tuple(loaded.extras.get("tta_views") or loaded.config.evaluation.tta or ("identity",))
    with torch.no_grad():
        logits = view_logits(lambda x: loaded.model.eval()(x, encoded), batch, views).double()
    expected, _ = em_class_shares(torch.softmax(logits / 1.5, dim=-1).mean(dim=0), torch.tensor([0.9, 0.1], dtype=torch.float64))
    np.testing.assert_allclose(lineage["with"]["target_prior"], expected.numpy(), atol=1e-5)
    assert abs(lineage["with"]["target_prior"][1] - lineage["without"]["target_prior"][1]) > 0.01  # the metadata mattered
    # predict --adapt prior --metadata adapts on the same answers as dermlab adapt --metadata
    capsys.readouterr()
    assert main(["predict", str(source), str(images), "--adapt", "prior", "--metadata", str(csv), "--out", str(tmp_path / "once.csv")]) == 0
    assert main(["predict", str(tmp_path / "with"), str(images), "--metadata", str(csv), "--out", str(tmp_path / "run.csv")]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "once.csv")["prob_mel"], pd.read_csv(tmp_path / "run.csv")["prob_mel"], atol=1e-5)


def test_metadata_for_a_model_that_takes_none_is_refused_not_dropped(tmp_path: Path) -> None:
    from dermlab.data.metadata import PatientMetadata

    source = _run(tmp_path / "run")
    with pytest.raises(ConfigError, match="takes no metadata"):
        adapt_run(source, [_images(tmp_path / "target")], tmp_path / "adapted", metadata={"0": PatientMetadata(age=50.0)})
    assert not (tmp_path / "adapted").exists()
