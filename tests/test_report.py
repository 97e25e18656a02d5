"""Figures and tables about a finished run, read from its artifacts."""

from __future__ import annotations

from xray import report
from xray.robustness import PERTURBATIONS


def test_robustness_table_lists_unchanged_then_each_change(trained_store):
    run = report.load_run(trained_store.parent / "artifacts" / "smoke-model")
    rows = report.robustness_table(run)
    assert rows[0][0] == "unchanged" and len(rows) == 1 + len(PERTURBATIONS)
    assert [row[0] for row in rows[1:]] == [perturbation.label for perturbation in PERTURBATIONS]
    assert {"jpeg (strong)", "background_inversion (mild)"} <= {row[0] for row in rows}
    assert all(0 <= value <= 1 for row in rows for value in row[1:])
    assert {"robustness", "worst_case"} <= set(report.evaluation_plots(run))
