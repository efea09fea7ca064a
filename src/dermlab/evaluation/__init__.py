"""Evaluation: pure metric functions, calibration, plots, the HTML run report and run comparison.

Plots import matplotlib only when a figure is drawn, so importing this package stays light.
"""

from dermlab.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from dermlab.evaluation.bootstrap import bootstrap_intervals, paired_bootstrap
from dermlab.evaluation.compare import (
    COMPARISON_METRICS,
    RunComparison,
    compare_runs,
    compare_with_intervals,
    comparison_markdown,
    write_comparison,
)
from dermlab.evaluation.metrics import (
    SUMMARY_METRICS,
    compute_metrics,
    format_metrics_table,
    format_per_class_table,
    operating_points,
)
from dermlab.evaluation.plots import (
    plot_confusion_matrix,
    plot_reliability_diagram,
    plot_roc_curves,
    plot_training_curves,
)
from dermlab.evaluation.report import render_report, write_report

__all__ = [
    "COMPARISON_METRICS",
    "SUMMARY_METRICS",
    "RunComparison",
    "apply_temperature",
    "bootstrap_intervals",
    "compare_runs",
    "compare_with_intervals",
    "comparison_markdown",
    "compute_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "format_metrics_table",
    "format_per_class_table",
    "negative_log_likelihood",
    "operating_points",
    "paired_bootstrap",
    "plot_confusion_matrix",
    "plot_reliability_diagram",
    "plot_roc_curves",
    "plot_training_curves",
    "reliability_bins",
    "render_report",
    "write_comparison",
    "write_report",
]
