"""Models a node uses: the shipped demo segmenter while it matches the code, or the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import model.segmentation
from model.checkpoint import CARD_NAME, WEIGHTS_NAME
from model.segmentation import LEGACY_LABELS, UNetSegmenter
from node.analysis import models
from node.analysis.models import (
    SHIPPED_SEGMENTER,
    demo_segmenter_dir,
    demo_segmenter_key,
    shipped_segmenter_is_current,
)


def test_the_shipped_demo_segmenter_is_the_one_this_code_would_build() -> None:
    """Fails when a change to the labels, card, phantoms, domain ranges or augmentation leaves the
    shipped weights behind: rebuild them with `make demo-segmenter` and commit the folder."""
    assert shipped_segmenter_is_current(), "rebuild the shipped segmenter: make demo-segmenter"
    assert demo_segmenter_dir() == SHIPPED_SEGMENTER
    card = json.loads((SHIPPED_SEGMENTER / CARD_NAME).read_text())
    assert card["demo"] is True
    assert card["demo_key"] == demo_segmenter_key()
    assert card["training_data"]["command"].startswith("mvi-node train-seg --phantoms 48 ")
    # Small enough for git (no file over 10 MB), and it loads as any checkpoint does.
    assert (SHIPPED_SEGMENTER / WEIGHTS_NAME).stat().st_size < 10_000_000
    segmenter = UNetSegmenter.from_checkpoint(SHIPPED_SEGMENTER, device="cpu")
    assert segmenter.labels == model.segmentation.LABELS


def test_a_shipped_segmenter_built_by_other_code_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(model.segmentation, "LABELS", LEGACY_LABELS)
    assert not shipped_segmenter_is_current()
    assert str(demo_segmenter_dir()).startswith(str(tmp_path / "cache"))


@pytest.mark.parametrize("damage", ["missing", "no key", "bad json"])
def test_a_damaged_shipped_folder_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    copy = tmp_path / "shipped"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "SHIPPED_SEGMENTER", copy)
    if damage != "missing":
        copy.mkdir()
        (copy / WEIGHTS_NAME).write_bytes((SHIPPED_SEGMENTER / WEIGHTS_NAME).read_bytes())
        card = json.loads((SHIPPED_SEGMENTER / CARD_NAME).read_text())
        card.pop("demo_key")
        text = json.dumps(card) if damage == "no key" else "{not json"
        (copy / CARD_NAME).write_text(text)
    assert not shipped_segmenter_is_current()
    assert str(demo_segmenter_dir()).startswith(str(tmp_path / "cache"))
