"""The audit's plots as PNG bytes: Kaplan–Meier, ROC and calibration.

matplotlib's object API with the Agg canvas: no pyplot state, no display needed; the same
inputs give the same bytes.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No timestamp metadata: the same inputs give the same bytes.
    figure.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


_COLORS = {"High risk": "#c0392b", "Low risk": "#1f6fb2"}


def _km_png(fitters: list[Any], time_unit: str, note: str) -> bytes:
    from lifelines.plotting import add_at_risk_counts  # type: ignore[import-untyped]

    figure = _figure(7.5, 5.6)
    ax = figure.add_subplot()
    for kmf in fitters:
        kmf.plot_survival_function(
            ax=ax, ci_show=True, show_censors=True, color=_COLORS.get(kmf._label)
        )
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"Time ({time_unit})")
    ax.set_ylabel("Survival probability")
    ax.set_title("Kaplan–Meier by MVI risk group" + (f"\n{note}" if note else ""), fontsize=10)
    ax.legend(loc="lower left")
    add_at_risk_counts(*fitters, ax=ax, fig=figure, rows_to_show=["At risk"])
    figure.tight_layout()
    return _png(figure)


def _roc_png(
    fpr: np.ndarray, tpr: np.ndarray, auc: dict[str, Any] | None, called: np.ndarray, y: np.ndarray
) -> bytes:
    figure = _figure(5.0, 5.0)
    ax = figure.add_subplot()
    label = "ROC"
    if auc is not None:
        label = f"AUC {auc['auc']:.3f} ({auc['ci_low']:.3f}–{auc['ci_high']:.3f})"
    ax.plot(fpr, tpr, color="#1f6fb2", label=label)
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1)
    sensitivity = float(np.mean(called[y == 1]))
    specificity = float(np.mean(~called[y == 0]))
    ax.plot([1 - specificity], [sensitivity], "o", color="#c0392b", label="risk category high")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("Sensitivity")
    ax.set_title("ROC: MVI probability vs pathology", fontsize=10)
    ax.legend(loc="lower right")
    figure.tight_layout()
    return _png(figure)


def _calibration_png(calibration: dict[str, Any]) -> bytes:
    figure = _figure(5.0, 5.0)
    ax = figure.add_subplot()
    bins = [b for b in calibration["bins"] if b["n"]]
    x = [b["mean_predicted"] for b in bins]
    y = [b["observed"] for b in bins]
    ax.plot([0, 1], [0, 1], linestyle="--", color="#999999", linewidth=1, label="ideal")
    ax.plot(x, y, "-", color="#1f6fb2")
    ax.scatter(x, y, s=[20 + 4 * b["n"] for b in bins], color="#1f6fb2", label="bins (size: n)")
    for b in bins:
        ax.annotate(
            str(b["n"]),
            (b["mean_predicted"], b["observed"]),
            fontsize=7,
            xytext=(4, -10),
            textcoords="offset points",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("Mean predicted MVI probability")
    ax.set_ylabel("Observed MVI fraction")
    ax.set_title(f"Calibration ({len(calibration['bins'])} bins)", fontsize=10)
    ax.legend(loc="upper left")
    figure.tight_layout()
    return _png(figure)
