"""`mvi-node audit`: survival and discrimination audit of exported results (synthetic cohorts)."""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import typer
from lifelines import CoxPHFitter
from lifelines.statistics import logrank_test
from typer.testing import CliRunner

from model.stats import brier, delong_ci
from node.core.pseudonym import keyed_hash
from node.report.audit import (
    RESULTS_COLUMNS,
    AuditInputError,
    AuditOptions,
    register,
    run_audit,
)

UID_ROOT = "1.2.826.0.1.3680043.8.498."
TRUE_HR = 2.5
BASE_RATE = 0.02  # events per month in the low-risk group
KEY = "audit-test-pseudonym-key-of-32-bytes-at-least"


# --------------------------------------------------------------------------------------------
# Synthetic cohort
# --------------------------------------------------------------------------------------------


def _write(path: Path, rows: Iterable[dict[str, Any]], columns: Iterable[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def make_results(n: int, seed: int, *, model_name: str = "mvi-fusion-resnet18") -> list[dict]:
    """``n`` scored studies as ``results export`` writes them (plain identifiers)."""
    rng = np.random.default_rng(seed)
    start = dt.date(2016, 1, 1)
    span = (dt.date(2023, 12, 31) - start).days
    probabilities = rng.beta(2.0, 2.0, n)
    rows = []
    for i in range(n):
        p = float(probabilities[i])
        diameter = abs(float(rng.normal(35 + 30 * p, 12))) + 5
        loat = float(rng.gamma(2.0, 2.0 + 3 * p))
        rows.append(
            {
                "study_instance_uid": f"{UID_ROOT}{1000 + i}",
                "study_date": (start + dt.timedelta(days=int(rng.integers(0, span)))).strftime(
                    "%Y%m%d"
                ),
                "accession_number": f"ACC{500000 + i}",
                "patient_id": f"PAT{10000 + i}",
                "mvi_probability": f"{p:.6f}",
                "combined_probability": f"{min(1.0, p * 1.1):.6f}",
                "risk_category": "high" if p > 0.5 else "low",
                "loat_max_area_cm2": f"{loat:.2f}",
                "tumor_max_diameter_mm": f"{diameter:.1f}",
                "tumor_volume_ml": f"{diameter**3 / 2000:.1f}",
                "model_name": model_name,
                "model_version": "1.0.0",
                "status": "scored",
            }
        )
    return rows


def not_scored_rows() -> list[dict]:
    """Rows a real export holds besides the scored ones; the audit must leave them out."""
    rows = []
    for i, status in enumerate(["failed", "failed", "no_tumor", "needs_review", "not_applicable"]):
        row = dict.fromkeys(RESULTS_COLUMNS, "")
        row.update(
            study_instance_uid=f"{UID_ROOT}{90000 + i}",
            study_date="20200101",
            accession_number=f"ACC{900000 + i}",
            patient_id=f"PAT{90000 + i}",
            model_name="mvi-fusion-resnet18",
            model_version="1.0.0",
            status=status,
        )
        rows.append(row)
    return rows


def make_followup(results: list[dict], seed: int, key: str = "study_instance_uid") -> list[dict]:
    """Exponential event times, hazard ``BASE_RATE * TRUE_HR`` when high risk; censored."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in results:
        rate = BASE_RATE * (TRUE_HR if row["risk_category"] == "high" else 1.0)
        event_time = rng.exponential(1.0 / rate)
        censor_time = rng.uniform(6.0, 72.0)  # staggered entry, administrative censoring
        rows.append(
            {
                key: row[key],
                "time": f"{min(event_time, censor_time):.4f}",
                "event": int(event_time <= censor_time),
                "age": f"{rng.normal(62, 9):.0f}",
                "afp_log": f"{rng.normal(3, 1.5):.3f}",
            }
        )
    return rows


FOLLOWUP_COLUMNS = ("time", "event", "age", "afp_log")


def make_pathology(results: list[dict], seed: int) -> list[dict]:
    """MVI drawn from the model's probability (so the model discriminates, imperfectly)."""
    rng = np.random.default_rng(seed)
    return [
        {
            "study_instance_uid": row["study_instance_uid"],
            "mvi": int(rng.random() < float(row["mvi_probability"])),
        }
        for row in results
    ]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """300 scored studies (plus 5 not scored), follow-up with 3 unknown keys, pathology."""
    folder = tmp_path_factory.mktemp("audit")
    scored = make_results(300, seed=11)
    followup = make_followup(scored, seed=12)
    extra = [
        {"study_instance_uid": f"{UID_ROOT}77700{i}", "time": "12", "event": 0, "age": "60"}
        for i in range(3)
    ]
    pathology = make_pathology(scored, seed=13)
    paths = {
        "results": _write(folder / "results.csv", scored + not_scored_rows(), RESULTS_COLUMNS),
        "followup": _write(
            folder / "followup.csv", followup + extra, ("study_instance_uid", *FOLLOWUP_COLUMNS)
        ),
        "pathology": _write(folder / "pathology.csv", pathology, ("study_instance_uid", "mvi")),
    }
    report = run_audit(
        paths["results"],
        paths["followup"],
        folder / "out",
        pathology_csv=paths["pathology"],
        options=AuditOptions(covariates=("age", "afp_log")),
    )
    return {
        "folder": folder,
        "paths": paths,
        "scored": scored,
        "followup": followup,
        "extra": extra,
        "pathology": pathology,
        "report": report,
        "out": folder / "out",
    }


def _frame(scored: list[dict], followup: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "T": [float(f["time"]) for f in followup],
            "E": [int(f["event"]) for f in followup],
            "high_risk": [int(r["risk_category"] == "high") for r in scored],
            "age": [float(f["age"]) for f in followup],
            "afp_log": [float(f["afp_log"]) for f in followup],
        }
    )


# --------------------------------------------------------------------------------------------
# Survival
# --------------------------------------------------------------------------------------------


def test_hazard_ratio_recovered_and_logrank_significant(cohort: dict[str, Any]) -> None:
    survival = cohort["report"]["survival"]
    cox = survival["cox"]
    assert survival["n"] == 300
    assert cox["ci_low"] < TRUE_HR < cox["ci_high"]
    assert survival["logrank"]["p"] < 0.01
    assert cox["p"] < 0.01
    assert survival["groups"]["high"]["n"] + survival["groups"]["low"]["n"] == 300
    assert set(cox["ph_test"]["terms"]) == {"high_risk"}
    assert isinstance(cox["ph_violation"], bool)
    # The continuous probability too: its hazard ratio, Harrell's C, time-dependent AUC.
    score = survival["score"]
    assert score["n"] == 300 and score["cox"]["hr"] > 1.0 and score["harrell_c"] > 0.5
    assert len(score["time_dependent_auc"]) == 3


def test_numbers_equal_lifelines_own_fit(cohort: dict[str, Any]) -> None:
    frame = _frame(cohort["scored"], cohort["followup"])
    cph = CoxPHFitter().fit(frame[["T", "E", "high_risk"]], duration_col="T", event_col="E")
    row = cph.summary.loc["high_risk"]
    cox = cohort["report"]["survival"]["cox"]
    assert cox["hr"] == pytest.approx(row["exp(coef)"], rel=1e-9)
    assert cox["ci_low"] == pytest.approx(row["exp(coef) lower 95%"], rel=1e-9)
    assert cox["ci_high"] == pytest.approx(row["exp(coef) upper 95%"], rel=1e-9)
    assert cox["p"] == pytest.approx(row["p"], rel=1e-9)

    high, low = frame[frame.high_risk == 1], frame[frame.high_risk == 0]
    test = logrank_test(high["T"], low["T"], high["E"], low["E"])
    logrank = cohort["report"]["survival"]["logrank"]
    assert logrank["p"] == pytest.approx(test.p_value, rel=1e-9)
    assert logrank["statistic"] == pytest.approx(test.test_statistic, rel=1e-9)

    adjusted_fit = CoxPHFitter().fit(frame, duration_col="T", event_col="E")
    adjusted = cohort["report"]["survival"]["cox_adjusted"]
    for term in ("high_risk", "age", "afp_log"):
        assert adjusted["terms"][term]["hr"] == pytest.approx(
            adjusted_fit.summary.loc[term, "exp(coef)"], rel=1e-9
        )
    assert set(adjusted["ph_test"]["terms"]) == {"high_risk", "age", "afp_log"}
    assert cohort["report"]["survival"]["events"] == int(frame["E"].sum())


def test_reports_written_with_embedded_plots(cohort: dict[str, Any]) -> None:
    out: Path = cohort["out"]
    text = (out / "report.html").read_text(encoding="utf-8")
    assert text.count('<img src="data:image/png;base64,') == 3  # KM, ROC, calibration
    assert "Kaplan–Meier" in text
    assert "not for clinical use" not in text
    for name in ("km.png", "roc.png", "calibration.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert on_disk == cohort["report"]
    assert set(on_disk["software"]) >= {"lifelines", "statsmodels"}
    assert on_disk["inputs"]["results"]["name"] == "results.csv"
    assert on_disk["inputs"]["results"]["rows"] == 305
    assert on_disk["options"]["time_unit"] == "months"


def test_exclusions_and_unmatched_keys_reported(cohort: dict[str, Any]) -> None:
    report = cohort["report"]
    assert report["results"]["scored"] == 300
    assert report["results"]["excluded"] == {
        "status failed": 2,
        "status needs_review": 1,
        "status no_tumor": 1,
        "status not_applicable": 1,
    }
    join = report["join"]
    assert join["matched"] == 300
    assert join["unmatched_followup_keys"] == [e["study_instance_uid"] for e in cohort["extra"]]
    assert join["unmatched_results_keys"] == []


# --------------------------------------------------------------------------------------------
# Discrimination
# --------------------------------------------------------------------------------------------


def test_discrimination_matches_delong_and_counts(cohort: dict[str, Any]) -> None:
    discrimination = cohort["report"]["discrimination"]
    y = np.array([row["mvi"] for row in cohort["pathology"]])
    p = np.array([float(row["mvi_probability"]) for row in cohort["scored"]])
    high = np.array([row["risk_category"] == "high" for row in cohort["scored"]])
    value, low, up = delong_ci(y, p)
    assert discrimination["auc"]["auc"] == pytest.approx(value, rel=1e-12)
    assert discrimination["auc"]["ci_low"] == pytest.approx(low, rel=1e-12)
    assert discrimination["auc"]["ci_high"] == pytest.approx(up, rel=1e-12)
    confusion = discrimination["confusion"]
    tp, fp = int((high & (y == 1)).sum()), int((high & (y == 0)).sum())
    fn, tn = int((~high & (y == 1)).sum()), int((~high & (y == 0)).sum())
    assert (confusion["tp"], confusion["fp"], confusion["fn"], confusion["tn"]) == (tp, fp, fn, tn)
    assert confusion["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert confusion["npv"] == pytest.approx(tn / (tn + fn))
    assert discrimination["brier"] == pytest.approx(brier(y, p))
    logistic = discrimination["logistic"]
    assert set(logistic["odds_ratios"]) == {
        "mvi_probability",
        "tumor_max_diameter_mm",
        "loat_max_area_cm2",
    }
    assert all(v > 0 for v in logistic["odds_ratios"].values())
    assert all(lo < hi for lo, hi in logistic["ci"].values())
    bins = discrimination["calibration"]["bins"]
    assert len(bins) == 10 and sum(b["n"] for b in bins) == 300


def test_pathology_with_one_class_reports_why(tmp_path: Path) -> None:
    scored = make_results(40, seed=3)
    results = _write(tmp_path / "results.csv", scored, RESULTS_COLUMNS)
    followup = _write(
        tmp_path / "followup.csv", make_followup(scored, 4), ("study_instance_uid", "time", "event")
    )
    pathology = _write(
        tmp_path / "pathology.csv",
        [{"study_instance_uid": r["study_instance_uid"], "mvi": 0} for r in scored],
        ("study_instance_uid", "mvi"),
    )
    report = run_audit(results, followup, tmp_path / "out", pathology_csv=pathology)
    discrimination = report["discrimination"]
    assert discrimination["auc"] is None
    assert "only one pathology class" in discrimination["auc_absent_reason"]
    assert discrimination["confusion"]["sensitivity"] is None
    assert discrimination["confusion"]["specificity"] is not None


# --------------------------------------------------------------------------------------------
# Joins
# --------------------------------------------------------------------------------------------


def test_hashed_identifiers_join_with_the_key(cohort: dict[str, Any], tmp_path: Path) -> None:
    hashed = [
        {
            **row,
            **{
                c: keyed_hash(row[c], KEY)
                for c in ("study_instance_uid", "accession_number", "patient_id")
            },
        }
        for row in cohort["scored"]
    ]
    results = _write(tmp_path / "results.csv", hashed, RESULTS_COLUMNS)
    paths = cohort["paths"]
    report = run_audit(
        results,
        paths["followup"],
        tmp_path / "out",
        pathology_csv=paths["pathology"],
        options=AuditOptions(covariates=("age", "afp_log"), pseudonym_key=KEY),
    )
    plain = cohort["report"]
    assert report["join"]["hashed"] is True
    assert report["join"]["matched"] == 300
    assert report["survival"]["cox"] == plain["survival"]["cox"]
    assert report["survival"]["logrank"] == plain["survival"]["logrank"]
    assert report["discrimination"]["auc"] == plain["discrimination"]["auc"]
    # Unmatched follow-up keys are listed as the follow-up file has them (plain).
    assert report["join"]["unmatched_followup_keys"] == plain["join"]["unmatched_followup_keys"]

    with pytest.raises(AuditInputError, match="pseudonym_key"):
        run_audit(results, paths["followup"], tmp_path / "nokey")


def test_patient_join_takes_the_earliest_scored_study(tmp_path: Path) -> None:
    # 40 patients with two scored studies each; the earliest is high risk for 15 of them, and
    # every later study is high risk. Later studies come first in the file.
    rows = []
    for i in range(40):
        base = {k: "" for k in RESULTS_COLUMNS} | {
            "patient_id": f"PAT{i:03d}",
            "model_name": "mvi-fusion-resnet18",
            "model_version": "1.0.0",
            "status": "scored",
            "tumor_max_diameter_mm": "30",
            "loat_max_area_cm2": "5",
        }
        later = base | {
            "study_instance_uid": f"{UID_ROOT}{2000 + i}",
            "study_date": "20220301",
            "mvi_probability": "0.9",
            "risk_category": "high",
        }
        early_high = i < 15
        earlier = base | {
            "study_instance_uid": f"{UID_ROOT}{3000 + i}",
            "study_date": "20190115",
            "mvi_probability": "0.8" if early_high else "0.2",
            "risk_category": "high" if early_high else "low",
        }
        rows += [later, earlier]
    rows.append(  # a failed study even earlier: not a start of follow-up
        {k: "" for k in RESULTS_COLUMNS}
        | {"patient_id": "PAT000", "study_date": "20170101", "status": "failed"}
    )
    results = _write(tmp_path / "results.csv", rows, RESULTS_COLUMNS)
    rng = np.random.default_rng(5)
    followup = _write(
        tmp_path / "followup.csv",
        [
            {"patient_id": f"PAT{i:03d}", "time": f"{rng.uniform(1, 60):.1f}", "event": i % 3 % 2}
            for i in range(40)
        ],
        ("patient_id", "time", "event"),
    )
    report = run_audit(results, followup, tmp_path / "out", options=AuditOptions(join="patient_id"))
    assert report["survival"]["groups"]["high"]["n"] == 15
    assert report["survival"]["groups"]["low"]["n"] == 25
    assert report["results"]["superseded"] == 40
    assert report["results"]["excluded"] == {"status failed": 1}
    assert report["join"]["matched"] == 40


def test_single_risk_group_is_reported_not_raised(tmp_path: Path) -> None:
    scored = [r | {"risk_category": "low", "mvi_probability": "0.1"} for r in make_results(50, 6)]
    results = _write(tmp_path / "results.csv", scored, RESULTS_COLUMNS)
    followup = _write(
        tmp_path / "followup.csv",
        make_followup(scored, 7),
        ("study_instance_uid", *FOLLOWUP_COLUMNS),
    )
    report = run_audit(
        results, followup, tmp_path / "out", options=AuditOptions(covariates=("age",))
    )
    survival = report["survival"]
    assert survival["cox"] is None
    assert survival["cox_absent_reason"] == "only one risk group (low) among matched patients"
    assert (
        survival["logrank"] is None and "only one risk group" in survival["logrank_absent_reason"]
    )
    assert survival["cox_adjusted"] is None
    html_text = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert html_text.count("data:image/png;base64,") == 1  # the KM curve is still drawn
    assert "only one risk group (low)" in html_text


def test_too_few_events_for_the_adjusted_model(tmp_path: Path) -> None:
    scored = make_results(30, seed=8)
    followup = make_followup(scored, 9)
    # Three events only, one in each group at least.
    highs = [i for i, r in enumerate(scored) if r["risk_category"] == "high"]
    lows = [i for i, r in enumerate(scored) if r["risk_category"] == "low"]
    events = {highs[0], highs[1], lows[0]}
    for i, row in enumerate(followup):
        row["event"] = int(i in events)
    results = _write(tmp_path / "results.csv", scored, RESULTS_COLUMNS)
    path = _write(tmp_path / "followup.csv", followup, ("study_instance_uid", *FOLLOWUP_COLUMNS))
    report = run_audit(
        results, path, tmp_path / "out", options=AuditOptions(covariates=("age", "afp_log"))
    )
    assert report["survival"]["cox"] is not None
    assert report["survival"]["cox_adjusted"] is None
    assert "too few events (3)" in report["survival"]["cox_adjusted_absent_reason"]


def test_demo_model_footer(tmp_path: Path) -> None:
    scored = make_results(30, seed=10, model_name="mvi-fusion-resnet18-demo")
    results = _write(tmp_path / "results.csv", scored, RESULTS_COLUMNS)
    followup = _write(
        tmp_path / "followup.csv", make_followup(scored, 1), ("study_instance_uid", "time", "event")
    )
    report = run_audit(results, followup, tmp_path / "out")
    assert report["notice"] == "demo model — not for clinical use"
    assert "demo model — not for clinical use" in (tmp_path / "out" / "report.html").read_text(
        encoding="utf-8"
    )


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> dict[str, Any]:
    scored = make_results(20, seed=21)
    return {"scored": scored, "followup": make_followup(scored, 22), "dir": tmp_path}


def _run(small: dict[str, Any], results: list[dict], followup: list[dict], **kw: Any) -> Any:
    folder: Path = small["dir"]
    result_columns = kw.pop("result_columns", RESULTS_COLUMNS)
    followup_columns = kw.pop("followup_columns", ("study_instance_uid", "time", "event"))
    r = _write(folder / "results.csv", results, result_columns)
    f = _write(folder / "followup.csv", followup, followup_columns)
    return run_audit(r, f, folder / "out", **kw)


def _one_line(exc: pytest.ExceptionInfo[AuditInputError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_results_column(small: dict[str, Any]) -> None:
    columns = [c for c in RESULTS_COLUMNS if c not in ("risk_category", "status")]
    rows = [{c: r[c] for c in columns} for r in small["scored"]]
    with pytest.raises(AuditInputError) as exc:
        _run(small, rows, small["followup"], result_columns=columns)
    message = _one_line(exc)
    assert message.startswith("results.csv: missing columns")
    assert "risk_category" in message and "status" in message


def test_missing_followup_column(small: dict[str, Any]) -> None:
    rows = [
        {"study_instance_uid": f["study_instance_uid"], "time": f["time"]}
        for f in small["followup"]
    ]
    with pytest.raises(AuditInputError, match=r"^followup\.csv: missing column event"):
        _run(small, small["scored"], rows, followup_columns=("study_instance_uid", "time"))


def test_missing_covariate_column(small: dict[str, Any]) -> None:
    with pytest.raises(AuditInputError, match=r"^followup\.csv: missing column bilirubin"):
        _run(
            small,
            small["scored"],
            small["followup"],
            options=AuditOptions(covariates=("bilirubin",)),
        )


def test_unparseable_study_date(small: dict[str, Any]) -> None:
    small["scored"][2]["study_date"] = "2019-13-45"
    with pytest.raises(AuditInputError) as exc:
        _run(small, small["scored"], small["followup"])
    assert _one_line(exc) == "results.csv line 4: study_date '2019-13-45' is not a date (YYYYMMDD)"


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("time", "-3.5", "followup.csv line 6: time -3.5 is negative"),
        ("time", "soon", "followup.csv line 6: time 'soon' is not a number"),
        ("time", "", "followup.csv line 6: time '' is not a number"),
        ("event", "2", "followup.csv line 6: event '2' is not 0 or 1"),
        ("event", "yes", "followup.csv line 6: event 'yes' is not 0 or 1"),
    ],
)
def test_bad_followup_values(small: dict[str, Any], column: str, value: str, expected: str) -> None:
    small["followup"][4][column] = value
    with pytest.raises(AuditInputError) as exc:
        _run(small, small["scored"], small["followup"])
    assert _one_line(exc) == expected


def test_no_matches(small: dict[str, Any]) -> None:
    followup = [
        f | {"study_instance_uid": f["study_instance_uid"] + ".9"} for f in small["followup"]
    ]
    with pytest.raises(AuditInputError, match=r"^no study_instance_uid of followup\.csv matches"):
        _run(small, small["scored"], followup)


def test_results_without_identifiers(small: dict[str, Any]) -> None:
    columns = [
        c
        for c in RESULTS_COLUMNS
        if c not in ("study_instance_uid", "accession_number", "patient_id")
    ]
    rows = [{c: r[c] for c in columns} for r in small["scored"]]
    with pytest.raises(AuditInputError, match=r"^results\.csv: no identifier columns"):
        _run(small, rows, small["followup"], result_columns=columns)


def test_join_column_absent_from_results(small: dict[str, Any]) -> None:
    columns = [c for c in RESULTS_COLUMNS if c != "study_instance_uid"]
    rows = [{c: r[c] for c in columns} for r in small["scored"]]
    with pytest.raises(AuditInputError, match=r"^results\.csv: no study_instance_uid column"):
        _run(small, rows, small["followup"], result_columns=columns)


def test_bad_pathology_label(small: dict[str, Any]) -> None:
    folder: Path = small["dir"]
    pathology = _write(
        folder / "pathology.csv",
        [{"study_instance_uid": r["study_instance_uid"], "mvi": "maybe"} for r in small["scored"]],
        ("study_instance_uid", "mvi"),
    )
    with pytest.raises(AuditInputError) as exc:
        _run(small, small["scored"], small["followup"], pathology_csv=pathology)
    assert _one_line(exc) == "pathology.csv line 2: mvi 'maybe' is not 0 or 1"


def test_missing_file(small: dict[str, Any]) -> None:
    folder: Path = small["dir"]
    with pytest.raises(AuditInputError, match="no such file"):
        run_audit(folder / "absent.csv", folder / "followup.csv", folder / "out")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a callback keeps `audit` a named subcommand, as in mvi-node
        pass

    return app


def test_cli_prints_headline_table(cohort: dict[str, Any], tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[security]\npseudonym_key = "{KEY}"\n', encoding="utf-8")
    paths = cohort["paths"]
    result = CliRunner().invoke(
        _app(),
        [
            "audit",
            "--results",
            str(paths["results"]),
            "--followup",
            str(paths["followup"]),
            "--pathology",
            str(paths["pathology"]),
            "--out",
            str(tmp_path / "cli-out"),
            "--time-unit",
            "months",
            "--config",
            str(config),
        ],
        env={"MVI_CONFIG": ""},
    )
    assert result.exit_code == 0, result.output
    cox = cohort["report"]["survival"]["cox"]
    assert f"{cox['hr']:.2f} ({cox['ci_low']:.2f}–{cox['ci_high']:.2f})" in result.stdout
    assert "Log-rank p" in result.stdout and "AUC" in result.stdout
    assert str(tmp_path / "cli-out" / "report.html") in result.stdout
    assert (tmp_path / "cli-out" / "report.json").is_file()


def test_cli_exits_2_with_one_line_on_bad_input(small: dict[str, Any]) -> None:
    folder: Path = small["dir"]
    columns = [c for c in RESULTS_COLUMNS if c != "mvi_probability"]
    results = _write(
        folder / "results.csv", [{c: r[c] for c in columns} for r in small["scored"]], columns
    )
    followup = _write(
        folder / "followup.csv", small["followup"], ("study_instance_uid", "time", "event")
    )
    result = CliRunner().invoke(
        _app(),
        [
            "audit",
            "--results",
            str(results),
            "--followup",
            str(followup),
            "--out",
            str(folder / "o"),
        ],
        env={"MVI_CONFIG": ""},
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mvi-node: results.csv: missing column mvi_probability")
    assert not (folder / "o").exists()


def test_an_explicit_time_origin_leaves_out_studies_after_it(tmp_path: Path) -> None:
    # Time runs from surgery: a CT dated after the operation predicts nothing about it.
    scored = make_results(120, seed=21)
    followup = make_followup(scored, seed=22)
    for index, row in enumerate(followup):
        study = dt.datetime.strptime(scored[index]["study_date"], "%Y%m%d").date()
        # Every fourth patient was operated on the day before the CT; the others a week after.
        offset = -1 if index % 4 == 0 else 7
        row["surgery_date"] = (study + dt.timedelta(days=offset)).isoformat()
    results = _write(tmp_path / "results.csv", scored, RESULTS_COLUMNS)
    columns = ("study_instance_uid", *FOLLOWUP_COLUMNS, "surgery_date")
    followup_csv = _write(tmp_path / "followup.csv", followup, columns)
    options = AuditOptions(time_origin_col="surgery_date")
    report = run_audit(results, followup_csv, tmp_path / "out", options=options)
    assert report["options"]["time_origin"] == "surgery_date"
    assert report["join"]["study_after_time_origin"] == 30
    assert report["survival"]["n"] == 90
    # A bad date names the line and the column.
    followup[5]["surgery_date"] = "last spring"
    bad = _write(tmp_path / "bad.csv", followup, columns)
    with pytest.raises(AuditInputError, match=r"bad\.csv line 7: surgery_date 'last spring'"):
        run_audit(results, bad, tmp_path / "out2", options=options)
    with pytest.raises(AuditInputError, match="time origin column"):
        AuditOptions(time_origin_col="time")


def test_a_hashed_export_shifts_study_dates_and_the_audit_shifts_origins_alike(
    tmp_path: Path,
) -> None:
    from node.core.pseudonym import DATE_SHIFT_MAX_DAYS, date_shift_days
    from node.report.export import SHIFTED_DATE_COLUMN, pseudonymise

    scored = make_results(120, seed=31)
    # Every patient has two studies 59 days apart.
    for row, other in zip(scored[::2], scored[1::2], strict=True):
        other["patient_id"] = row["patient_id"]
        first = dt.datetime.strptime(row["study_date"], "%Y%m%d").date()
        other["study_date"] = (first + dt.timedelta(days=59)).strftime("%Y%m%d")
    hashed = [pseudonymise(row, "hashed", KEY) for row in scored]
    assert all("study_date" not in row for row in hashed)
    for plain, shifted in zip(scored, hashed, strict=True):
        assert shifted[SHIFTED_DATE_COLUMN] != plain["study_date"]  # no calendar date leaves
        days = date_shift_days(shifted["patient_id"], KEY)
        assert 0 < abs(days) <= DATE_SHIFT_MAX_DAYS
        real = dt.datetime.strptime(plain["study_date"], "%Y%m%d").date()
        assert shifted[SHIFTED_DATE_COLUMN] == (real + dt.timedelta(days=days)).strftime("%Y%m%d")
    # One patient's studies keep their interval: the data an audit needs.
    a, b = (dt.datetime.strptime(r[SHIFTED_DATE_COLUMN], "%Y%m%d") for r in hashed[:2])
    assert (b - a).days == 59

    # Follow-up from the clinic, by plain patient ID, with plain surgery dates.
    followup = make_followup(scored[::2], seed=32, key="patient_id")
    for index, row in enumerate(followup):
        study = dt.datetime.strptime(scored[2 * index]["study_date"], "%Y%m%d").date()
        row["surgery_date"] = (study + dt.timedelta(days=-1 if index % 4 == 0 else 7)).isoformat()
    columns = [SHIFTED_DATE_COLUMN if c == "study_date" else c for c in RESULTS_COLUMNS]
    results = _write(tmp_path / "results.csv", hashed, columns)
    followup_csv = _write(
        tmp_path / "followup.csv", followup, ("patient_id", *FOLLOWUP_COLUMNS, "surgery_date")
    )
    options = AuditOptions(join="patient_id", time_origin_col="surgery_date", pseudonym_key=KEY)
    report = run_audit(results, followup_csv, tmp_path / "out", options=options)
    # The same 15 of 60 patients operated on before their CT, as on the real calendar.
    assert report["join"]["study_after_time_origin"] == 15
    without_key = AuditOptions(join="patient_id", time_origin_col="surgery_date")
    hashed_followup = [dict(r, patient_id=keyed_hash(r["patient_id"], KEY)) for r in followup]
    followup_hashed_csv = _write(
        tmp_path / "followup_hashed.csv",
        hashed_followup,
        ("patient_id", *FOLLOWUP_COLUMNS, "surgery_date"),
    )
    with pytest.raises(AuditInputError, match="study dates are shifted per patient"):
        run_audit(results, followup_hashed_csv, tmp_path / "out2", options=without_key)
