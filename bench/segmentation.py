"""Segmenter figures on held-out phantoms: Dice, measurement errors, seconds per study.

Trains a segmenter with the benchmark's own budget (``--iterations``, larger than the demo's) on
``--phantoms`` studies of cohort seed ``--seed``, or evaluates an existing ``--model DIR``; then
segments ``--test`` phantom studies of another cohort seed (``--test-seed``, never a training
patient) at 256×256×64 and prints, per study and as mean / median:

* Dice of tumour, LOAT, liver, stomach and aorta on the arterial grid, and the segmenter's
  uncertainty (:attr:`model.segmentation.Masks.uncertainty`);
* relative error of the maximum axial tumour diameter and of the LOAT maximum axial area against
  the phantom's truth (both measured with :func:`model.measure.measure`);
* seconds of segmentation per study (registration excluded, printed separately);

then the seconds of one 512×512×200 study. Goals of the issue: Dice tumour ≥ 0.85, LOAT ≥ 0.80,
diameter error ≤ 10 %, LOAT area error ≤ 15 %.

Usage: python bench/segmentation.py [--iterations 3000] [--phantoms 16] [--model DIR]
       [--device auto|cpu|cuda] [--test 6] [--large/--no-large] [--save DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from model.measure import measure
from model.phantom import PhantomSpec, make_study
from model.registration import register, resample_onto
from model.segmentation import LABELS, UNetSegmenter, dice, labels_from_masks, resolve_device
from model.train_seg import TrainingSample, train_segmenter

# Only model.* is imported: the benchmark runs wherever torch, MONAI and SimpleITK do (a GPU
# machine without the node's DICOM and service dependencies included).


def study_seed(cohort_seed: int, index: int) -> int:
    """Seed of study ``index`` of a cohort, as :func:`node.offline.phantom_study.study_seed`."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1)[0])


def _image(volume: np.ndarray, spacing: Any, origin: Any) -> Any:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    return image


def _relative_error(value: float, truth: float) -> float:
    return abs(value - truth) / truth if truth > 0 else float("nan")


def _phantom_pair(seed: int, size: int, slices: int) -> tuple[Any, Any, Any]:
    """Arterial image, portal-venous image (unregistered), and the phantom."""
    phantom = make_study(
        seed, PhantomSpec(size=size, slices=slices, phases=("arterial", "portal_venous"))
    )
    arterial = _image(phantom.phases["arterial"].hu, phantom.spacing_mm, phantom.origin_mm)
    portal = _image(phantom.phases["portal_venous"].hu, phantom.spacing_mm, phantom.origin_mm)
    return arterial, portal, phantom


def training_samples(count: int, cohort_seed: int, spacing_mm: float) -> list[TrainingSample]:
    """Phantoms registered as ``mvi-node train-seg --phantoms`` prepares them."""
    samples = []
    for index in range(count):
        arterial, portal, phantom = _phantom_pair(study_seed(cohort_seed, index), 256, 64)
        registration = register(arterial, portal, working_spacing_mm=spacing_mm)
        aligned = resample_onto(portal, arterial, registration.transform)
        labels = labels_from_masks(
            phantom.masks["liver"],
            phantom.masks["tumor"],
            phantom.masks["loat"],
            stomach=phantom.masks["stomach"],
            aorta=phantom.masks["aorta"],
        )
        samples.append(TrainingSample(arterial, aligned, labels, name=f"phantom_{index + 1}"))
    return samples


def _organ_dice(found: np.ndarray | None, truth: np.ndarray) -> float:
    return float("nan") if found is None else dice(found, truth)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    segmenter: UNetSegmenter, count: int, cohort_seed: int, size: int, slices: int
) -> list[dict[str, float]]:
    """Segment ``count`` held-out phantoms; one row of figures per study."""
    rows = []
    for index in range(count):
        arterial, portal, phantom = _phantom_pair(study_seed(cohort_seed, index), size, slices)
        started = time.perf_counter()
        registration = register(arterial, portal, working_spacing_mm=segmenter.working_spacing_mm)
        aligned = resample_onto(portal, arterial, registration.transform)
        registered = time.perf_counter()
        masks = segmenter.segment(arterial, aligned)
        _sync(segmenter.device)
        segmented = time.perf_counter()
        found = measure(masks.tumor, masks.loat, phantom.spacing_mm)
        truth = phantom.truth
        rows.append(
            {
                "dice_tumor": dice(masks.tumor, phantom.masks["tumor"]),
                "dice_loat": dice(masks.loat, phantom.masks["loat"]),
                "dice_liver": dice(masks.liver, phantom.masks["liver"]),
                # NaN for an older segmenter without these labels (the summary skips NaN).
                "dice_stomach": _organ_dice(masks.stomach, phantom.masks["stomach"]),
                "dice_aorta": _organ_dice(masks.aorta, phantom.masks["aorta"]),
                "uncertainty": float("nan") if masks.uncertainty is None else masks.uncertainty,
                "diameter_error": _relative_error(found.max_diameter_mm, truth.max_diameter_mm),
                "loat_area_error": _relative_error(
                    found.loat_max_area_cm2, truth.loat_max_area_cm2
                ),
                "components": float(masks.tumor_components),
                "register_s": registered - started,
                "segment_s": segmented - registered,
            }
        )
        row = rows[-1]
        print(
            f"  study {index + 1:2d}: Dice tumor {row['dice_tumor']:.3f} LOAT "
            f"{row['dice_loat']:.3f} liver {row['dice_liver']:.3f}; diameter "
            f"{found.max_diameter_mm:.1f}/{truth.max_diameter_mm:.1f} mm, LOAT area "
            f"{found.loat_max_area_cm2:.2f}/{truth.loat_max_area_cm2:.2f} cm²; "
            f"components {masks.tumor_components}; register {row['register_s']:.2f} s, "
            f"segment {row['segment_s']:.2f} s",
            flush=True,
        )
    return rows


