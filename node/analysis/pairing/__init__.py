"""Pick the arterial (AP) and portal-venous (PVP) series of a contrast liver CT study.

A study arrives as a handful of series: a localizer, the contrast phases, perhaps reformats,
dose reports and segmentations. :func:`pair_phases` decides which two series the pipeline
analyses, and records why, from three kinds of evidence:

1. **Names** -- the configurable regular expressions of ``[phases]`` on SeriesDescription and
   ProtocolName;
2. **Timing** -- contrast bolus tags and acquisition times (seconds after ContrastBolusStartTime,
   else the order of the contrast acquisitions);
3. **Image** -- a cheap look at the volumes themselves, comparing the study's series with each
   other (see :func:`image_metrics`). It decides when names and timing are missing or disagree.

:func:`series_info` reads the headers of one series (never the pixels) into a
:class:`SeriesInfo`; it never raises, so that one odd series cannot stop a study -- a series that
cannot be read carries the reason in :attr:`SeriesInfo.error` and is excluded.

The package: :mod:`~node.analysis.pairing.headers` reads the headers (:func:`series_info`),
:mod:`~node.analysis.pairing.rules` applies the ``[phases]`` names and the timing,
:mod:`~node.analysis.pairing.image_check` loads and compares the candidate volumes, and
:mod:`~node.analysis.pairing.decision` weighs the three (:func:`pair_phases`, :class:`Pairing`).

Nothing here logs patient identifiers: series are named by :func:`node.core.logging.uid_key`,
files by their name.
"""

from __future__ import annotations

from node.analysis.pairing.decision import Pairing, PhaseEvidence, pair_phases
from node.analysis.pairing.headers import SeriesInfo, series_info
from node.analysis.pairing.image_check import image_metrics
from node.analysis.pairing.rules import PHASES

__all__ = [
    "PHASES",
    "Pairing",
    "PhaseEvidence",
    "SeriesInfo",
    "image_metrics",
    "pair_phases",
    "series_info",
]
