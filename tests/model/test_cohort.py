"""Specification of multi-centre cohorts with repeat studies (model/cohort.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from model.cohort import make_cohort
from model.phantom import PhantomSpec, make_study
from model.roi import RoiSpec
from model.site import SITES, Site
from model.train import cohort_rois, make_folds


def test_patients_are_dealt_to_the_sites_in_turn_and_some_come_twice() -> None:
    cohort = make_cohort(7, 300)
    assert cohort == make_cohort(7, 300)
    firsts = [s for s in cohort if s.visit == 0]
    assert len(firsts) == 300 and len({s.patient for s in firsts}) == 300
    assert [s.site for s in firsts[:6]] == [*SITES, *SITES]
    repeats = [s for s in cohort if s.visit == 1]
    assert 0.13 <= len(repeats) / 300 <= 0.27
    first_of = {s.patient: s for s in firsts}
    for repeat in repeats:
        # A repeat study is the same patient at the same site, with a study seed of its own.
        assert first_of[repeat.patient].site == repeat.site
        assert first_of[repeat.patient].seed != repeat.seed
    assert len({s.seed for s in cohort}) == len(cohort)


def test_two_cohorts_share_no_patient() -> None:
    a = {s.patient for s in make_cohort(1, 200)}
    b = {s.patient for s in make_cohort(2, 200)}
    assert not a & b


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patients": 0}, "patients must be a positive integer"),
        ({"patients": 5, "sites": ()}, "at least one site"),
        ({"patients": 5, "sites": (Site("a"), Site("a"))}, "site names must be unique"),
        ({"patients": 5, "repeat_share": 1.5}, "repeat_share must be in 0..1"),
    ],
)
def test_a_cohort_that_cannot_be_dealt_is_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_cohort(1, **kwargs)  # type: ignore[arg-type]


def test_a_repeat_study_is_the_same_patient_with_new_noise() -> None:
    spec = PhantomSpec(size=96, slices=24, phases=("arterial",))
    first = make_study(101, spec, patient=77)
    second = make_study(202, spec, patient=77)
    assert first.truth == second.truth
    assert first.latents == second.latents
    np.testing.assert_array_equal(first.masks["tumor"], second.masks["tumor"])
    difference = first.phases["arterial"].hu - second.phases["arterial"].hu
    assert 10.0 < float(difference.std()) < 20.0  # two independent draws of 10 HU noise
    quiet = dataclasses.replace(spec, noise_hu=0.0)
    np.testing.assert_array_equal(
        make_study(101, quiet, patient=77).phases["arterial"].hu,
        make_study(202, quiet, patient=77).phases["arterial"].hu,
    )


def test_a_patients_two_studies_never_cross_folds(tmp_path: object) -> None:
    cohort = make_cohort(3, 36, repeat_share=0.5)
    samples = cohort_rois(
        cohort,
        PhantomSpec(size=96, slices=24),
        RoiSpec(size=16),
        None,
        register_pv=False,
    )
    assert [s.centre for s in samples] == [c.site.name for c in cohort]
    assert [s.patient for s in samples] == [c.patient_id for c in cohort]
    twice = {c.patient_id for c in cohort if c.visit == 1}
    assert len(twice) >= 10
    labels = np.asarray([s.label for s in samples])
    for group_by in ("patient", "centre"):
        folds = make_folds(samples, labels, cv="kfold", group_by=group_by, folds=3, seed=0)
        fold_of: dict[str, set[int]] = {}
        for number, fold in enumerate(folds):
            for index in fold:
                fold_of.setdefault(samples[int(index)].patient, set()).add(number)
        assert all(len(numbers) == 1 for numbers in fold_of.values()), group_by
    loco = make_folds(samples, labels, cv="loco", group_by="centre", folds=3, seed=0)
    assert sorted({samples[int(i)].centre for i in loco[0]}) == [samples[int(loco[0][0])].centre]
    assert len(loco) == 3
