"""Specification of model checkpoints: safetensors weights + a JSON model card, never a pickle."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import model.checkpoint as checkpoint
from model.checkpoint import (
    CARD_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    demo_cache_dir,
    load_checkpoint,
    save_checkpoint,
)
from model.phantom import PHANTOM_VERSION

CARD = {
    "name": "test",
    "version": "1",
    "created": "2024-01-01T00:00:00+00:00",
    "kind": "x",
    "demo": True,
}


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, 3, generator=generator),
        "conv.bias": torch.zeros(4),
        "steps": torch.tensor([7], dtype=torch.int64),
    }


def test_round_trip(tmp_path: Path) -> None:
    state = _state()
    directory = save_checkpoint(tmp_path / "ckpt", state, CARD)
    assert sorted(p.name for p in directory.iterdir()) == sorted([WEIGHTS_NAME, CARD_NAME])
    loaded, card = load_checkpoint(directory)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor)
        assert loaded[name].dtype == tensor.dtype
    assert card["name"] == "test"
    assert re.fullmatch(r"[0-9a-f]{64}", card["weights_sha256"])
    # No temporary directory is left beside the checkpoint.
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_replaces_a_previous_checkpoint_but_nothing_else(tmp_path: Path) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", _state(), CARD)
    save_checkpoint(directory, {"w": torch.ones(2)}, {**CARD, "version": "2"})
    loaded, card = load_checkpoint(directory)
    assert card["version"] == "2" and set(loaded) == {"w"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not an empty folder or a checkpoint"):
        save_checkpoint(other, _state(), CARD)
    assert (other / "keep.txt").read_text() == "precious"


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", _state(), CARD)
    weights = directory / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(directory)


def test_missing_card_key_is_refused(tmp_path: Path) -> None:
    directory = save_checkpoint(tmp_path / "ckpt", _state(), CARD)
    card_path = directory / CARD_NAME
    card = json.loads(card_path.read_text())
    del card["kind"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="kind"):
        load_checkpoint(directory)
    with pytest.raises(CheckpointError, match="labels"):
        save_checkpoint(tmp_path / "ok", _state(), CARD)
        load_checkpoint(tmp_path / "ok", required=("labels",))


def test_missing_files_and_bad_json_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nothing")
    directory = save_checkpoint(tmp_path / "ckpt", _state(), CARD)
    (directory / CARD_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(directory)
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory)


def test_no_pickle_anywhere() -> None:
    source = Path(checkpoint.__file__).read_text()
    for forbidden in ("torch.load", "pickle", "torch.save"):
        assert forbidden not in source
    for module in ("segmentation.py", "train_seg.py"):
        text = (Path(checkpoint.__file__).parent / module).read_text()
        assert "torch.load" not in text and "pickle" not in text


def test_demo_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = {"phantoms": 12, "seed": 0}
    first = demo_cache_dir("segmenter", key)
    assert first.parent == tmp_path / "mvi-node" / "models"
    assert re.fullmatch(r"segmenter-[0-9a-f]{12}", first.name)
    assert demo_cache_dir("segmenter", dict(key)) == first
    assert demo_cache_dir("segmenter", {**key, "seed": 1}) != first
    # The phantom version is part of the key whether or not the caller passes it.
    assert demo_cache_dir("segmenter", {**key, "phantom_version": PHANTOM_VERSION}) == first
    assert demo_cache_dir("segmenter", {**key, "phantom_version": "other"}) != first
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_cache_dir("segmenter", key).parent == tmp_path / "home/.cache/mvi-node/models"
