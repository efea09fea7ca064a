"""Checkpoints never execute code: a crafted pickle is refused by every loader, and nothing it asks for runs.

Each malicious file carries an object whose ``__reduce__`` tells the unpickler to call ``os.system("touch
MARKER")``. A control load with plain pickle (``weights_only=False``) proves the payload is live; dermlab's
loaders must raise ``CheckpointError`` and leave no marker.
"""

from __future__ import annotations

import ast
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch

from dermlab.cli import main
from dermlab.config import Config, ModelConfig
from dermlab.errors import CheckpointError
from dermlab.models.checkpoint import checkpoint_metadata, load_checkpoint
from dermlab.models.factory import create_model, resolve_preprocessing
from dermlab.training.checkpoint_io import AtomicCheckpointIO, read_training_checkpoint

SOURCE = Path(__file__).resolve().parents[2] / "src" / "dermlab"


class _RunsShell:
    """Unpickling this object runs ``os.system(command)``: the classic pickle exploit."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch(marker: Path) -> _RunsShell:
    return _RunsShell(f"touch {shlex.quote(str(marker))}")


def _metadata() -> dict:
    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32]))
    model = create_model(config.model, 3, load_weights=False)
    return checkpoint_metadata(config, ["a", "b", "c"], resolve_preprocessing(model, config.model))


def _payloads(marker: Path) -> dict[str, object]:
    """Where an attacker may hide the object: top level, inside the metadata, inside the weights."""
    evil = _touch(marker)
    weights = {"model.head.weight": torch.zeros(3, 4)}
    return {
        "top-level": evil,
        "in-metadata": {"state_dict": weights, "dermlab": {**_metadata(), "extra": evil}},
        "in-state-dict": {"state_dict": {**weights, "model.head.bias": evil}, "dermlab": _metadata()},
        "in-training-state": {
            "state_dict": weights, "loops": {}, "epoch": 0, "global_step": 0, "optimizer_states": [evil],
            "dermlab": _metadata(),
        },
    }


def _write(path: Path, payload: object, kind: str) -> Path:
    if kind == "torch-zip":
        torch.save(payload, path)
    elif kind == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle renamed .ckpt
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


KINDS = ["torch-zip", "torch-legacy", "raw-pickle"]
PLACES = ["top-level", "in-metadata", "in-state-dict", "in-training-state"]


def test_the_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    """Control: the same file loaded with full pickle does run the command (so the tests below mean something)."""
    marker = tmp_path / "control-marker"
    path = _write(tmp_path / "evil.ckpt", _payloads(marker)["in-metadata"], "torch-zip")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("place", PLACES)
def test_load_checkpoint_refuses_and_runs_nothing(tmp_path: Path, kind: str, place: str) -> None:
    marker = tmp_path / "marker"
    path = _write(tmp_path / "evil.ckpt", _payloads(marker)[place], kind)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_resume_loader_refuses_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    """The CheckpointIO that Lightning uses for --resume reads with weights_only=True whatever it is asked."""
    marker = tmp_path / "marker"
    path = _write(tmp_path / "last.ckpt", _payloads(marker)["in-training-state"], kind)
    with pytest.raises(CheckpointError, match="refused to load"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    with pytest.raises(CheckpointError):
        read_training_checkpoint(path)
    assert not marker.exists()


def test_evaluate_command_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _write(run / "checkpoints" / "best.ckpt", _payloads(marker)["in-metadata"], "torch-zip")
    for target in (run, run / "checkpoints" / "best.ckpt"):
        assert main(["evaluate", str(target)]) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "best.ckpt" in lines[0], err
        assert "refused to load" in lines[0] and "Traceback" not in err
    assert not marker.exists()


def test_a_clean_checkpoint_still_loads(tmp_path: Path) -> None:
    """The refusal is about content, not about the loader being broken."""
    from dermlab.models.checkpoint import save_checkpoint

    config = Config(model=ModelConfig(name="test_efficientnet", input_size=[32, 32]))
    model = create_model(config.model, 3, load_weights=False)
    path = save_checkpoint(tmp_path / "ok.ckpt", model, config, ["a", "b", "c"], resolve_preprocessing(model, config.model))
    loaded = load_checkpoint(path)
    assert loaded.classes == ["a", "b", "c"]
    assert torch.equal(loaded.model.head.weight, model.head.weight)


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in {"torch", "pickle", "dill", "joblib", "cloudpickle"}:
                yield owner.id, node


def test_every_load_in_the_package_is_weights_only() -> None:
    """A static guard: no module may call pickle.load, or torch.load without weights_only=True."""
    offenders = []
    files = sorted(SOURCE.rglob("*.py"))
    assert files, SOURCE
    for file in files:
        for owner, call in _torch_load_calls(ast.parse(file.read_text(encoding="utf-8"))):
            safe = owner == "torch" and any(
                kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
                for kw in call.keywords
            )
            if not safe:
                offenders.append(f"{file.relative_to(SOURCE)}:{call.lineno} {owner}.load")
    assert offenders == []
