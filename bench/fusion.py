"""MVI fusion model figures on a held-out multi-centre phantom cohort: AUC with CIs, DeLong tests.

The phantom (:mod:`model.phantom`, version 2) tells the method's story: the MVI label depends on
tumour aggressiveness (seen in the arterial phase, and only loosely in the tumour's size), the
LOAT, and a washout/capsule latent seen only in the portal-venous phase. The cohorts
(:func:`model.cohort.make_cohort`) come from three centres (:data:`model.site.SITES`: noise,
kernel, HU offset and case mix differ) and a share of the training patients have a repeat study.

Trains, with :func:`model.train.train_fusion` grouped by patient, the dual-branch fusion model and
the tumour-only model for each branch layout (``--layout region phase phase-tiled``: branches
tumour/LOAT, or arterial/portal-venous with the tumour and fat crops stacked as channels or side
by side) on ``--train`` patients of cohort ``--seed`` (ROIs cut from the truth
masks, the portal-venous phase aligned with the phantom's known breathing shift, cached as npz),
and with ``--loco`` also the first layout's fusion model leave-one-centre-out. It then scores
``--test`` new patients (one study each) of cohort ``--test-seed`` and prints, held out:

* the AUC with DeLong 95 % CI of each model, of the clinical model (the training card's logistic
  model of maximum diameter and LOAT area) and of each combined model (DL logit + the clinical
  predictors selected on the training cohort);
* paired DeLong tests of fusion against tumour-only, the clinical model and the combined model;
* sensitivity, specificity and Brier at the shipped threshold beside the card's promise;
* per-centre AUCs; for LOCO, each centre's out-of-centre AUC (its epoch chosen on that centre:
  mildly optimistic) and the LOCO ensemble's held-out AUC;
* training seconds, inference latency (batch 1, median) and throughput at batch 32.

Goal of the issue: fusion above tumour-only and above the clinical model, DeLong p < 0.05, on at
least 300 held-out studies. The label model caps the AUC near 0.90 (all latents), 0.84 (the
tumour's), 0.74 (diameter + LOAT area).

Time: the default run (200 training patients, 244 studies; 300 held out; ROI 64; 5 folds; three
layouts; LOCO) took 1,652 s on two CPU threads with nothing else running (ROIs cached; rendering
them cold adds about 50 s), and about an hour on one thread beside other work.
``--quick`` (100 patients, 300 held out, ROI 32, region layout, 12 epochs, no LOCO) about 3
(152 s beside a test run).

Usage: python bench/fusion.py [--quick] [--train 200] [--test 300] [--sites 3] [--repeat-share 0.2]
       [--roi-size 64] [--crop box|square|fixed] [--field-mm 100] [--augment light|strong]
       [--size-target 0]
       [--epochs 20] [--folds 5] [--layout region phase phase-tiled] [--loco | --no-loco]
       [--device auto|cpu|cuda] [--cache DIR] [--save DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.cohort import make_cohort
from model.inference import FusionModel
from model.phantom import PhantomSpec
from model.roi import RoiSpec
from model.segmentation import resolve_device
from model.site import SITES
from model.stats import brier, delong_ci, delong_test, logistic_predict, sens_spec_acc
from model.train import StudyRois, cohort_rois, train_fusion

# Only model.* is imported: the benchmark runs wherever torch and SimpleITK do (a GPU machine
# without the node's DICOM and service dependencies included).


def _rois(samples: list[StudyRois]) -> list[dict[str, Any]]:
    return [{"tumor": s.tumor, "loat": s.loat} for s in samples]


def _timings(model: FusionModel, samples: list[StudyRois], repeats: int) -> dict[str, float]:
    """Median seconds per study at batch 1, and studies per second at batch 32."""
    rois = _rois(samples)
    model.predict(rois[:2])  # warm-up: kernels, allocator
    single = []
    for index in range(min(repeats, len(rois))):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.predict(rois[index : index + 1])
        single.append(time.perf_counter() - started)
    batch = (rois * (1 + 64 // max(len(rois), 1)))[:64]
    model.predict(batch[:32], batch_size=32)
    started = time.perf_counter()
    model.predict(batch, batch_size=32)
    elapsed = time.perf_counter() - started
    return {"latency_s": statistics.median(single), "throughput_per_s": len(batch) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smaller check (see above)")
    parser.add_argument("--train", type=int, default=200, help="training patients")
    parser.add_argument("--test", type=int, default=300, help="held-out patients (one study)")
    parser.add_argument("--sites", type=int, default=3, choices=(1, 2, 3), help="centres")
    parser.add_argument("--repeat-share", type=float, default=0.2, help="training repeats")
    parser.add_argument("--loco", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=2025, help="training cohort seed")
    parser.add_argument("--test-seed", type=int, default=9025, help="held-out cohort seed")
    parser.add_argument("--phantom-size", type=int, default=128)
    parser.add_argument("--phantom-slices", type=int, default=32)
    parser.add_argument("--roi-size", type=int, default=64)
    parser.add_argument("--crop", default="box", choices=("box", "square", "fixed"))
    parser.add_argument("--field-mm", type=float, default=100.0, help="the fixed crop's side")
    parser.add_argument("--augment", default="light", choices=("light", "strong"))
    parser.add_argument("--size-target", type=float, default=0.0, help="auxiliary size loss")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--train-seed", type=int, default=0, help="seed of train_fusion")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", nargs="+", default=["fusion", "tumor-only"])
    parser.add_argument(
        "--layout",
        nargs="+",
        default=["region", "phase", "phase-tiled"],
        help="branch layouts to train",
    )
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mvi-bench")
    parser.add_argument("--save", type=Path, default=None, help="keep the checkpoints here")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--repeats", type=int, default=20, help="batch-1 timings")
    parser.add_argument("--verbose", action="store_true", help="print every epoch")
    args = parser.parse_args()
    if args.quick:
        args.train, args.roi_size, args.epochs = 100, 32, 12
        args.layout, args.loco = ["region"], False
        args.lr = 1e-3

    device = resolve_device(args.device)
    spec_phantom = PhantomSpec(size=args.phantom_size, slices=args.phantom_slices)
    roi_spec = RoiSpec(size=args.roi_size, crop=args.crop, field_mm=args.field_mm)
    sites = SITES[: args.sites]
    started = time.perf_counter()
    train_cohort = make_cohort(args.seed, args.train, sites=sites, repeat_share=args.repeat_share)
    train = cohort_rois(train_cohort, spec_phantom, roi_spec, args.cache, register_pv=False)
    test_cohort = make_cohort(args.test_seed, args.test, sites=sites, repeat_share=0.0)
    test = cohort_rois(test_cohort, spec_phantom, roi_spec, args.cache, register_pv=False)
    y_test = np.asarray([s.label for s in test])
    centres = sorted({s.centre for s in test})
    print(
        f"ROIs: {len(train)} train studies of {args.train} patients "
        f"({sum(s.label for s in train)} MVI, {len(train) - args.train} repeat studies), "
        f"{len(test)} test ({int(y_test.sum())} MVI); centres "
        + ", ".join(
            f"{c} (train {sum(s.centre == c for s in train)}, MVI "
            f"{np.mean([s.label for s in train if s.centre == c]):.2f})"
            for c in centres
        )
        + f"; phantom {args.phantom_size}×{args.phantom_size}×"
        f"{args.phantom_slices}, ROI {roi_spec.channels}×{args.roi_size}×{args.roi_size} "
        f"({args.crop} crop{f' {args.field_mm:g} mm' if args.crop == 'fixed' else ''}), "
        f"{time.perf_counter() - started:.1f} s; device {device}, torch threads "
        f"{torch.get_num_threads()}"
    )

    def progress(stage: str, epoch: int, epochs: int, loss: float, val: float | None) -> None:
        if args.verbose:
            shown = "" if val is None else f" val AUC {val:.3f}"
            print(f"  {stage} epoch {epoch}/{epochs} loss {loss:.4f}{shown}", flush=True)

    figures: dict[str, Any] = {
        "device": str(device),
        "train": len(train),
        "train_patients": args.train,
        "test": len(test),
        "centres": centres,
    }
    scores: dict[str, np.ndarray] = {}
    save_root = args.save or Path(tempfile.mkdtemp(prefix="mvi-bench-models-"))
    # Phase-tiled's tumour-only network is the phase layout's: trained once when both run.
    comparator = {"phase-tiled": "phase"} if "phase" in args.layout else {}
    runs = [
        (lo, ar, "kfold")
        for lo in args.layout
        for ar in args.arch
        if not (ar == "tumor-only" and lo in comparator)
    ]
    if args.loco and "fusion" in args.arch and args.sites > 1:
        runs.append((args.layout[0], "fusion", "loco"))
    for layout, arch, cv in runs:
        key = f"{arch}/{layout}" + ("/loco" if cv == "loco" else "")
        out = save_root / key.replace("/", "-")
        begun = time.perf_counter()
        try:
            card = train_fusion(
                train,
                out,
                roi_spec=roi_spec,
                arch=arch,
                layout=layout,
                cv=cv,
                group_by="centre" if cv == "loco" else "patient",
                folds=args.folds,
                epochs=args.epochs,
                patience=args.patience,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.train_seed,
                augment=args.augment,
                size_target=args.size_target,
                device=str(device),
                demo=True,
                progress=progress,
            )
        except ValueError as exc:  # e.g. Platt refusing an uninformative run
            figures[key] = {"error": str(exc)}
            print(f"{key:>17}: training failed: {exc}", flush=True)
            continue
        seconds = time.perf_counter() - begun
        model = FusionModel.load(out, device=str(device))
        predictions = model.predict(
            _rois(test),
            max_diameter_mm=[s.diameter_mm for s in test],
            loat_area_cm2=[s.loat_area_cm2 for s in test],
        )
        p = np.asarray([q.mvi_probability for q in predictions])
        scores[key] = p
        if "clinical" not in scores and "error" not in card["clinical_model"]:
            # The clinical model as the training cohort fits it (the same in every card).
            clinical = card["clinical_model"]
            scores["clinical"] = np.asarray(
                [
                    logistic_predict(
                        clinical,
                        {"max_diameter_mm": s.diameter_mm, "loat_area_cm2": s.loat_area_cm2},
                    )
                    for s in test
                ]
            )
            c_auc, c_low, c_high = delong_ci(y_test, scores["clinical"])
            figures["clinical"] = {"test_auc": c_auc, "test_ci95": [c_low, c_high]}
            print(
                f"{'clinical':>17}: held-out AUC {c_auc:.3f} (95% CI {c_low:.3f}-{c_high:.3f}) "
                f"(logistic: maximum diameter + LOAT area, fitted on the training cohort)"
            )
        value, low, high = delong_ci(y_test, p)
        entry: dict[str, Any] = {
            "test_auc": value,
            "test_ci95": [low, high],
            "oof_auc": card["oof_metrics"]["auc"],
            "oof_ci95": card["oof_metrics"]["ci95"],
            "best_epochs": [f["best_epoch"] for f in card["training"]["folds_detail"]],
            "train_seconds": seconds,
            "threshold": card["threshold"],
        }
        # The shipped threshold on the held-out cohort beside the card's promise.
        sensitivity, specificity, _ = sens_spec_acc(y_test, p, model.threshold)
        entry["test_at_threshold"] = {
            "sensitivity": sensitivity,
            "specificity": specificity,
            "brier": brier(y_test, p),
        }
        entry["card_at_threshold"] = {
            k: card["oof_metrics"][k] for k in ("sensitivity", "specificity", "brier")
        }
        entry["test_auc_by_centre"] = {
            c: delong_ci(y_test[mask], p[mask])[0]
            for c in centres
            if (mask := np.asarray([s.centre == c for s in test])).any()
            and 0 < y_test[mask].sum() < mask.sum()
        }
        if cv == "loco":
            entry["out_of_centre_auc"] = {
                f["centre"]: f["val_auc"] for f in card["training"]["folds_detail"]
            }
        combined = [q.combined_probability for q in predictions]
        if all(c is not None for c in combined):
            scores[f"combined:{key}"] = np.asarray(combined, dtype=np.float64)
            c_auc, c_low, c_high = delong_ci(y_test, scores[f"combined:{key}"])
            entry["test_auc_combined"] = c_auc
            entry["test_ci95_combined"] = [c_low, c_high]
            entry["combined_model"] = {
                k: card["combined_model"][k] for k in ("odds_ratios", "ci", "p_values")
            }
            if "threshold" in card["combined_model"]:
                c_sens, c_spec, _ = sens_spec_acc(
                    y_test, scores[f"combined:{key}"], card["combined_model"]["threshold"]
                )
                entry["combined_at_threshold"] = {"sensitivity": c_sens, "specificity": c_spec}
        entry.update(_timings(model, test, args.repeats))
        figures[key] = entry
        print(
            f"{key:>17}: held-out AUC {value:.3f} (95% CI {low:.3f}-{high:.3f}); OOF AUC "
            f"{entry['oof_auc']:.3f} {entry['oof_ci95']}; fold best epochs {entry['best_epochs']}; "
            f"training {seconds:.0f} s; latency "
            f"{entry['latency_s'] * 1000:.1f} ms/study; throughput "
            f"{entry['throughput_per_s']:.1f} studies/s at batch 32",
            flush=True,
        )
        held, promised = entry["test_at_threshold"], entry["card_at_threshold"]
        print(
            f"{'':>17}  at the shipped threshold {model.threshold:.3f}: held-out sensitivity "
            f"{held['sensitivity']:.2f} / specificity {held['specificity']:.2f} / Brier "
            f"{held['brier']:.3f}; card {promised['sensitivity']:.2f} / "
            f"{promised['specificity']:.2f} / {promised['brier']:.3f}",
            flush=True,
        )
        print(
            f"{'':>17}  held-out AUC by centre: "
            + ", ".join(f"{c} {v:.3f}" for c, v in entry["test_auc_by_centre"].items())
        )
        if "out_of_centre_auc" in entry:
            print(
                f"{'':>17}  leave-one-centre-out AUC (each centre scored by the member that did "
                "not train on it): "
                + ", ".join(f"{c} {v:.3f}" for c, v in entry["out_of_centre_auc"].items())
            )
        if "test_auc_combined" in entry:
            c_low, c_high = entry["test_ci95_combined"]
            print(
                f"{'':>17}  combined (DL logit + selected clinical predictors) held-out AUC "
                f"{entry['test_auc_combined']:.3f} ({c_low:.3f}-{c_high:.3f}); OOF odds ratios "
                + ", ".join(
                    f"{k} {v:.3g} (p {entry['combined_model']['p_values'][k]:.2g})"
                    for k, v in entry["combined_model"]["odds_ratios"].items()
                )
            )
        if "combined_at_threshold" in entry:
            at, own = entry["combined_at_threshold"], card["combined_model"]
            print(
                f"{'':>17}  combined at its own threshold {own['threshold']:.3f}: held-out "
                f"sensitivity {at['sensitivity']:.2f} / specificity {at['specificity']:.2f}; card "
                f"{own['sensitivity']:.2f} / {own['specificity']:.2f} (optimism-corrected "
                f"{own['optimism_corrected']['corrected']['sensitivity']:.2f} / "
                f"{own['optimism_corrected']['corrected']['specificity']:.2f})",
                flush=True,
            )
    goals: list[bool] = []
    for layout in args.layout:
        fusion = f"fusion/{layout}"
        if fusion not in scores:
            continue
        for other, name in (
            (f"tumor-only/{comparator.get(layout, layout)}", "tumour-only"),
            ("clinical", "clinical"),
            (f"combined:{fusion}", "combined"),
        ):
            if other not in scores:
                continue
            a1, a2, z, p_value = delong_test(y_test, scores[fusion], scores[other])
            figures[f"delong/{layout}/{name}"] = {"fusion": a1, name: a2, "z": z, "p": p_value}
            print(
                f"DeLong fusion vs {name} ({layout} layout): AUC {a1:.3f} vs {a2:.3f}, "
                f"z {z:.2f}, p {p_value:.4f}"
            )
            if name != "combined":
                goals.append(a1 > a2 and p_value < 0.05)
    if goals:
        met = all(goals) and len(test) >= 300
        print(
            "goal (fusion above tumour-only and the clinical model, DeLong p < 0.05, "
            f"≥ 300 held-out studies): {'met' if met else 'missed'} "
            f"({sum(goals)} of {len(goals)} comparisons, {len(test)} held out)"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
