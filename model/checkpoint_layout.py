"""What a checkpoint folder holds, by name: readable without torch.

The receiving process (``mvi-node serve``'s pre-flight) checks that a configured model folder is
a checkpoint before any worker loads it; it must not import torch or SimpleITK to do so, as
:mod:`model.checkpoint` (which reads and writes the tensors) does.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CARD_NAME", "WEIGHTS_NAME", "is_checkpoint_dir"]

WEIGHTS_NAME = "weights.safetensors"
CARD_NAME = "model_card.json"


def is_checkpoint_dir(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but checkpoint files (and at least one of them)."""
    if not directory.is_dir():
        return False
    names = {p.name for p in directory.iterdir()}
    return bool(names) and names <= {WEIGHTS_NAME, CARD_NAME}
