"""`mvi-node demo`: node and mini PACS in-process on a tiny phantom, and the model cache."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from node.offline import demo
from tests.nodeproc import tiny_models


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200, force_terminal=False), buffer


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    models = tiny_models()
    out, out_text = _console()
    err, err_text = _console()
    code = demo.run_demo(
        size=64,
        slices=16,
        seed=3,
        keep=True,
        segmenter_dir=Path(models["segmenter_dir"]),
        model_dir=Path(models["model_dir"]),
        out=out,
        err=err,
        timeout_s=80,
        keep_root=tmp_path,
    )
    text = out_text.getvalue()
    assert code == 0, text + err_text.getvalue()
    assert "MVI probability" in text and "phantom truth" in text
    assert demo.DEMO_NOTICE in text
    (run,) = list(tmp_path.glob("demo-*"))
    received = list((run / "pacs").glob("*.dcm"))
    assert received, "nothing arrived at the mini PACS"
    from pydicom import dcmread

    modalities = {str(dcmread(p, stop_before_pixels=True).Modality) for p in received}
    assert "SR" in modalities
    assert list((run / "node").rglob("result.json"))


def test_model_build_skipped_when_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.analysis.models import demo_fusion_dir, demo_segmenter_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # As if the shipped segmenter no longer matched the code: both come from the cache.
    monkeypatch.setattr("node.analysis.models.SHIPPED_SEGMENTER", tmp_path / "not-shipped")
    seg_dir, fusion_dir = demo_segmenter_dir(), demo_fusion_dir()
    assert str(seg_dir).startswith(str(tmp_path))
    assert demo.needs_build(seg_dir, fusion_dir) == {"segmenter": True, "fusion": True}

    models = tiny_models()
    shutil.copytree(models["segmenter_dir"], seg_dir)
    assert demo.needs_build(seg_dir, fusion_dir) == {"segmenter": False, "fusion": True}
    shutil.copytree(models["model_dir"], fusion_dir)
    assert demo.needs_build(seg_dir, fusion_dir) == {"segmenter": False, "fusion": False}

    def boom(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a cached model was rebuilt")

    monkeypatch.setattr("node.offline.train_seg.run", boom)
    monkeypatch.setattr(demo, "_build_fusion", boom)
    out, _ = _console()
    assert demo.build_demo_models(out, out) == (seg_dir, fusion_dir)
