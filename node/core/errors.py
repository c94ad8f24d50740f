"""The node's exceptions: one base, one subclass per role, each class named where it is raised.

A caller that only needs the role catches the role: the command line maps
:class:`ConfigurationError` and :class:`InputError` to exit 2 (the user can fix the command, the
configuration or the file it names) and :class:`WorkFailed` to exit 1 (the work itself failed).
Every message is one line that names the bad setting, option or file and says what to do; none
carries a patient identifier.

``model/`` and ``dicom_sr/`` keep their own errors (``RegistrationError``, ``RoiError``,
``CheckpointError``...): they must not import ``node``.
"""

from __future__ import annotations

__all__ = ["ConfigurationError", "InputError", "NodeError", "WorkFailed", "exit_code"]


class NodeError(Exception):
    """Base of every error the node raises on purpose (never for a bug)."""


class ConfigurationError(NodeError):
    """The configuration or the command's options cannot work: a setting, peer, model or option
    is missing or wrong. The message names it."""


class InputError(NodeError):
    """An input the node was given cannot be used (a DICOM file or series, a CSV, a label
    table). The message names the file, key or line, never the patient."""


class WorkFailed(NodeError):
    """The inputs and configuration were usable, but the work itself failed."""


def exit_code(error: NodeError) -> int:
    """The command line's exit status for ``error``: 1 when the work failed, else 2."""
    return 1 if isinstance(error, WorkFailed) else 2
