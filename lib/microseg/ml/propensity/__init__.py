"""Propensity models: point-in-time labels, one calibrated GBT pipeline, scores and segments.

A target (`propensity.targets`) is a name (purchase_7d), a kind and a horizon h. For an as-of
time T the population is the users with features at T (gold/user_features: events strictly
before T), and the label comes only from events in [T, T + h):

* purchase: 1 if the user has a purchase event in [T, T + h), else 0.
* churn: only prior buyers are in the population (a purchase before T, which is
  orders_lifetime >= 1 at T); 1 if the user has no purchase in [T, T + h), else 0.

Window events are keyed with the identity map learned from the events before T + h; a user
who was anonymous at T (anon:<id>) and whose id is stitched to a user id by T + h also gets
that user's window purchases.

Training for an evaluation as-of E uses the snapshots E - h - k x snapshot_interval,
k = 0 .. snapshots - 1: every training label window ends at or before E, so nothing the
evaluation labels see is used for training. The latest training snapshot is held out to fit
the calibration; the GBT is tuned and fitted on the earlier ones. E's own label window must be
complete (E + h at or before the latest event in the lake). Missing feature snapshots are
computed with features.run_features (the same job as `microseg features --as-of T`); existing
ones are reused as they are.

The saved model is one PipelineModel: Imputer (nulls -> the training median of the feature),
VectorAssembler, GBTClassifier (class weights from the training label balance) and an
IsotonicCalibrationModel (isotonic regression of the label on the GBT's positive-class
probability, fitted on the held-out snapshot). Two baselines are scored on the same split:
logistic regression on the standardized same features, and a recency/frequency rule (HEURISTICS);
both are calibrated the same way, so every metric compares like with like.

Which model is saved (propensity.serve, default auto): the GBT only when its validation metric
on held-out users of the fit rows beats the logistic regression's; otherwise the logistic
regression pipeline with its calibration. Scores carry their top reasons: exact SHAP values
of the served model (explain.py).
"""

from microseg.ml.propensity.report import format_score_report, format_train_report
from microseg.ml.propensity.score import PropensityScoreReport, score_propensity
from microseg.ml.propensity.train import PropensityTrainReport, train_propensity

__all__ = [
    "PropensityScoreReport",
    "PropensityTrainReport",
    "format_score_report",
    "format_train_report",
    "score_propensity",
    "train_propensity",
]
