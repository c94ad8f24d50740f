"""Multi-centre phantom cohorts with repeat studies: what a site's validation data look like.

A real training set is not one study per patient from one scanner. Patients come from several
centres (:class:`model.site.Site`: noise, kernel, HU offset, case mix), and some have two
pre-operative CTs, which must stay in one fold (a patient in training and validation at once is
the leak a reviewer looks for first). :func:`make_cohort` deals patients to sites round-robin and
gives a share of them a second study; :class:`CohortStudy` says how to render each one.

Nothing here renders; :func:`model.train.cohort_rois` cuts the ROIs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.phantom import PhantomSpec
from model.site import SITES, Site

__all__ = ["CohortStudy", "make_cohort"]


@dataclass(frozen=True)
class CohortStudy:
    """One study of a cohort.

    ``seed`` is the study's (its noise), ``patient`` the patient's (latents, label, anatomy);
    ``visit`` 0 is the first study, 1 a repeat.
    """

    seed: int
    patient: int
    site: Site
    visit: int = 0

    @property
    def study_id(self) -> str:
        return f"phantom-{self.seed}"

    @property
    def patient_id(self) -> str:
        return f"patient-{self.patient}"

    def spec(self, base: PhantomSpec) -> PhantomSpec:
        """``base`` rendered at this study's site."""
        return dataclasses.replace(base, site=self.site)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def make_cohort(
    seed: int,
    patients: int,
    *,
    sites: Sequence[Site] = SITES,
    repeat_share: float = 0.2,
) -> list[CohortStudy]:
    """Patients dealt to ``sites`` round-robin; a ``repeat_share`` of them have a second study.

    Deterministic per arguments. Patient ``i`` of cohort ``seed`` has seed
    ``SeedSequence([seed, i])``; its studies ``SeedSequence([seed, i, visit])``, so two cohorts of
    different seeds share no patient.

    Raises
    ------
    ValueError
        On no patients, no sites, two sites of one name, or a share outside 0..1.
    """
    if isinstance(patients, bool) or not isinstance(patients, int) or patients < 1:
        raise ValueError(f"patients must be a positive integer, got {patients!r}")
    if not sites:
        raise ValueError("a cohort needs at least one site")
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    if not (math.isfinite(repeat_share) and 0.0 <= repeat_share <= 1.0):
        raise ValueError(f"repeat_share must be in 0..1, got {repeat_share!r}")
    rng = np.random.default_rng(_seed(seed, 2**31))
    studies: list[CohortStudy] = []
    for index in range(patients):
        patient = _seed(seed, index)
        site = sites[index % len(sites)]
        visits = 2 if rng.random() < repeat_share else 1
        studies.extend(
            CohortStudy(seed=_seed(seed, index, visit), patient=patient, site=site, visit=visit)
            for visit in range(visits)
        )
    return studies
