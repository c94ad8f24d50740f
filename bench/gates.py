"""Quality gates on a shifted phantom cohort: how many studies are scored, how many gated, by what.

Renders phantom studies the models never saw, shifted away from the training phantoms in one or
more ways per study (contrast gain and HU offset, stronger correlated noise, mirrored anatomy,
thicker slices), plus a few bad inputs (a non-contrast series labelled arterial, a liver cut off
by the field of view), writes them as DICOM and analyses each with the node's pipeline
(``mvi-node analyze``'s path, demo models). Prints per study the shift, the status, the failed
gates and, for scored studies, the diameter error against the phantom's truth; then the counts
per gate and the largest diameter error among scored studies (the trust goal: at most 25 %).

Usage: python bench/gates.py [--studies 12] [--size 256] [--slices 64] [--seed 7000]
       [--in-distribution 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from model.phantom import PhantomStudy
from node.analysis.dicomio import scan_folder
from node.analysis.models import Models
from node.analysis.pipeline import analyse_study
from node.core.settings import Settings
from node.offline.phantom_study import CohortOptions, write_study

SHIFTS = ("contrast", "noise", "mirror", "thick", "all")
BAD = ("non_contrast_as_arterial", "liver_cut")


def _contrast(phantom: PhantomStudy, rng: np.random.Generator) -> None:
    gain = float(rng.choice([0.55, 1.6]))
    offset = float(rng.uniform(-25.0, 25.0))
    for volume in phantom.phases.values():
        hu = volume.hu
        soft = (hu > -300.0) & (hu < 600.0)
        hu[soft] = 40.0 + (hu[soft] - 40.0) * gain + offset


def _noise(phantom: PhantomStudy, rng: np.random.Generator) -> None:
    import SimpleITK as sitk

    for volume in phantom.phases.values():
        noise = rng.standard_normal(volume.hu.shape).astype(np.float32)
        image = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noise), 1.0)
        correlated = sitk.GetArrayFromImage(image)
        correlated *= 30.0 / max(float(correlated.std()), 1e-6)
        volume.hu += correlated


def _mirror(phantom: PhantomStudy) -> None:
    for volume in phantom.phases.values():
        volume.hu = np.ascontiguousarray(volume.hu[:, :, ::-1])
    for name, mask in list(phantom.masks.items()):
        phantom.masks[name] = np.ascontiguousarray(mask[:, :, ::-1])


def _non_contrast_as_arterial(phantom: PhantomStudy) -> None:
    plain = phantom.phases["non_contrast"]
    phantom.phases["arterial"].hu = plain.hu.copy()


def _liver_cut(phantom: PhantomStudy) -> None:
    # Keep the lower 40 % of the slices: the scan ends inside the liver.
    for volume in phantom.phases.values():
        volume.hu = np.ascontiguousarray(volume.hu[: int(volume.hu.shape[0] * 0.4)])
    for name, mask in list(phantom.masks.items()):
        phantom.masks[name] = np.ascontiguousarray(mask[: int(mask.shape[0] * 0.4)])


def transform_for(kinds: dict[int, str], seed: int):  # type: ignore[no-untyped-def]
    """The transform of study ``index``: its shift kind from ``kinds``."""

    def apply(phantom: PhantomStudy, index: int) -> PhantomStudy:
        kind = kinds[index]
        rng = np.random.default_rng([seed, index])
        if kind in ("contrast", "all"):
            _contrast(phantom, rng)
        if kind in ("noise", "all"):
            _noise(phantom, rng)
        if kind in ("mirror", "all"):
            _mirror(phantom)
        if kind == "non_contrast_as_arterial":
            _non_contrast_as_arterial(phantom)
        if kind == "liver_cut":
            _liver_cut(phantom)
        return phantom

    return apply


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12, help="shifted studies")
    parser.add_argument("--in-distribution", type=int, default=4, help="unshifted studies")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--verbose", action="store_true", help="print every gate's figures")
    args = parser.parse_args()

    kinds: dict[int, str] = {}
    for i in range(args.in_distribution):
        kinds[i] = "none"
    for j in range(args.studies):
        kinds[args.in_distribution + j] = SHIFTS[j % len(SHIFTS)]
    for j, bad in enumerate(BAD):
        kinds[args.in_distribution + args.studies + j] = bad

    settings = Settings()
    models = Models(settings, device=settings.pipeline.device)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-gates-"))
    rows = []
    started = time.perf_counter()
    for index, kind in kinds.items():
        slices = args.slices // 2 if kind in ("thick", "all") else args.slices
        options = CohortOptions(
            seed=args.seed,
            size=args.size,
            slices=slices,
            transform=transform_for(kinds, args.seed),
        )
        folder = out / f"study-{index:03d}"
        written = write_study(folder, index, options)
        ((study_uid, series),) = scan_folder(folder).items()
        analysis = analyse_study(study_uid, series, settings, models)
        result = analysis.result
        truth = written.phantom.truth.max_diameter_mm
        measured = result.tumor.max_diameter_mm if result.tumor is not None else None
        error = (
            abs(measured - truth) / truth
            if result.status == "scored" and measured is not None and truth > 0
            else None
        )
        failed = [str(g.name) for g in result.gates if g.passed is False]
        rows.append((index, kind, str(result.status), failed, error, result))
        shown = f"{100 * error:5.1f} %" if error is not None else "     -"
        print(
            f"{index:3d} {kind:26s} {result.status!s:13s} diameter error {shown}  "
            f"gated by {','.join(failed) or '-'}",
            flush=True,
        )
        for gate in result.gates:
            if gate.passed is False or args.verbose:
                print(f"      {gate.text}", flush=True)
    print()
    statuses = collections.Counter(status for _, _, status, _, _, _ in rows)
    gated = collections.Counter(name for *_, failed, _, _ in rows for name in failed)
    print(f"studies {len(rows)}: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    print("failed gates: " + (", ".join(f"{k} {v}" for k, v in sorted(gated.items())) or "none"))
    errors = [e for *_, e, _ in rows if e is not None]
    if errors:
        print(
            f"scored diameter error: median {100 * float(np.median(errors)):.1f} %, "
            f"max {100 * max(errors):.1f} % (goal: max <= 25 %)"
        )
    for kind in ("none", *SHIFTS, *BAD):
        picked = [r for r in rows if r[1] == kind]
        if picked:
            scored = sum(1 for r in picked if r[2] == "scored")
            print(f"  {kind:26s} {len(picked)} studies, {scored} scored")
    print(f"seconds: {time.perf_counter() - started:.0f} ({out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
