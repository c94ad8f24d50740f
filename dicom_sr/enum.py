"""The codes of one analysis result, defined once for the objects, the model and the node.

A pure module (no highdicom, no settings): :mod:`dicom_sr`, :mod:`model` and :mod:`node` all
import it, as highdicom keeps its SEG enumerations in ``highdicom.seg.enum``. The members are
:class:`enum.StrEnum`, so they compare equal to, and serialise as, the strings ``result.json``
and the database have always held.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["RiskCategory", "Status"]


class Status(StrEnum):
    """How an analysis ended (``result.json`` ``status``).

    Only ``scored`` results carry an MVI probability; every other status carries a reason.
    """

    #: The MVI model scored the study.
    SCORED = "scored"
    #: Paired, registered and segmented, but no liver tumor (or one too small to crop).
    NO_TUMOR = "no_tumor"
    #: Not a contrast liver CT (no axial CT volume, no contrast phases).
    NOT_APPLICABLE = "not_applicable"
    #: Contrast phases present but no usable pair, a failed registration, an empty LOAT crop.
    NEEDS_REVIEW = "needs_review"
    #: The node failed to analyse the study (after its retries).
    FAILED = "failed"


class RiskCategory(StrEnum):
    """The MVI risk of a scored result: ``high`` from the model's threshold up, else ``low``."""

    HIGH = "high"
    LOW = "low"
