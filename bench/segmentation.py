"""Segmenter figures on held-out phantoms, in distribution and shifted, for two training budgets.

Two segmenters:

* **demo**: the one ``make demo`` uses (``mvi-node train-seg --phantoms 48``, domain-randomised,
  6,000 iterations): the shipped ``model/weights/demo_segmenter`` while it matches the code, else
  taken from the demo model cache or built into it exactly as the demo does;
* **bench**: the benchmark's own larger budget (``--phantoms``, ``--iterations``), trained here
  on domain-randomised phantoms of cohort seed ``--seed`` (or ``--model DIR``).

Each segments held-out cohorts (other cohort seeds, never a training patient), each study
registered as the pipeline does:

* ``standard``: the phantoms the MVI model and the demo study use;
* ``randomised``: in distribution, drawn from the training ranges (:mod:`model.domain`);
* ``shifted``: HU, noise, slice spacing and organ positions at least 20 % of their range beyond
  the training ranges, and another anatomy arrangement (evaluation only).

Per cohort: mean Dice of tumour, LOAT, liver and stomach on the arterial grid; median and 90th
percentile of the relative error of the maximum axial tumour diameter and of the LOAT maximum
axial area (:func:`model.measure.measure`, against the phantom's truth); the most tumour
components in a study, and how many studies have more than 3 (the truth has one); how many
tumours are segmented poorly (Dice below 0.70 or the diameter more than 15 % off) and how many of
those the node tells the reader about instead of sending their figures (no tumour found, or the
tumour's own uncertainty over the card's limit, as the segmentation gate checks), and how many
good ones it holds back that way. Then seconds
of segmentation per study at 256×256×64 and 512×512×200 (standard phantoms, registration
excluded). Last, a Markdown table for the README.

Goals of the issue on the shifted cohort for the demo segmenter: Dice tumour ≥ 0.80, LOAT ≥ 0.70,
diameter error median ≤ 10 %, LOAT area error median ≤ 20 %, no study with more than 3 tumour
components.

Usage: python bench/segmentation.py [--iterations 6000] [--phantoms 64] [--model DIR]
       [--demo-model DIR] [--test 24] [--device auto|cpu|cuda] [--large/--no-large]
       [--cohorts standard,randomised,shifted] [--save DIR] [--no-bench]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from model.checkpoint import is_checkpoint_dir
from model.domain import DomainKind, training_domain
from model.measure import measure
from model.phantom import PhantomSpec, PhantomStudy, make_study
from model.registration import register, resample_onto
from model.segmentation import (
    UNetSegmenter,
    dice,
    labels_from_masks,
    resolve_device,
    tumor_uncertainty_limit_of,
)
from model.train_seg import TrainingSample, train_segmenter

#: Smallest tumour component counted (ml): the default of ``[gates] min_component_ml``.
MIN_COMPONENT_ML = 0.1

#: A tumour segmented poorly enough that its figures should not be sent: Dice below this…
POOR_DICE = 0.70
#: …or its maximum diameter off by more than this fraction.
POOR_DIAMETER_ERROR = 0.15

#: Cohort seed of each held-out cohort: none is a training cohort (seed 0).
COHORT_SEEDS: dict[str, int] = {"standard": 9001, "randomised": 9101, "shifted": 9201}


def study_seed(cohort_seed: int, index: int) -> int:
    """Seed of study ``index`` of a cohort, as :func:`node.offline.phantom_study.study_seed`."""
    return int(np.random.SeedSequence([cohort_seed, index]).generate_state(1)[0])


def _image(volume: np.ndarray, study: PhantomStudy) -> Any:
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing([float(v) for v in study.spacing_mm])
    image.SetOrigin([float(v) for v in study.origin_mm])
    return image


def _relative_error(value: float, truth: float) -> float:
    return abs(value - truth) / truth if truth > 0 else float("nan")


def _phantom_pair(
    seed: int, size: int, slices: int, domain: str = "standard"
) -> tuple[Any, Any, PhantomStudy]:
    """Arterial image, portal-venous image (unregistered), and the phantom."""
    phantom = make_study(
        seed,
        PhantomSpec(
            size=size,
            slices=slices,
            phases=("arterial", "portal_venous"),
            domain=DomainKind(domain),
        ),
    )
    arterial = _image(phantom.phases["arterial"].hu, phantom)
    portal = _image(phantom.phases["portal_venous"].hu, phantom)
    return arterial, portal, phantom


def training_samples(count: int, cohort_seed: int, spacing_mm: float) -> list[TrainingSample]:
    """Domain-randomised phantoms (every third standard, :func:`model.domain.training_domain`),
    registered as ``mvi-node train-seg --phantoms`` prepares them."""
    samples = []
    for index in range(count):
        arterial, portal, phantom = _phantom_pair(
            study_seed(cohort_seed, index), 256, 64, training_domain(index)
        )
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(
    segmenter: UNetSegmenter, count: int, cohort: str, verbose: bool = True
) -> list[dict[str, float]]:
    """Segment ``count`` held-out phantoms of ``cohort``; one row of figures per study."""
    rows = []
    tumor_limit = tumor_uncertainty_limit_of(segmenter.card)
    for index in range(count):
        arterial, portal, phantom = _phantom_pair(
            study_seed(COHORT_SEEDS[cohort], index), 256, 64, cohort
        )
        registration = register(arterial, portal, working_spacing_mm=segmenter.working_spacing_mm)
        aligned = resample_onto(portal, arterial, registration.transform)
        started = time.perf_counter()
        masks = segmenter.segment(arterial, aligned)
        _sync(segmenter.device)
        seconds = time.perf_counter() - started
        found = measure(masks.tumor, masks.loat, phantom.spacing_mm)
        truth = phantom.truth
        stomach = masks.stomach
        voxel_ml = float(np.prod(phantom.spacing_mm)) / 1000.0
        tumor_uncertainty = (
            float("nan") if masks.tumor_uncertainty is None else masks.tumor_uncertainty
        )
        # What the node tells the reader instead of sending the figures: no tumour found, or
        # (the segmentation gate's check) a tumour more uncertain than the card's limit.
        told = not masks.tumor.any() or (
            tumor_limit is not None and tumor_uncertainty > tumor_limit
        )
        rows.append(
            {
                "dice_tumor": dice(masks.tumor, phantom.masks["tumor"]),
                "dice_loat": dice(masks.loat, phantom.masks["loat"]),
                "dice_liver": dice(masks.liver, phantom.masks["liver"]),
                "dice_stomach": float("nan")
                if stomach is None
                else dice(stomach, phantom.masks["stomach"]),
                "diameter_error": _relative_error(found.max_diameter_mm, truth.max_diameter_mm),
                "loat_area_error": _relative_error(
                    found.loat_max_area_cm2, truth.loat_max_area_cm2
                ),
                # Components of at least 0.1 ml, as the segmentation gate counts them (a
                # one-voxel speck is not a second lesion a reader would see).
                "components": float(
                    sum(n * voxel_ml >= MIN_COMPONENT_ML for n in masks.tumor_component_voxels)
                ),
                "segment_s": seconds,
                "tumor_uncertainty": tumor_uncertainty,
                "told": float(told),
            }
        )
        if verbose:
            row = rows[-1]
            print(
                f"    {cohort} {index + 1:2d} ({arterial.GetSize()[2]} slices of "
                f"{phantom.spacing_mm[2]:.1f} mm): Dice tumor {row['dice_tumor']:.3f} LOAT "
                f"{row['dice_loat']:.3f} liver {row['dice_liver']:.3f} stomach "
                f"{row['dice_stomach']:.3f}; diameter {found.max_diameter_mm:.1f}/"
                f"{truth.max_diameter_mm:.1f} mm, LOAT area {found.loat_max_area_cm2:.2f}/"
                f"{truth.loat_max_area_cm2:.2f} cm²; components {masks.tumor_components}; "
                f"tumor uncertainty {row['tumor_uncertainty']:.3f}" + (" (told)" if told else ""),
                flush=True,
            )
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """Means of the Dice, median and p90 of the errors, component counts, mean seconds."""

    def finite(key: str) -> np.ndarray:
        values = np.asarray([r[key] for r in rows], dtype=np.float64)
        return values[np.isfinite(values)]

    out: dict[str, float] = {}
    for key in ("dice_tumor", "dice_loat", "dice_liver", "dice_stomach"):
        values = finite(key)
        out[key] = float(values.mean()) if values.size else float("nan")
    for key in ("diameter_error", "loat_area_error"):
        values = finite(key)
        out[f"{key}_median"] = float(np.median(values)) if values.size else float("nan")
        out[f"{key}_p90"] = float(np.percentile(values, 90)) if values.size else float("nan")
    components = finite("components")
    out["components_max"] = float(components.max())
    out["studies_over_3_components"] = float(np.count_nonzero(components > 3))
    poor = np.asarray(
        [
            r["dice_tumor"] < POOR_DICE or not r["diameter_error"] <= POOR_DIAMETER_ERROR
            for r in rows
        ]
    )
    told = np.asarray([r["told"] > 0 for r in rows])
    out["poor"] = float(np.count_nonzero(poor))
    out["poor_told"] = float(np.count_nonzero(poor & told))
    out["good_told"] = float(np.count_nonzero(~poor & told))
    out["segment_s"] = float(finite("segment_s").mean())
    out["studies"] = float(len(rows))
    return out


def _speed(segmenter: UNetSegmenter, size: int, slices: int) -> float:
    arterial, portal, _ = _phantom_pair(study_seed(COHORT_SEEDS["standard"], 0), size, slices)
    registration = register(arterial, portal, working_spacing_mm=segmenter.working_spacing_mm)
    aligned = resample_onto(portal, arterial, registration.transform)
    started = time.perf_counter()
    segmenter.segment(arterial, aligned)
    _sync(segmenter.device)
    return time.perf_counter() - started


def demo_segmenter_dir() -> Path:
    """The segmenter ``make demo`` uses, built into the demo cache as the demo builds it."""
    from rich.console import Console

    from node.analysis.models import demo_segmenter_dir as cached
    from node.offline.train_seg import DEMO_PHANTOMS, TrainSegOptions, run

    directory = cached()
    if not is_checkpoint_dir(directory):
        print("building the demo segmenter as make demo does…", flush=True)
        run(TrainSegOptions(phantoms=DEMO_PHANTOMS), out=Console(quiet=True), err=Console())
    return directory


def _pct(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{100 * value:.1f} %"


def _num(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="Bench segmenter to evaluate (no training).")
    parser.add_argument(
        "--demo-model", type=Path, help="Demo segmenter (default: the shipped one or the cache)."
    )
    parser.add_argument("--iterations", type=int, default=6000, help="Bench training budget.")
    parser.add_argument("--phantoms", type=int, default=64, help="Bench training phantoms.")
    parser.add_argument("--seed", type=int, default=0, help="Training cohort seed.")
    parser.add_argument("--spacing", type=float, default=2.0, help="Working spacing (mm).")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--test",
        type=int,
        default=24,
        help="Held-out studies per cohort (8 were too few to judge a goal by).",
    )
    parser.add_argument("--cohorts", default="standard,randomised,shifted")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--save", type=Path, help="Keep the bench checkpoint here.")
    parser.add_argument("--quiet", action="store_true", help="No per-study lines.")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda":
        print(f"device: {device} ({torch.cuda.get_device_name(device)})")
    else:
        print(f"device: {device} ({torch.get_num_threads()} threads)")
    cohorts = [c for c in args.cohorts.split(",") if c]

    with tempfile.TemporaryDirectory(prefix="mvi-bench-seg-") as tmp:
        models: dict[str, Path] = {"demo": args.demo_model or demo_segmenter_dir()}
        if args.bench:
            bench_dir = args.model
            if bench_dir is None:
                bench_dir = args.save or Path(tmp) / "segmenter"
                started = time.perf_counter()
                samples = training_samples(args.phantoms, args.seed, args.spacing)
                loaded = time.perf_counter()
                card = train_segmenter(
                    samples,
                    bench_dir,
                    spacing_mm=args.spacing,
                    iterations=args.iterations,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    device=str(device),
                    demo=True,
                    card_extra={"training_data": {"domain": "randomised"}},
                )
                print(
                    f"bench segmenter: {args.phantoms} randomised phantoms (rendered and "
                    f"registered in {loaded - started:.1f} s), {args.iterations} iterations of "
                    f"batch {args.batch_size} in {card['training']['seconds']:.1f} s on {device}",
                    flush=True,
                )
            models["bench"] = bench_dir

        results: dict[tuple[str, str], dict[str, float]] = {}
        speed: dict[str, tuple[float, float]] = {}
        for name, directory in models.items():
            segmenter = UNetSegmenter.from_checkpoint(directory, device=str(device))
            training = segmenter.card.get("training", {})
            source = segmenter.card.get("training_data", {})
            print(
                f"{name}: {segmenter.card['name']}, {training.get('studies')} studies "
                f"({source.get('domain', 'standard')}), {training.get('iterations')} iterations",
                flush=True,
            )
            warm_ap, warm_pv, _ = _phantom_pair(999, 96, 24)
            segmenter.segment(warm_ap, warm_pv)  # CUDA context, allocator warm-up
            for cohort in cohorts:
                rows = evaluate(segmenter, args.test, cohort, verbose=not args.quiet)
                results[name, cohort] = summary = summarise(rows)
                print(
                    f"  {cohort}: Dice tumor {_num(summary['dice_tumor'])} LOAT "
                    f"{_num(summary['dice_loat'])} liver {_num(summary['dice_liver'])} stomach "
                    f"{_num(summary['dice_stomach'])}; diameter error median "
                    f"{_pct(summary['diameter_error_median'])} p90 "
                    f"{_pct(summary['diameter_error_p90'])}; LOAT area error median "
                    f"{_pct(summary['loat_area_error_median'])} p90 "
                    f"{_pct(summary['loat_area_error_p90'])}; components max "
                    f"{summary['components_max']:.0f} (>3 in "
                    f"{summary['studies_over_3_components']:.0f} of {summary['studies']:.0f}); "
                    f"poor tumours {summary['poor']:.0f}, told {summary['poor_told']:.0f}; "
                    f"good ones told {summary['good_told']:.0f}",
                    flush=True,
                )
            small = _speed(segmenter, 256, 64)
            large = _speed(segmenter, 512, 200) if args.large else float("nan")
            speed[name] = (small, large)
            print(f"  seconds per study: 256×256×64 {small:.2f}, 512×512×200 {large:.2f}")
            del segmenter

    print()
    print(
        "| segmenter | cohort | Dice tumor | LOAT | liver | stomach | diameter error median / p90 "
        "| LOAT area error median / p90 | studies > 3 components | poor tumours: told "
        "| good tumours told |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, cohort), s in results.items():
        print(
            f"| {name} | {cohort} | {_num(s['dice_tumor'])} | {_num(s['dice_loat'])} | "
            f"{_num(s['dice_liver'])} | {_num(s['dice_stomach'])} | "
            f"{_pct(s['diameter_error_median'])} / {_pct(s['diameter_error_p90'])} | "
            f"{_pct(s['loat_area_error_median'])} / {_pct(s['loat_area_error_p90'])} | "
            f"{s['studies_over_3_components']:.0f} of {s['studies']:.0f} | "
            f"{s['poor_told']:.0f} of {s['poor']:.0f} | "
            f"{s['good_told']:.0f} of {s['studies'] - s['poor']:.0f} |"
        )
    for name, (small, large) in speed.items():
        print(
            f"{name}: {small:.2f} s per 256×256×64 study, {large:.2f} s per 512×512×200 ({device})"
        )
    demo = results.get(("demo", "shifted"))
    if demo is not None:
        goals = [
            ("Dice tumor ≥ 0.80", demo["dice_tumor"] >= 0.80),
            ("Dice LOAT ≥ 0.70", demo["dice_loat"] >= 0.70),
            ("diameter error median ≤ 10 %", demo["diameter_error_median"] <= 0.10),
            ("LOAT area error median ≤ 20 %", demo["loat_area_error_median"] <= 0.20),
            ("no study > 3 components", demo["studies_over_3_components"] == 0),
        ]
        print(
            "demo segmenter on the shifted cohort: "
            + "; ".join(f"{goal} {'met' if met else 'NOT met'}" for goal, met in goals)
        )


if __name__ == "__main__":
    main()
