"""Which segmenter and MVI model a node uses, loaded once per worker process.

``pipeline.segmenter_dir`` and ``pipeline.model_dir`` name site models; when empty, the demo
models are used: the demo segmenter shipped with the code (:data:`SHIPPED_SEGMENTER`) while it
matches this code, else the one ``mvi-node demo`` builds, and the demo MVI model, both cached in
``$XDG_CACHE_HOME/mvi-node/models``. Without either, a job fails with one line that says how to
get one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import model
from node.core.errors import ConfigurationError
from node.core.settings import Settings

if TYPE_CHECKING:
    # Only for the annotations: a worker imports torch when it first loads a model, not before.
    from model.inference import FusionModel
    from model.segmentation import UNetSegmenter


class ModelUnavailable(ConfigurationError):
    """No usable model: the message says which setting to set or which command to run."""


#: The demo segmenter as the project trained it (``make demo-segmenter``: ``mvi-node train-seg
#: --phantoms 48``, 6,000 steps, 21 min on 2 CPU cores), shipped so that a first ``make demo``
#: need not train one: 2.4 MB of safetensors and its card. Trained on the project's own phantoms
#: only, a demo model like the rest.
SHIPPED_SEGMENTER: Path = Path(model.__file__).resolve().parent / "weights" / "demo_segmenter"


def demo_segmenter_key() -> dict[str, Any]:
    """Every setting of the demo segmenter's build (:func:`node.offline.train_seg.demo_key`)."""
    from node.offline.train_seg import DEMO_ITERATIONS, DEMO_PHANTOMS, TrainSegOptions, demo_key

    key = demo_key(TrainSegOptions(phantoms=DEMO_PHANTOMS), DEMO_ITERATIONS)
    # As a card stores it (tuples become lists), so that the two compare equal.
    return dict(json.loads(json.dumps(key)))


