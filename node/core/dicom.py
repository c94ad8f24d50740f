"""DICOM written once: SOP classes, DIMSE statuses, functional groups and the node's calls.

Every module of ``node`` takes these from here rather than spelling a UID, a status code or an
association set-up again. ``model/`` and ``dicom_sr/`` do not import ``node`` and keep their own.

- **SOP classes**: pydicom's :mod:`pydicom.uid` constants as plain strings (what the store and
  the headers hold), plus the one pydicom lacks.
- **Statuses**: pynetdicom's :class:`~pynetdicom.status.Status` and categories, and the C-STORE
  codes the receiver answers with (the low byte says which check failed, for the sender's log).
- **Functional groups** of multi-frame objects (Enhanced CT, SEG): per-frame wins over shared.
- **The node as SCU**: one AE (its title and ``[node]`` timeouts) and one way to associate
  with a ``[peers.NAME]``, over TLS when the peer says so (the outbox, re-query and ``echo``).

Importing this module loads pydicom and pynetdicom only (the receiving side imports it).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom.status import (
    GENERAL_STATUS,
    STATUS_PENDING,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    Status,
    code_to_category,
)

from node.core.logging import get_logger
from node.core.settings import PeerSection, Settings

log = get_logger("node.core.dicom")

__all__ = [
    "ANALYSABLE_SOP_CLASSES",
    "CANNOT_UNDERSTAND",
    "CANNOT_UNDERSTAND_INVALID_UID",
    "CANNOT_UNDERSTAND_MISSING_UID",
    "COMPREHENSIVE_3D_SR_STORAGE",
    "COMPREHENSIVE_SR_STORAGE",
    "CT_IMAGE_STORAGE",
    "DATASET_SOP_CLASS_MISMATCH",
    "DATASET_SOP_INSTANCE_MISMATCH",
    "ENHANCED_CT_IMAGE_STORAGE",
    "LABELMAP_SEGMENTATION_STORAGE",
    "MOVE_DESTINATION_UNKNOWN",
    "OUT_OF_RESOURCES_DISK_FLOOR",
    "OUT_OF_RESOURCES_PERSISTENCE",
    "RETRIEVE_WARNING",
    "SECONDARY_CAPTURE_IMAGE_STORAGE",
    "SEGMENTATION_STORAGE",
    "STORE_WARNINGS",
    "SUCCESS",
    "associate",
    "file_bytes",
    "functional_group",
    "functional_group_items",
    "is_pending",
    "out_of_resources",
    "scu_ae",
    "stored",
    "tls_args",
]

# -- SOP classes --------------------------------------------------------------------------------

CT_IMAGE_STORAGE: Final = str(CTImageStorage)
ENHANCED_CT_IMAGE_STORAGE: Final = str(EnhancedCTImageStorage)
SEGMENTATION_STORAGE: Final = str(SegmentationStorage)
#: Label Map Segmentation Storage (PS3.4 2024b); pydicom 3.0 does not name it yet.
LABELMAP_SEGMENTATION_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.66.7"
COMPREHENSIVE_SR_STORAGE: Final = str(ComprehensiveSRStorage)
COMPREHENSIVE_3D_SR_STORAGE: Final = str(Comprehensive3DSRStorage)
SECONDARY_CAPTURE_IMAGE_STORAGE: Final = str(SecondaryCaptureImageStorage)

#: What the node can analyse; every other storage class is kept and counted, never analysed.
ANALYSABLE_SOP_CLASSES: Final = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SEGMENTATION_STORAGE}
)

# -- DIMSE statuses -----------------------------------------------------------------------------

SUCCESS: Final = int(Status.SUCCESS)
#: C-MOVE: the PACS does not know the destination AE title.
MOVE_DESTINATION_UNKNOWN: Final = int(Status.MOVE_DESTINATION_UNKNOWN)
#: C-MOVE / C-GET: sub-operations complete, one or more failed or warned (PS3.4 C.4.2.1.5).
RETRIEVE_WARNING: Final = 0xB000
#: C-STORE warnings (PS3.4 B.2.3: coercion, elements discarded, data set does not match the SOP
#: class): the instance is stored. The general DIMSE warnings are not storage outcomes.
STORE_WARNINGS: Final = frozenset(
    code
    for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items()
    if category == STATUS_WARNING and code not in GENERAL_STATUS
)

# The C-STORE failures the receiver answers with (PS3.4 B.2.3).
OUT_OF_RESOURCES_DISK_FLOOR: Final = 0xA700
OUT_OF_RESOURCES_PERSISTENCE: Final = 0xA701
DATASET_SOP_CLASS_MISMATCH: Final = 0xA900
DATASET_SOP_INSTANCE_MISMATCH: Final = 0xA901
CANNOT_UNDERSTAND: Final = 0xC000
CANNOT_UNDERSTAND_MISSING_UID: Final = 0xC001
#: A UID that is not 1–64 characters of digits in dot-separated components (PS3.5 9.1): it would
#: be copied into the node's results and could name a path.
CANNOT_UNDERSTAND_INVALID_UID: Final = 0xC002
#: Native (uncompressed) pixel data whose length is not Rows × Columns × Samples per Pixel ×
#: Number of Frames × Bits Allocated / 8: the image cannot be what the header says.
CANNOT_UNDERSTAND_PIXEL_LENGTH: Final = 0xC003
#: A dataset larger than ``node.max_instance_mb`` (or a deflated one that inflates beyond it).
OUT_OF_RESOURCES_TOO_LARGE: Final = 0xA702


def is_pending(code: int) -> bool:
    """Whether a C-FIND / C-MOVE / C-GET response says more is to come."""
    return code_to_category(code) == STATUS_PENDING


def stored(code: int) -> bool:
    """Whether a C-STORE response means the peer has the instance (success or a warning)."""
    return code == SUCCESS or code in STORE_WARNINGS


def out_of_resources(code: int) -> bool:
    """Whether a C-STORE failure is "refused: out of resources" (``0xA7xx``), which may pass."""
    return OUT_OF_RESOURCES_DISK_FLOOR <= code <= 0xA7FF


# -- functional groups --------------------------------------------------------------------------


def functional_group(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """The item of functional group ``keyword`` for ``frame`` (0-based): per-frame wins over
    shared, as PS3.3 C.7.6.16 says; None when neither has it (or its sequence is empty)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame):
        sequence = per_frame[frame].get(keyword)
        if sequence:
            return sequence[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        sequence = shared[0].get(keyword)
        if sequence:
            return sequence[0]
    return None


def functional_group_items(ds: Dataset, keyword: str) -> Iterator[Dataset]:
    """Every item of functional group ``keyword``: the shared group's, then each frame's."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups) or []:
            yield from group.get(keyword) or []


# -- writing built objects ----------------------------------------------------------------------


def file_bytes(dataset: Dataset) -> bytes:
    """A dataset built in memory (the node's SEG, SR, SC…) as the bytes of a DICOM file.

    pydicom corrects the ambiguous VRs (``US or SS``…) of a dataset not read from a file before
    writing it, and does so again for each item of a sequence at every level it is written
    from: the items of an SR's image library or of a SEG's per-frame groups, 4–6 levels deep,
    are walked four times over on average (a quarter of the writing at 512 x 512 x 200). For a
    built dataset and a native explicit-VR transfer syntax the tree is corrected once here and
    every built dataset in it marked as already in the file's encoding, so the writer writes
    their elements as they stand; items read from a file (a source header's sequence items
    copied into the output) are left to pydicom's own rule, which copies their raw elements
    byte for byte. The bytes are pydicom's. ``dataset`` stays marked: a later write in another
    encoding corrects it again, and an ambiguous VR added meanwhile fails loudly instead of
    being guessed. Anything else (a dataset read from a file, implicit VR, compressed pixels)
    is written by pydicom as it is.
    """
    from io import BytesIO

    from pydicom.filewriter import correct_ambiguous_vr

    meta = getattr(dataset, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if (
        syntax is not None
        and not syntax.is_implicit_VR
        and not syntax.is_encapsulated
        and _built(dataset)
    ):
        correct_ambiguous_vr(dataset, syntax.is_little_endian)
        _mark_encoded(dataset, syntax.is_little_endian)
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _built(dataset: Dataset) -> bool:
    """Made in memory, not read from a file (pydicom knows no encoding it was read in)."""
    return dataset.original_encoding == (None, None)


def _mark_encoded(dataset: Dataset, little_endian: bool) -> None:
    for tag in list(dataset.keys()):
        # A raw element of a built dataset is decoded first (with its own character set), as
        # the writer would; the items of a sequence read from a file keep theirs.
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value:
                if _built(item):
                    _mark_encoded(item, little_endian)
    # The writer compares these with the dataset's own to decide whether to correct it.
    dataset.set_original_encoding(False, little_endian, dataset._character_set)


# -- the node as SCU ----------------------------------------------------------------------------


def scu_ae(settings: Settings) -> Any:
    """A pynetdicom AE calling with the node's AE title and ``[node]`` time-outs (no contexts)."""
    from pynetdicom import AE

    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = settings.node.acse_timeout
    ae.dimse_timeout = settings.node.dimse_timeout
    ae.network_timeout = settings.node.network_timeout
    # Without it a TCP connect to a host that drops packets waits for the kernel (minutes).
    ae.connection_timeout = settings.node.network_timeout
    return ae


def tls_args(settings: Settings, peer: PeerSection) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for calling ``peer``: None unless it is marked ``tls = true``.

    Raises
    ------
    node.core.tls.TLSConfigError
        When the TLS files of ``[security]`` cannot be used.
    """
    if not peer.tls or peer.host is None:
        return None
    from node.core.tls import client_context

    return client_context(settings.security, check_hostname=peer.tls_check_hostname), peer.host


def associate(
    settings: Settings,
    peer: PeerSection,
    contexts: Sequence[str | tuple[str, Sequence[str]]],
    **kwargs: Any,
) -> Any:
    """Request an association with ``peer`` proposing ``contexts`` from :func:`scu_ae`.

    Parameters
    ----------
    settings
        The node's AE title and time-outs, the TLS files.
    peer
        The ``[peers.NAME]`` to call; it must have a host and port.
    contexts
        SOP class UIDs (with pynetdicom's default transfer syntaxes), or (UID, syntaxes).
    **kwargs
        Passed to :meth:`pynetdicom.ae.ApplicationEntity.associate` (``ext_neg``,
        ``evt_handlers``...).

    Returns
    -------
    pynetdicom.association.Association
        Established or not: the caller says what a refusal means to it.
    """
    ae = scu_ae(settings)
    for context in contexts:
        if isinstance(context, tuple):
            ae.add_requested_context(context[0], list(context[1]))
        else:
            ae.add_requested_context(context)
    if peer.host is None or peer.port is None:
        raise ValueError("associate() needs a peer with a host and a port")
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args(settings, peer), **kwargs
    )
    if assoc.is_established and peer.tls_fingerprint is not None:
        from node.core.tls import association_socket, peer_fingerprint

        presented = peer_fingerprint(association_socket(assoc))
        if presented != peer.tls_fingerprint:
            # Nothing but the association request has been sent: drop it before any data.
            log.warning(
                "association aborted: the peer's certificate is not the one pinned for it",
                called_ae=peer.ae_title,
                presented=presented,
            )
            assoc.abort()
    return assoc
