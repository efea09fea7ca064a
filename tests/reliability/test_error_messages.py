"""Messages that quote a user-supplied name, key, path or value stay one printable line.

A key ``"\\n"`` once split the "unknown config key" error in two (found by the config fuzz test). These are its
siblings, each through the layer a user meets: config keys and values, ``--set``, CSV column names and cells,
class folder names, image file names, upload file names (``tests/serving/test_upload_names.py``) and CLI arguments.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest

from fakes import write_jpeg
from dermlab.cli import main
from dermlab.config import Config, apply_overrides, config_from_dict, load_config
from dermlab.data.datasets import load_dataset
from dermlab.data.images import open_image_bytes, read_image
from dermlab.errors import CheckpointError, ConfigError, DataError, DermlabError, printable

HOSTILE = ["bad\nname", "carriage\rreturn", "escape\x1b[2Jclear", "tab\tbed", "line\u2028separator", "nul\x00"]


def _assert_one_printable_line(message: str) -> None:
    assert message.isprintable(), repr(message)


@pytest.mark.parametrize("name", HOSTILE)
def test_every_dermlab_error_is_one_printable_line(name: str) -> None:
    for error_type in (DermlabError, DataError, ConfigError, CheckpointError):
        message = str(error_type(f"{name}: cannot read"))
        _assert_one_printable_line(message)
        assert message.endswith(": cannot read")


def test_printable_escapes_only_what_it_must() -> None:
    assert printable("plain name with spaces, é and 'quotes'") == "plain name with spaces, é and 'quotes'"
    assert printable("a\nb") == "a\\nb"
    assert printable("\x1b[31m") == "\\x1b[31m"
    assert printable(Path("dir") / "x\ty.jpg") == "dir/x\\ty.jpg"


def test_an_error_survives_pickling_unchanged() -> None:
    """DataLoader workers send errors between processes by pickling them."""
    error = DataError("a\nb.jpg: truncated")
    assert str(pickle.loads(pickle.dumps(error))) == str(error) == "a\\nb.jpg: truncated"


def test_an_error_re_raised_by_a_dataloader_worker_keeps_only_its_message() -> None:
    folded = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ndermlab.errors.DataError: /data/b\\nad.jpg: truncated file'
    )
    assert str(DataError(message=folded)) == "/data/b\\nad.jpg: truncated file"


@pytest.mark.parametrize("key", ["\n", "a\nb", "\x1b[2J", " seed", ""])
def test_unknown_config_keys_are_quoted(key: str) -> None:
    for tree in ({key: {}}, {"train": {key: 1}}):
        with pytest.raises(ConfigError) as caught:
            config_from_dict(tree)
        message = str(caught.value)
        _assert_one_printable_line(message)
        assert repr(key) in message


def test_config_keys_of_mixed_types_are_refused_not_crashed() -> None:
    with pytest.raises(ConfigError, match="unknown config key 1"):
        config_from_dict({1: {}, "trian": {}})


@pytest.mark.parametrize("value", ["thirty\ntwo", "\x1b[31m"])
def test_config_values_are_quoted(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"data": {"batch_size": value}})
    _assert_one_printable_line(str(caught.value))
    assert "data.batch_size" in str(caught.value)


def test_set_overrides_with_hostile_keys_and_values() -> None:
    for item in ["train.se\ned=1", "no\x1b[2J-equals-sign", "model.input_size=[\n1]"]:
        with pytest.raises(ConfigError) as caught:
            apply_overrides(Config(), [item])
        _assert_one_printable_line(str(caught.value))


def test_a_config_file_with_a_hostile_name(tmp_path: Path) -> None:
    path = tmp_path / "conf\nig.yaml"
    path.write_text("trian: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    _assert_one_printable_line(str(caught.value))
    assert "conf\\nig.yaml" in str(caught.value)


def test_csv_column_names_and_cells(tmp_path: Path) -> None:
    csv_file = tmp_path / "labels.csv"
    write_jpeg(tmp_path / "a.jpg")
    with open(csv_file, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["pa\nth", "lab\x1bel"])  # csv quotes the newline: a real, valid column name
        writer.writerow(["a.jpg", "nv"])
    with pytest.raises(DataError) as caught:
        load_dataset(csv_file)
    _assert_one_printable_line(str(caught.value))
    assert "labels.csv" in str(caught.value)


def test_a_missing_image_named_in_a_csv_row(tmp_path: Path) -> None:
    csv_file = tmp_path / "labels.csv"
    with open(csv_file, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label"])
        writer.writerows([["missing\n1.jpg", "nv"], ["missing\x1b2.jpg", "mel"]])
    with pytest.raises(DataError) as caught:
        load_dataset(csv_file)
    _assert_one_printable_line(str(caught.value))
    assert "missing\\n1.jpg" in str(caught.value) or "missing\\x1b2.jpg" in str(caught.value)


def test_unreadable_images_with_hostile_file_names(tmp_path: Path) -> None:
    for name in HOSTILE[:4]:
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(b"not an image")
        with pytest.raises(DataError) as caught:
            read_image(path)
        _assert_one_printable_line(str(caught.value))
        assert printable(path.name) in str(caught.value)


def test_upload_names_in_image_errors() -> None:
    with pytest.raises(DataError) as caught:
        open_image_bytes(b"GIF89a-not-really", "pho\nto.gif")
    _assert_one_printable_line(str(caught.value))
    assert "pho\\nto.gif" in str(caught.value)


def test_class_folder_names_in_dataset_errors(tmp_path: Path) -> None:
    """An empty class folder with a hostile name is refused, and named safely."""
    root = tmp_path / "folders"
    write_jpeg(root / "nevus" / "a.jpg")
    (root / "emp\nty\x1b[2J").mkdir(parents=True)
    with pytest.raises(DataError) as caught:
        load_dataset(root)
    _assert_one_printable_line(str(caught.value))
    assert "emp\\nty\\x1b[2J" in str(caught.value)


def test_cli_arguments_reach_the_console_as_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no\nsuch\x1b[2Jdata"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    _assert_one_printable_line(err.rstrip("\n"))
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "trian.x\n=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