def shipped_segmenter_is_current() -> bool:
    """Whether the shipped demo segmenter was built by this code's demo settings.

    A change to the labels, the card, the phantoms, the domain ranges or the augmentation changes
    the key: the shipped weights are then passed over (and a test says to rebuild them).
    """
    from model.checkpoint import CARD_NAME, is_checkpoint_dir

    if not is_checkpoint_dir(SHIPPED_SEGMENTER):
        return False
    try:
        card = json.loads((SHIPPED_SEGMENTER / CARD_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(card, dict) and card.get("demo_key") == demo_segmenter_key()


def demo_segmenter_dir() -> Path:
    """The demo segmenter: the shipped one while current, else where `mvi-node train-seg
    --phantoms` (with the demo defaults) caches the one it builds."""
    from model.checkpoint import demo_cache_dir

    if shipped_segmenter_is_current():
        return SHIPPED_SEGMENTER
    return demo_cache_dir("segmenter", demo_segmenter_key())


#: Training settings of the demo MVI model (part of its cache key; ``shipped`` 2: the fold
#: ensemble, which replaced a separately trained final network).
DEMO_FUSION = {
    "studies": 160,
    "seed": 0,
    "size": 128,
    "slices": 32,
    "roi_size": 64,
    "epochs": 12,
    "shipped": 2,
}


def demo_fusion_dir() -> Path:
    """Where the demo MVI model is cached (built by `mvi-node demo`)."""
    from model.checkpoint import demo_cache_dir
    from model.phantom import PHANTOM_VERSION

    return demo_cache_dir("fusion", {"phantom_version": PHANTOM_VERSION, **DEMO_FUSION})


def segmenter_dir(settings: Settings) -> Path:
    """The segmenter checkpoint to use, or :class:`ModelUnavailable`."""
    from model.checkpoint import is_checkpoint_dir

    configured = settings.pipeline.segmenter_dir
    path = configured if configured is not None else demo_segmenter_dir()
    if not is_checkpoint_dir(path):
        where = "pipeline.segmenter_dir" if configured is not None else "the demo cache"
        raise ModelUnavailable(
            f"no segmenter checkpoint at {path} ({where}): run `mvi-node demo` for the demo "
            "models or `mvi-node train-seg` for a site model"
        )
    return path


def fusion_dir(settings: Settings) -> Path:
    """The MVI model checkpoint to use, or :class:`ModelUnavailable`."""
    from model.checkpoint import is_checkpoint_dir

    configured = settings.pipeline.model_dir
    path = configured if configured is not None else demo_fusion_dir()
    if not is_checkpoint_dir(path):
        where = "pipeline.model_dir" if configured is not None else "the demo cache"
        raise ModelUnavailable(
            f"no MVI model at {path} ({where}): run `mvi-node demo` for the demo models or "
            "`mvi-node train` for a site model"
        )
    return path


@dataclass
class Models:
    """Lazily loaded models of one process (a worker keeps them between jobs)."""

    settings: Settings
    device: str = "auto"
    _segmenter: UNetSegmenter | None = field(default=None, repr=False)
    _fusion: FusionModel | None = field(default=None, repr=False)

    def segmenter(self) -> UNetSegmenter:
        """The U-Net segmenter (:class:`model.segmentation.UNetSegmenter`)."""
        if self._segmenter is None:
            from model.segmentation import UNetSegmenter

            folder = None
            try:
                folder = segmenter_dir(self.settings)
                self._segmenter = UNetSegmenter.from_checkpoint(folder, device=self.device)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                record_model_load(self.settings, "segmenter", problem, folder)
                raise
            record_model_load(self.settings, "segmenter", None, folder)
        return self._segmenter

    def segmenter_card(self) -> dict[str, Any] | None:
        """The segmenter's model card (training range, uncertainty limit); ``None`` without one.

        The gates read it for a supplied SEG too, when the network itself is not needed: the
        card is then read from its file, without loading the weights.
        """
        if self._segmenter is not None:
            return dict(self._segmenter.card)
        import json

        from model.checkpoint import CARD_NAME

        try:
            card = json.loads((segmenter_dir(self.settings) / CARD_NAME).read_text())
        except (ModelUnavailable, OSError, ValueError):
            return None
        return card if isinstance(card, dict) else None

    def fusion(self) -> FusionModel:
        """The MVI model (:class:`model.inference.FusionModel`)."""
        if self._fusion is None:
            from model.inference import FusionModel

            folder = None
            try:
                folder = fusion_dir(self.settings)
                self._fusion = FusionModel.load(folder, device=self.device)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                record_model_load(self.settings, "MVI model", problem, folder)
                raise
            record_model_load(self.settings, "MVI model", None, folder)
        return self._fusion

    def load(self) -> list[str]:
        """Load both models now, as a worker does before its first job (which then waits
        for neither torch's imports nor the weights); the problems of those that did not load,
        recorded for ``/healthz`` as a job's load records them. A model that did not load is
        tried again by the job that needs it, which fails with its error as before."""
        problems: list[str] = []
        for name, load in (("segmenter", self.segmenter), ("MVI model", self.fusion)):
            try:
                load()
            except Exception as exc:
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
        return problems

    def on_cpu(self) -> Models:
        """The same models on the CPU (the retry after a CUDA out-of-memory)."""
        return Models(self.settings, device="cpu")


#: Where workers record their last model loads, in ``node.data_dir`` (``/healthz`` reads it).
MODEL_STATUS_FILE = "model-loads.json"


def record_model_load(
    settings: Settings, model_name: str, problem: str | None, folder: Path | None = None
) -> None:
    """Record a worker's load of one model (``problem`` None: it loaded) for ``/healthz``, and
    its checkpoint folder for the console's model cards (read there without torch).

    Best effort: the job's own outcome says what happened to it; this file only tells the
    monitoring, so a write error is ignored.
    """
    import datetime as dt
    import os

    path = settings.node.data_dir / MODEL_STATUS_FILE
    if not path.parent.is_dir():
        return  # an offline command (analyze): no node, no monitoring to tell
    try:
        loads = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        loads = {}
    if not isinstance(loads, dict):
        loads = {}
    loads[model_name] = {
        "ok": problem is None,
        "detail": problem or "loaded",
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "worker_pid": os.getpid(),
        "folder": str(folder) if folder is not None else None,
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        partial.write_text(json.dumps(loads, indent=1))
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)


def model_load_problem(settings: Settings) -> str | None:
    """What the workers' last model loads say is wrong, or None (nothing loaded yet: None)."""
    path = settings.node.data_dir / MODEL_STATUS_FILE
    try:
        loads = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return f"cannot read {path}: {exc}"
    failed = [
        f"{name}: {entry.get('detail')}"
        for name, entry in sorted(loads.items())
        if isinstance(entry, dict) and not entry.get("ok", False)
    ]
    return "; ".join(failed) or None
