"""Metadata fusion: the encoding (missing values, never dx_type), the fused head, batches, training, scoring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermlab.config import Config, ModelConfig, apply_overrides
from dermlab.data.datamodule import ImageDataset
from dermlab.data.metadata import (
    LOCALIZATIONS,
    METADATA_WIDTH,
    PatientMetadata,
    encode_metadata,
    encode_patient_metadata,
    missing_metadata,
    parse_patient_metadata,
    read_metadata_csv,
)
from dermlab.errors import ConfigError
from dermlab.models.checkpoint import load_checkpoint, save_checkpoint
from dermlab.models.classifier import MetadataFusionClassifier, unknown_metadata_caveat, uses_metadata, withhold_metadata
from dermlab.models.factory import DermClassifier, create_model, resolve_preprocessing
from dermlab.training.checks import check_combinations
from dermlab.training.module import ClassifierModule


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fusion_model(classes: int = 3) -> MetadataFusionClassifier:
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="test_efficientnet", input_size=[32, 32], metadata_fusion=True), classes, load_weights=False)
    assert isinstance(model, MetadataFusionClassifier)
    return model.eval()


def test_encoding_by_hand_with_missing_values() -> None:
    frame = pd.DataFrame(
        {
            "age": [45.0, math.nan, -1.0],
            "sex": ["male", "unknown", "Female"],
            "localization": ["back", "", "Upper Extremity"],
        }
    )
    encoded = encode_metadata(frame)
    assert encoded.shape == (3, METADATA_WIDTH) and encoded.dtype == torch.float32
    back = 5 + LOCALIZATIONS.index("back")
    upper = 5 + LOCALIZATIONS.index("upper extremity")
    first, second, third = encoded.tolist()
    assert first[:5] == pytest.approx([0.45, 0.0, 1.0, 0.0, 0.0]) and first[back] == 1.0 and first[-1] == 0.0
    assert sum(first) == pytest.approx(0.45 + 2)  # one sex, one site, no missing flag
    assert second == missing_metadata(1)[0].tolist()  # age NaN, "unknown" sex, empty site: all missing
    assert third[:5] == [0.0, 1.0, 0.0, 1.0, 0.0] and third[upper] == 1.0  # negative age is missing
    # absent columns are missing for every row
    assert torch.equal(encode_metadata(pd.DataFrame({"path": ["a", "b"]})), missing_metadata(2))


def test_dx_type_is_never_read() -> None:
    frame = pd.DataFrame({"age": [60.0, 30.0], "sex": ["male", "female"], "localization": ["face", "trunk"]})
    with_dx_type = frame.assign(dx_type=["histo", "consensus"])
    assert torch.equal(encode_metadata(frame), encode_metadata(with_dx_type))
    assert torch.equal(encode_metadata(frame), encode_metadata(with_dx_type.assign(dx_type=["follow_up", "confocal"])))


def test_fused_head_uses_metadata_and_none_means_unknown() -> None:
    model = _fusion_model()
    images = torch.randn(2, 3, 32, 32)
    known = encode_metadata(pd.DataFrame({"age": [80.0, 20.0], "sex": ["male", "female"], "localization": ["scalp", "foot"]}))
    with torch.no_grad():
        plain, unknown, informed = model(images), model(images, missing_metadata(2)), model(images, known)
        pooled = model.forward_features(images)
        assert torch.allclose(model.forward_head(pooled, known), informed)
    assert plain.shape == (2, 3)
    assert torch.allclose(plain, unknown)
    assert not torch.allclose(informed, unknown)
    assert model.head.in_features == model.num_features + model.metadata_encoder[0].out_features
    assert uses_metadata(model) and not uses_metadata(create_model(ModelConfig(name="test_efficientnet"), 3, load_weights=False))


def test_off_by_default_and_the_image_only_path_is_unchanged(tmp_path: Path) -> None:
    model = create_model(ModelConfig(name="test_efficientnet", input_size=[32, 32]), 3, load_weights=False)
    assert type(model) is DermClassifier
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (10, 20, 30)).save(image)
    frame = pd.DataFrame({"path": [str(image)], "label": ["b"], "age": [50.0], "sex": ["male"], "localization": ["back"]})
    transform = lambda img: torch.zeros(3, 2, 2)  # noqa: E731
    item = ImageDataset(frame, ["a", "b"], transform)[0]
    assert isinstance(item[0], torch.Tensor) and item[1] == 1  # (image, label), as before
    fused = ImageDataset(frame, ["a", "b"], transform, metadata=encode_metadata(frame))[0]
    (tensor, metadata), label = fused
    assert tensor.shape == (3, 2, 2) and torch.equal(metadata, encode_metadata(frame)[0]) and label == 1


def test_lightning_module_feeds_metadata_to_the_model() -> None:
    model = _fusion_model()
    module = ClassifierModule(model, torch.nn.CrossEntropyLoss(), ["a", "b", "c"], features_input=True).eval()
    pooled, metadata = torch.randn(4, model.num_features), missing_metadata(4)
    metadata[:, 0] = 0.7
    with torch.no_grad():
        assert torch.allclose(module((pooled, metadata)), model.forward_head(pooled, metadata))
        assert torch.allclose(module(pooled), model.forward_head(pooled))


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _fusion_model()
    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32], metadata_fusion=True))
    path = save_checkpoint(tmp_path / "best.ckpt", model, config, ["a", "b", "c"], resolve_preprocessing(model, config.model))
    loaded = load_checkpoint(path)
    assert isinstance(loaded.model, MetadataFusionClassifier)
    images, metadata = torch.randn(2, 3, 32, 32), encode_metadata(pd.DataFrame({"age": [30.0, 70.0]}))
    with torch.no_grad():
        assert torch.allclose(loaded.model(images, metadata), model(images, metadata), atol=1e-6)


def test_unsupported_combinations_are_refused() -> None:
    base = ["model.metadata_fusion=true"]
    check_combinations(apply_overrides(Config(), base))
    with pytest.raises(ConfigError, match="mixing.method='mixup'"):
        check_combinations(apply_overrides(Config(), [*base, "mixing.method=mixup"]))
    check_combinations(apply_overrides(Config(), ["mixing.method=mixup"]))  # fusion off: nothing to refuse


def _known_metadata(count: int) -> torch.Tensor:
    ages = np.linspace(20.0, 80.0, count)
    return encode_metadata(pd.DataFrame({"age": ages, "sex": ["male", "female"] * (count // 2), "localization": ["back"] * count}))


def test_withheld_metadata_rows_are_whole_and_about_the_asked_share() -> None:
    known = _known_metadata(2000)
    torch.manual_seed(0)
    withheld = withhold_metadata(known, 0.25)
    unknown = (withheld == missing_metadata(1)).all(dim=1)
    intact = (withheld == known).all(dim=1)
    assert bool((unknown | intact).all())  # a row is either as given or all unknown, never a mix
    assert 0.21 < float(unknown.float().mean()) < 0.29  # 2000 rows at 0.25, seeded: +-0.04 is about 4 sigma
    assert torch.equal(withhold_metadata(known, 0.0), known)
    assert bool((withhold_metadata(known, 1.0) == missing_metadata(2000)).all())


def test_metadata_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    config = ModelConfig(name="test_efficientnet", input_size=[32, 32], metadata_fusion=True, drop_rate=0.0, metadata_dropout=1.0)
    model = create_model(config, 3, load_weights=False)
    assert isinstance(model, MetadataFusionClassifier) and model.metadata_dropout == 1.0
    pooled, known = torch.randn(4, model.num_features), _known_metadata(4)
    with torch.no_grad():
        informed, unknown = model.eval().forward_head(pooled, known), model.forward_head(pooled, None)
        assert not torch.allclose(informed, unknown)
        assert torch.allclose(model.train().forward_head(pooled, known), unknown)  # training: every row withheld
        assert torch.allclose(model.eval().forward_head(pooled, known), informed)  # evaluation: metadata read


def test_the_unknown_metadata_caveat_names_runs_trained_without_metadata_dropout() -> None:
    assert "model.metadata_dropout=0.25" in unknown_metadata_caveat(_fusion_model())
    withheld = create_model(ModelConfig(name="test_efficientnet", metadata_fusion=True, metadata_dropout=0.25), 3, load_weights=False)
    assert unknown_metadata_caveat(withheld) == ""
    assert unknown_metadata_caveat(create_model(ModelConfig(name="test_efficientnet"), 3, load_weights=False)) == ""


def test_metadata_dropout_is_checked_and_refused_without_fusion() -> None:
    with pytest.raises(ConfigError, match="metadata_dropout"):
        ModelConfig(metadata_fusion=True, metadata_dropout=1.5)
    with pytest.raises(ConfigError, match="metadata_fusion=true"):
        check_combinations(apply_overrides(Config(), ["model.metadata_dropout=0.25"]))
    check_combinations(apply_overrides(Config(), ["model.metadata_fusion=true", "model.metadata_dropout=0.25"]))


@pytest.mark.slow
def test_a_fusion_run_trains_and_scores_with_metadata(ham_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from dermlab.data.run_data import prepare_run_data
    from dermlab.evaluation.evaluate import predict_logits, predict_view_logits
    from dermlab.training.run import train_run

    monkeypatch.setenv("DERMLAB_PROGRESS", "0")
    config = apply_overrides(
        Config(),
        [f"data.path={ham_dir}", "model.name=test_efficientnet", "model.weights=none", "model.input_size=[32,32]", "model.metadata_fusion=true",
         "data.num_workers=0", "data.batch_size=8", "train.stage1_epochs=1", "train.stage2_epochs=1", "data.augmentation=none"],
    )
    result = train_run(config, tmp_path / "run")
    loaded = load_checkpoint(result.best_checkpoint)
    assert isinstance(loaded.model, MetadataFusionClassifier)
    frame = prepare_run_data(config, tmp_path / "run").frame
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    logits = predict_view_logits(loaded, test, ("identity",), batch_size=4)[0]
    assert np.allclose(logits, predict_logits(loaded, test, batch_size=4), atol=1e-5)
    # the metadata reaches the head: dropping it (all missing) changes the logits
    without = predict_logits(loaded, test.drop(columns=["age", "sex", "localization"]), batch_size=4)
    assert not np.allclose(logits, without, atol=1e-6)


# --------------------------------------------------------------------------------------------- metadata files
def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_metadata_csv_reads_values_aliases_and_missing_cells(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "meta.csv",
        "image_id,Age,sex,site,dx_type\nA,45,Male,back,histo\nB,,unknown,,consensus\nC,80.0,female,Upper Extremity,\n",
    )
    records = read_metadata_csv(path)
    assert records == {
        "A": PatientMetadata(45.0, "male", "back"),
        "B": PatientMetadata(),
        "C": PatientMetadata(80.0, "female", "upper extremity"),
    }
    assert [r.status for r in records.values()] == ["used", "missing", "used"]
    assert PatientMetadata(age=30.0).missing == ("sex", "localization") and PatientMetadata(age=30.0).status == "partial"
    # the same encoding as the training frame's columns
    frame = pd.DataFrame({"age": [45.0, math.nan], "sex": ["male", "unknown"], "localization": ["back", ""]})
    assert torch.equal(encode_patient_metadata([records["A"], None]), encode_metadata(frame))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("image_id,age\nA,forty\n", ["row 2", "column age", "'forty'"]),
        ("image_id,age\nA,40\nB,-2\n", ["row 3", "column age", "'-2'"]),
        ("image_id,sex\nA,m\n", ["row 2", "column sex", "'m'", "male, female"]),
        ("image_id,localization\nA,lower-extremity\n", ["row 2", "column localization", "lower extremity"]),
        ("image_id,age\nA,40\nA,41\n", ["row 3", "column image_id", "repeats row 2"]),
        ("image_id,age\n,40\n", ["row 2", "column image_id", "empty"]),
        ("name,age\nA,40\n", ["no image_id column", "name, age"]),
        ("image_id,dx\nA,nv\n", ["none of the columns age, sex, localization"]),
        ("image_id,site,localization\nA,back,back\n", ["'site' and 'localization'"]),
        ("", ["cannot read the metadata CSV"]),
    ],
)
def test_a_bad_metadata_csv_is_one_line_naming_file_row_and_column(tmp_path: Path, text: str, words: list[str]) -> None:
    from dermlab.errors import DataError

    path = _write(tmp_path / "meta.csv", text)
    with pytest.raises(DataError) as error:
        read_metadata_csv(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert all(word in message for word in words), message


def test_a_missing_metadata_file_is_named(tmp_path: Path) -> None:
    from dermlab.errors import DataError

    with pytest.raises(DataError, match="meta.csv: metadata CSV not found"):
        read_metadata_csv(tmp_path / "meta.csv")


def test_form_fields_are_checked_like_csv_cells() -> None:
    from dermlab.errors import DataError

    assert parse_patient_metadata("62", " FEMALE ", "face") == PatientMetadata(62.0, "female", "face")
    assert parse_patient_metadata("", "", None) == PatientMetadata()
    with pytest.raises(DataError, match="form field age: '200'"):
        parse_patient_metadata("200", where="form field")
