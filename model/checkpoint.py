"""Model directories: ``weights.safetensors`` + ``model_card.json``, nothing else.

A checkpoint is a directory with the network's tensors in safetensors format (a plain tensor
container: loading it never executes code, unlike torch's own format) and a JSON model card that
says what the network is, how it was trained and how well it validated. The card records the
SHA-256 of the weights file, so a truncated or swapped file is refused before any tensor reaches a
network.

Writes are atomic: the files are written into a temporary sibling directory which is then renamed
onto the target, so a crash leaves either the old checkpoint or the new one, never half of each.

Demo models (trained on phantoms) live in the user's cache directory under a name derived from
the phantom generator's version and the training settings, so a quick test setting can never
overwrite the real demo model (:func:`demo_cache_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.checkpoint_layout import CARD_NAME, WEIGHTS_NAME, is_checkpoint_dir
from model.phantom import PHANTOM_VERSION

__all__ = [
    "CARD_NAME",
    "REQUIRED_CARD_KEYS",
    "WEIGHTS_NAME",
    "CheckpointError",
    "demo_cache_dir",
    "file_sha256",
    "is_checkpoint_dir",
    "load_checkpoint",
    "save_checkpoint",
]

#: Keys every model card carries, whatever the model kind.
REQUIRED_CARD_KEYS: tuple[str, ...] = (
    "name",
    "version",
    "created",
    "kind",
    "demo",
    "weights_sha256",
)


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or cannot be written."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (weights can be hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: Path, state_dict: Mapping[str, torch.Tensor], card: Mapping[str, Any]
) -> Path:
    """Write a checkpoint atomically.

    Parameters
    ----------
    directory
        Target directory. It may not exist yet, be empty, or hold a previous checkpoint (which is
        replaced); any other content is refused rather than deleted.
    state_dict
        Tensors of the network (moved to CPU and made contiguous here).
    card
        The model card; ``weights_sha256`` is added (an existing value is replaced).

    Returns
    -------
    Path
        ``directory``.

    Raises
    ------
    CheckpointError
        When ``directory`` holds something other than a checkpoint, or the files cannot be
        written.
    """
    directory = Path(directory)
    if directory.exists() and not (
        directory.is_dir() and (not any(directory.iterdir()) or is_checkpoint_dir(directory))
    ):
        raise CheckpointError(
            f"{directory} exists and is not an empty folder or a checkpoint; not replacing it"
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        weights = tmp / WEIGHTS_NAME
        save_file(tensors, str(weights))
        full_card = dict(card)
        full_card["weights_sha256"] = file_sha256(weights)
        text = json.dumps(full_card, indent=2, sort_keys=False, allow_nan=False) + "\n"
        (tmp / CARD_NAME).write_text(text, encoding="utf-8")
        for path in (weights, tmp / CARD_NAME):
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a service user may need to read it
        if directory.exists():
            # rename(2) cannot replace a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "previous")
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except (OSError, ValueError, TypeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the checkpoint {directory}: {exc}") from exc
    return directory


def load_checkpoint(
    directory: Path, required: Iterable[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    directory
        The checkpoint directory.
    required
        Card keys needed beyond :data:`REQUIRED_CARD_KEYS` (the model kind's own).

    Returns
    -------
    state_dict, card
        CPU tensors by name, and the model card.

    Raises
    ------
    CheckpointError
        When a file is missing or unreadable, the card is not a JSON object or lacks a required
        key, or the weights do not match the card's SHA-256.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    card_path = directory / CARD_NAME
    for path in (weights, card_path):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {directory} is not a model checkpoint")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{card_path} is not readable JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"{card_path} must hold a JSON object")
    missing = [key for key in (*REQUIRED_CARD_KEYS, *required) if key not in card]
    if missing:
        raise CheckpointError(f"{card_path} lacks the key(s) {', '.join(missing)}")
    actual = file_sha256(weights)
    if actual != card["weights_sha256"]:
        raise CheckpointError(
            f"{weights} does not match its model card (SHA-256 {actual[:12]}…, card says "
            f"{str(card['weights_sha256'])[:12]}…): the file is corrupt or was replaced"
        )
    try:
        state_dict = load_file(str(weights), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{weights} cannot be read: {exc}") from exc
    return state_dict, card


def demo_cache_dir(kind: str, key: Mapping[str, Any]) -> Path:
    """Where the demo model of ``kind`` trained with the settings ``key`` is cached.

    ``$XDG_CACHE_HOME/mvi-node/models/<kind>-<hash>`` (default ``~/.cache/...``), whatever the
    node's data directory. The hash covers ``key`` and :data:`model.phantom.PHANTOM_VERSION`, so
    a new phantom generator or another training setting gets its own directory.

    Parameters
    ----------
    kind
        Model kind (``"segmenter"``, ``"fusion"``).
    key
        JSON-serialisable training settings.
    """
    if not kind or "/" in kind:
        raise ValueError(f"kind must be a plain name, got {kind!r}")
    full = {"phantom_version": PHANTOM_VERSION, **key}
    digest = hashlib.sha256(
        json.dumps(full, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()[:12]
    base = os.environ.get("XDG_CACHE_HOME") or ""
    # The XDG spec says a relative value is invalid and must be ignored.
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".cache"
    return root / "mvi-node" / "models" / f"{kind}-{digest}"
