"""`mvi-node audit`: survival and discrimination audit of the node's results against outcomes.

A site exports the node's results (``mvi-node results export``, :data:`RESULTS_COLUMNS`), joins
them with a follow-up table (time to event, event 0/1) and optionally with pathology (MVI 0/1),
and gets the statistics the method's paper reports:

* survival by risk group (lifelines): Kaplan–Meier curves with numbers at risk, the log-rank
  test, the Cox hazard ratio of high vs low risk — optionally a second model adjusted for
  follow-up covariates — and the proportional-hazards check of each model;
* discrimination against pathology: AUC with its DeLong CI (:func:`model.stats.delong_ci`), ROC
  and calibration plots, the confusion matrix at the model's own threshold (the exported
  ``risk_category``), the Brier score and the logistic model of MVI on DL probability, maximum
  tumour diameter and LOAT area (:func:`model.stats.logistic_model`).

:func:`run_audit` writes ``report.json`` (every number), ``report.html`` (the same, readable, plots
embedded) and the plots as PNG files. Bad input raises :class:`AuditInputError` with one line that
names the file, line and column. Thin data is not an error: with one risk group, one pathology
class or too few events the report says why a number is absent.

Identifiers: when the results' join column holds keyed hashes (``results export`` pseudonymised
it), the follow-up's and pathology's keys go through the same :func:`node.core.pseudonym.keyed_hash`
before the join, so neither side needs the other's plain identifiers.

The package: :mod:`~node.report.audit.inputs` reads and checks the CSVs,
:mod:`~node.report.audit.report` joins them and assembles the report from the statistics of
:mod:`model.survival` (Kaplan–Meier, log-rank, Cox) and :mod:`model.stats` (AUC, calibration,
confusion matrix, logistic model), :mod:`~node.report.audit.plots` draws the PNGs,
:mod:`~node.report.audit.html` writes the text, and :mod:`~node.report.audit.command` is the
command.

lifelines, pandas, matplotlib and statsmodels are imported inside the functions that use them:
:func:`register` runs at every start of the command line and must stay cheap.
"""

from __future__ import annotations

from node.report.audit.command import register
from node.report.audit.html import headline
from node.report.audit.inputs import AuditInputError, AuditOptions
from node.report.audit.report import run_audit
from node.report.export import COLUMNS as RESULTS_COLUMNS
from node.report.export import IDENTIFIER_COLUMNS

__all__ = [
    "IDENTIFIER_COLUMNS",
    "RESULTS_COLUMNS",
    "AuditInputError",
    "AuditOptions",
    "headline",
    "register",
    "run_audit",
]
