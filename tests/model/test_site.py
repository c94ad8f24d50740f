"""Specification of a site's effects on a phantom (model/site.py, rendered by model/phantom.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from model.domain import DomainKind
from model.phantom import PhantomSpec, PhantomStudy, make_study
from model.site import SITES, Kernel, Site

SPEC = PhantomSpec(size=96, slices=24, phases=("arterial", "portal_venous"))


def _liver_core(study: PhantomStudy) -> np.ndarray:
    """Liver voxels away from every edge, so a kernel's blur of edges does not count."""
    liver = (study.masks["liver"] > 0) & (study.masks["tumor"] == 0)
    core = liver.copy()
    for axis in (1, 2):
        for step in (-2, -1, 1, 2):
            core &= np.roll(liver, step, axis=axis)
    return core


def _render(site: Site | None, seed: int = 5) -> PhantomStudy:
    return make_study(seed, dataclasses.replace(SPEC, site=site))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": " "}, "site name"),
        ({"kernel": "bone"}, "kernel must be one of smooth, standard, sharp"),
        ({"noise_hu": -1.0}, "noise_hu must be in 0..60"),
        ({"hu_offset": 200.0}, "hu_offset must be in -60..60"),
        ({"mvi_logit_offset": float("inf")}, "mvi_logit_offset"),
    ],
)
def test_a_site_outside_its_limits_is_refused_naming_the_field(
    change: dict[str, object], match: str
) -> None:
    fields: dict[str, object] = {"name": "centre-x", **change}
    with pytest.raises(ValueError, match=match):
        Site(**fields)  # type: ignore[arg-type]


def test_a_site_renders_the_standard_domain_only() -> None:
    with pytest.raises(ValueError, match="standard domain only"):
        PhantomSpec(domain=DomainKind.RANDOMISED, site=SITES[0])


def test_the_hu_offset_moves_every_voxel_and_nothing_else() -> None:
    quiet = Site("quiet", noise_hu=0.0)
    shifted = Site("shifted", noise_hu=0.0, hu_offset=-10.0)
    a, b = _render(quiet), _render(shifted)
    for phase in ("arterial", "portal_venous"):
        np.testing.assert_allclose(b.phases[phase].hu - a.phases[phase].hu, -10.0, atol=1e-3)
    np.testing.assert_array_equal(a.masks["tumor"], b.masks["tumor"])


def test_the_noise_and_the_kernel_set_the_texture() -> None:
    noise = {}
    for kernel in Kernel:
        study = _render(Site(kernel.value, noise_hu=12.0, kernel=kernel))
        noise[kernel] = float(study.phases["arterial"].hu[_liver_core(study)].std())
    # A smooth kernel averages the noise away, a sharp one amplifies it.
    assert noise[Kernel.SMOOTH] < 0.8 * noise[Kernel.STANDARD]
    assert noise[Kernel.SHARP] > 1.2 * noise[Kernel.STANDARD]
    louder = _render(Site("loud", noise_hu=24.0))
    assert (
        float(louder.phases["arterial"].hu[_liver_core(louder)].std())
        > 1.6 * noise[Kernel.STANDARD]
    )


def test_a_site_case_mix_moves_the_label_probability_not_the_patient() -> None:
    plain = _render(None)
    referral = _render(Site("referral", mvi_logit_offset=1.5))
    assert referral.latents["mvi_probability"] > plain.latents["mvi_probability"]
    assert referral.truth.max_diameter_mm == plain.truth.max_diameter_mm
    assert referral.latents["washout"] == plain.latents["washout"]


def test_the_benchmark_sites_differ_in_every_effect() -> None:
    assert len({s.name for s in SITES}) == len(SITES) == 3
    for field in ("noise_hu", "kernel", "hu_offset", "mvi_logit_offset"):
        assert len({getattr(s, field) for s in SITES}) == 3, field
