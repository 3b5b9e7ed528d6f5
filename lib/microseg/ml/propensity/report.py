"""What the CLI prints after a propensity training or scoring."""

from __future__ import annotations

from microseg.ml.propensity.score import PropensityScoreReport
from microseg.ml.propensity.train import PropensityTrainReport


def format_train_report(report: PropensityTrainReport) -> str:
    """A few lines for a person: snapshots, metrics of the three scorers, the verdict."""
    lines = [
        f"propensity train target={report.target} version={report.version} "
        f"({report.seconds:.0f} s)",
        f"model: {report.path}",
        "snapshots: "
        + ", ".join(
            f"{s['as_of']} {s['role']} {s['rows']} rows {s['positives']} positive"
            for s in report.snapshots
        ),
    ]
    if report.skipped_as_of:
        lines.append(
            "skipped: " + ", ".join(f"{t.isoformat()} ({why})" for t, why in report.skipped_as_of)
        )
    if report.features_computed:
        lines.append(
            "features computed for: " + ", ".join(t.isoformat() for t in report.features_computed)
        )
    lines.append(f"chosen: {report.chosen_params}")
    lines.append(
        f"{'model':<22}{'ROC AUC':>9}{'PR AUC':>9}{'log loss':>10}{'prec top':>10}{'lift':>7}"
    )
    for model, m in report.metrics.items():
        lines.append(
            f"{model:<22}{m['roc_auc']:>9.4f}{m['pr_auc']:>9.4f}{m['log_loss']:>10.4f}"
            f"{m['precision_top']:>10.4f}{m['lift_top']:>7.2f}"
        )
    base = report.metrics["gbt"]
    lines.append(f"evaluation rows {base['rows']:.0f}, base rate {base['base_rate']:.4f}")
    lines.append(f"calibration ({report.serving}, deciles): mean predicted / observed / rows")
    lines += [
        f"  {r['decile']:>2}  {r['mean_predicted']:.4f}  {r['observed_rate']:.4f}  {r['rows']}"
        for r in report.calibration_table
    ]
    lines.append(
        "top features (GBT split importances): "
        + ", ".join(f"{name} {value:.3f}" for name, value in report.feature_importances[:8])
    )
    lines.append(
        f"SHAP importances (mean |log-odds| over {report.shap_rows} evaluation rows; base "
        f"{report.shap_base:+.3f}): "
        + ", ".join(f"{name} {value:.3f}" for name, value in report.shap_importances[:8])
    )
    lines.append(report.verdict)
    lines.append(f"serving: {report.serving} ({report.selection['reason']})")
    return "\n".join(lines)


def format_score_report(report: PropensityScoreReport) -> str:
    return "\n".join(
        [
            f"propensity score target={report.target} version={report.version} "
            f"as_of={report.as_of.isoformat()} users={report.users}",
            f"segment {report.segment_id}: {report.members} members (lowest score "
            f"{report.min_member_score:.4f}), entered {report.entered}, exited {report.exited}; "
            f"mean score {report.mean_score:.4f}",
        ]
    )
