"""Site effects of a multi-centre phantom cohort: what differs between hospitals, not patients.

A model validated on one centre meets, at the next, another scanner's noise, another
reconstruction kernel, a calibration offset and another case mix. A :class:`Site` carries those
four things; ``PhantomSpec(site=...)`` renders a standard phantom as that site's scanner would
(:func:`model.phantom.make_study`), and :func:`model.cohort.make_cohort` deals patients to sites.

* ``noise_hu``: standard deviation of the image noise (replaces ``PhantomSpec.noise_hu``);
* ``kernel``: the reconstruction kernel (:class:`Kernel`), applied after the noise, as a scanner
  reconstructs it: a smooth kernel blurs edges and noise, a sharp one overshoots edges and
  amplifies the noise;
* ``hu_offset``: added to every voxel of every phase (CT-number calibration);
* ``mvi_logit_offset``: added to the MVI label's logit (case mix: a surgical referral centre sees
  more advanced tumours). It changes the prevalence, not what the image shows of a tumour.

Nothing here renders; the values are what :mod:`model.phantom` reads.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["KERNELS", "SITES", "Kernel", "Site"]


class Kernel(enum.StrEnum):
    """Reconstruction kernel of a site's scanner."""

    SMOOTH = "smooth"
    STANDARD = "standard"
    SHARP = "sharp"


KERNELS: dict[Kernel, tuple[float, float]] = {
    # (in-plane Gaussian sigma in mm, unsharp-mask amount with a 1.5 mm sigma)
    Kernel.SMOOTH: (2.5, 0.0),
    Kernel.STANDARD: (0.0, 0.0),
    Kernel.SHARP: (0.0, 1.0),
}
"""What each kernel does to the rendered image (the same filters as the randomised domain's).

Stronger than a real kernel at a real pixel size: at the phantoms' 3-4 mm pixels a clinical smooth
kernel would be sub-pixel, and a site effect must show at the resolution the cohort is rendered."""

# Limits a site must stay within: beyond them a "site" is a different modality, not a scanner.
_MAX_NOISE_HU = 60.0
_MAX_HU_OFFSET = 60.0
_MAX_LOGIT_OFFSET = 3.0


@dataclass(frozen=True)
class Site:
    """One centre's scanner and case mix (see the module docstring for each field)."""

    name: str
    noise_hu: float = 10.0
    kernel: Kernel = Kernel.STANDARD
    hu_offset: float = 0.0
    mvi_logit_offset: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"site name must be a non-empty string, got {self.name!r}")
        try:
            object.__setattr__(self, "kernel", Kernel(self.kernel))
        except ValueError:
            raise ValueError(
                f"site {self.name}: kernel must be one of {', '.join(k.value for k in Kernel)}, "
                f"got {self.kernel!r}"
            ) from None
        for field, value, limit in (
            ("noise_hu", self.noise_hu, _MAX_NOISE_HU),
            ("hu_offset", self.hu_offset, _MAX_HU_OFFSET),
            ("mvi_logit_offset", self.mvi_logit_offset, _MAX_LOGIT_OFFSET),
        ):
            low = 0.0 if field == "noise_hu" else -limit
            if not (math.isfinite(value) and low <= value <= limit):
                raise ValueError(
                    f"site {self.name}: {field} must be in {low:g}..{limit:g}, got {value!r}"
                )


SITES: tuple[Site, ...] = (
    Site("centre-a"),
    Site("centre-b", noise_hu=16.0, kernel=Kernel.SHARP, hu_offset=12.0, mvi_logit_offset=0.6),
    Site("centre-c", noise_hu=7.0, kernel=Kernel.SMOOTH, hu_offset=-10.0, mvi_logit_offset=-0.6),
)
"""The three centres of the benchmark's multi-centre cohort: a reference site, a noisy
sharp-kernel referral centre with more MVI, and a smooth-kernel centre with less."""