def _summary(rows: list[dict[str, float]]) -> None:
    goals = {
        "dice_tumor": ("≥", 0.85),
        "dice_loat": ("≥", 0.80),
        "dice_liver": ("", None),
        "dice_stomach": ("", None),
        "dice_aorta": ("", None),
        "uncertainty": ("", None),
        "diameter_error": ("≤", 0.10),
        "loat_area_error": ("≤", 0.15),
        "register_s": ("", None),
        "segment_s": ("", None),
    }
    print(f"{'figure':<16} {'mean':>8} {'median':>8} {'worst':>8}  goal (on the mean)")
    for key, (sense, goal) in goals.items():
        values = [r[key] for r in rows if np.isfinite(r[key])]
        if not values:
            continue
        mean = statistics.fmean(values)
        worst = min(values) if key.startswith("dice") else max(values)
        verdict = ""
        if goal is not None:
            met = mean >= goal if sense == "≥" else mean <= goal
            verdict = f"{sense} {goal:g}: {'met' if met else 'NOT met'}"
        print(f"{key:<16} {mean:8.3f} {statistics.median(values):8.3f} {worst:8.3f}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Evaluate this checkpoint (no training).")
    parser.add_argument("--iterations", type=int, default=3000, help="Training budget.")
    parser.add_argument("--phantoms", type=int, default=16, help="Training phantoms.")
    parser.add_argument("--seed", type=int, default=0, help="Training cohort seed.")
    parser.add_argument("--spacing", type=float, default=2.0, help="Working spacing (mm).")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--patch", default="64,64,32", help="Training patch x,y,z (voxels).")
    parser.add_argument("--test", type=int, default=6, help="Held-out phantom studies.")
    parser.add_argument("--test-seed", type=int, default=9001, help="Held-out cohort seed.")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--save", type=Path, help="Keep the trained checkpoint here.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        print(f"device: {device} ({torch.cuda.get_device_name(device)})")
    else:
        print(f"device: {device} ({torch.get_num_threads()} threads)")

    with tempfile.TemporaryDirectory(prefix="mvi-bench-seg-") as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = args.save or Path(tmp) / "segmenter"
            started = time.perf_counter()
            samples = training_samples(args.phantoms, args.seed, args.spacing)
            loaded = time.perf_counter()
            card = train_segmenter(
                samples,
                model_dir,
                spacing_mm=args.spacing,
                patch=[int(v) for v in args.patch.split(",")],
                iterations=args.iterations,
                batch_size=args.batch_size,
                seed=args.seed,
                device=str(device),
                demo=True,
            )
            print(
                f"trained: {args.phantoms} phantoms (rendered and registered in "
                f"{loaded - started:.1f} s), {args.iterations} iterations of batch "
                f"{args.batch_size} in {card['training']['seconds']:.1f} s on {device}"
            )
        segmenter = UNetSegmenter.from_checkpoint(model_dir, device=str(device))
        print(f"model: {segmenter.card['name']} trained {segmenter.card['training']}")
        # One untimed run: CUDA context, cuDNN autotuning, allocator warm-up.
        warm_ap, warm_pv, _ = _phantom_pair(study_seed(args.test_seed, 999), 96, 24)
        segmenter.segment(warm_ap, warm_pv)

        print(f"held-out phantoms (cohort seed {args.test_seed}) at 256×256×64:")
        rows = evaluate(segmenter, args.test, args.test_seed, 256, 64)
        _summary(rows)

        if args.large:
            arterial, portal, _ = _phantom_pair(study_seed(args.test_seed, 0), 512, 200)
            started = time.perf_counter()
            registration = register(
                arterial, portal, working_spacing_mm=segmenter.working_spacing_mm
            )
            aligned = resample_onto(portal, arterial, registration.transform)
            registered = time.perf_counter()
            masks = segmenter.segment(arterial, aligned)
            _sync(segmenter.device)
            segmented = time.perf_counter()
            print(
                f"512×512×200: register {registered - started:.2f} s, segment "
                f"{segmented - registered:.2f} s on {device} (tumor voxels "
                f"{int(masks.tumor.sum())}, labels {sorted(LABELS)})"
            )
            del arterial, portal, aligned, masks


if __name__ == "__main__":
    main()
