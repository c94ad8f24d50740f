"""Keyed pseudonyms for identifiers leaving the node (results export, audit joins).

One function, used on both sides of an audit: ``results export`` replaces identifier columns by
``keyed_hash(value, security.pseudonym_key)``, and ``audit`` applies the same function to the
follow-up table's keys so the two join without either file holding a plain identifier.
HMAC-SHA256 rather than a bare hash: study UIDs and accession numbers are guessable, and an
unkeyed hash of a guessable value is no pseudonym.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from node.core.errors import ConfigurationError

#: Length of a pseudonym in hex characters (128 bits: collisions are not a practical concern).
PSEUDONYM_LENGTH = 32

_PSEUDONYM = re.compile(rf"^[0-9a-f]{{{PSEUDONYM_LENGTH}}}$")


class PseudonymKeyMissing(ConfigurationError):
    """Raised when a keyed hash is asked for but ``security.pseudonym_key`` is empty."""


def keyed_hash(value: str, key: str) -> str:
    """The pseudonym of ``value`` under ``key``.

    Parameters
    ----------
    value
        An identifier (study instance UID, accession number, patient ID); surrounding
        whitespace is ignored so that a value padded by a DICOM writer or a spreadsheet still
        maps to the same pseudonym.
    key
        The site's secret (``security.pseudonym_key``).

    Returns
    -------
    str
        ``PSEUDONYM_LENGTH`` lowercase hex characters.

    Raises
    ------
    PseudonymKeyMissing
        When ``key`` is empty: an empty key would make the pseudonym a plain hash.
    """
    if not key:
        raise PseudonymKeyMissing(
            "security.pseudonym_key is empty: set it (or MVI_SECURITY__PSEUDONYM_KEY) to export "
            "or join hashed identifiers"
        )
    digest = hmac.new(key.encode("utf-8"), value.strip().encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:PSEUDONYM_LENGTH]


#: Hashed exports move every study date of a patient by the same number of days, drawn from the
#: patient's pseudonym and the key within this many days either way: the calendar date is an
#: identifier (with age and sex it singles patients out), the intervals between one patient's
#: studies are the data, and they stay.
DATE_SHIFT_MAX_DAYS = 365


def date_shift_days(pseudonym: str, key: str) -> int:
    """The days a hashed export shifts the dates of the patient with ``pseudonym`` by.

    Derived from the pseudonym (not the plain identifier) so that the audit, which may only ever
    see pseudonyms, shifts a follow-up date by the same amount. Never 0.

    Raises
    ------
    PseudonymKeyMissing
        When ``key`` is empty.
    """
    if not key:
        raise PseudonymKeyMissing(
            "security.pseudonym_key is empty: set it (or MVI_SECURITY__PSEUDONYM_KEY); hashed "
            "exports shift dates with it"
        )
    digest = hmac.new(key.encode("utf-8"), b"date-shift\0" + pseudonym.encode(), hashlib.sha256)
    step = int.from_bytes(digest.digest()[:8], "big") % (2 * DATE_SHIFT_MAX_DAYS)
    # 0 … 2·MAX−1 onto −MAX … −1, 1 … MAX.
    return (
        step - DATE_SHIFT_MAX_DAYS if step < DATE_SHIFT_MAX_DAYS else step - DATE_SHIFT_MAX_DAYS + 1
    )


def looks_hashed(values: list[str]) -> bool:
    """Whether every non-empty value has the shape of a pseudonym (and there is at least one).

    A DICOM UID always contains a dot, so a study UID column is never mistaken for pseudonyms.
    """
    present = [v.strip() for v in values if v and v.strip()]
    return bool(present) and all(_PSEUDONYM.match(v) for v in present)
