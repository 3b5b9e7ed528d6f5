"""The calibration step: isotonic regression of the label on a raw score, as a pyspark.ml
Estimator (IsotonicCalibrator) and Model (IsotonicCalibrationModel) saved inside the
propensity PipelineModel."""

from __future__ import annotations

from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasInputCol, HasLabelCol, HasOutputCol
from pyspark.ml.regression import IsotonicRegression
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from microseg.ml.propensity.targets import LABEL, RAW_SCORE, SCORE


class _CalibratorParams(HasInputCol, HasOutputCol, HasLabelCol):
    rawScoreCol: Param[str] = Param(
        Params._dummy(),
        "rawScoreCol",
        "output column: the uncalibrated score as a double",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self, *args):
        super().__init__(*args)
        self._setDefault(
            inputCol="probability", outputCol=SCORE, labelCol=LABEL, rawScoreCol=RAW_SCORE
        )

    def getRawScoreCol(self) -> str:
        return self.getOrDefault(self.rawScoreCol)


def positive_score(dataset: DataFrame, column: str) -> Column:
    """The positive-class probability of a probability vector column, or a double column."""
    if isinstance(dataset.schema[column].dataType, VectorUDT):
        return vector_to_array(F.col(column)).getItem(1)
    return F.col(column).cast("double")


def isotonic_value(
    raw: Column, boundaries: list[float], predictions: list[float], epsilon: float
) -> Column:
    """Spark's IsotonicRegressionModel.predict as a Column (no UDF): the prediction of the
    nearest boundary outside the range, linear interpolation between boundaries inside it;
    then clipped to [epsilon, 1 - epsilon]. Non-decreasing in `raw`."""
    n = len(boundaries)
    b = F.lit([float(v) for v in boundaries])
    p = F.lit([float(v) for v in predictions])
    below = F.size(F.filter(b, lambda v: v <= raw))  # boundaries <= raw: 1-based index
    lo, hi = F.try_element_at(b, below), F.try_element_at(b, below + 1)
    p_lo, p_hi = F.try_element_at(p, below), F.try_element_at(p, below + 1)
    value = (
        F.when(below == 0, F.lit(float(predictions[0])))
        .when(below >= n, F.lit(float(predictions[-1])))
        .otherwise(p_lo + (p_hi - p_lo) * (raw - lo) / (hi - lo))
    )
    return F.least(F.greatest(value, F.lit(epsilon)), F.lit(1.0 - epsilon))


class IsotonicCalibrator(
    Estimator, _CalibratorParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Fits isotonic regression of the label on the positive-class score of `inputCol` (a
    probability vector or a double) and returns an IsotonicCalibrationModel."""

    @keyword_only
    def __init__(
        self,
        *,
        inputCol: str = "probability",
        outputCol: str = SCORE,
        labelCol: str = LABEL,
        rawScoreCol: str = RAW_SCORE,
    ):
        super().__init__()
        self._set(**self._input_kwargs)

    def _fit(self, dataset: DataFrame) -> IsotonicCalibrationModel:
        frame_df = dataset.select(
            positive_score(dataset, self.getInputCol()).alias("_raw"),
            F.col(self.getLabelCol()).cast("double").alias("_label"),
        ).persist()
        try:
            rows = frame_df.count()
            if rows == 0:
                raise ValueError("calibration needs at least one row")
            fitted = IsotonicRegression(
                featuresCol="_raw", labelCol="_label", predictionCol="_calibrated", isotonic=True
            ).fit(frame_df)
        finally:
            frame_df.unpersist()
        model = IsotonicCalibrationModel(
            boundaries=[float(v) for v in fitted.boundaries.toArray()],
            predictions=[float(v) for v in fitted.predictions.toArray()],
            epsilon=0.5 / rows,
        )
        return self._copyValues(model)


class IsotonicCalibrationModel(
    Model, _CalibratorParams, DefaultParamsReadable, DefaultParamsWritable
):
    """Adds `rawScoreCol` (the positive-class score of `inputCol`) and `outputCol` (the
    calibrated probability, non-decreasing in the raw score, in [epsilon, 1 - epsilon];
    epsilon is half an observation of the calibration set)."""

    boundaries: Param[list[float]] = Param(
        Params._dummy(), "boundaries", "raw scores of the steps", TypeConverters.toListFloat
    )
    predictions: Param[list[float]] = Param(
        Params._dummy(),
        "predictions",
        "calibrated value at each boundary",
        TypeConverters.toListFloat,
    )
    epsilon: Param[float] = Param(
        Params._dummy(),
        "epsilon",
        "outputs are clipped to [epsilon, 1 - epsilon]",
        TypeConverters.toFloat,
    )

    @keyword_only
    def __init__(
        self,
        *,
        boundaries: list[float] | None = None,
        predictions: list[float] | None = None,
        epsilon: float | None = None,
        inputCol: str | None = None,
        outputCol: str | None = None,
        labelCol: str | None = None,
        rawScoreCol: str | None = None,
    ):
        super().__init__()
        self._setDefault(boundaries=[], predictions=[], epsilon=1e-6)
        self._set(**{k: v for k, v in self._input_kwargs.items() if v is not None})

    def _transform(self, dataset: DataFrame) -> DataFrame:
        boundaries = self.getOrDefault(self.boundaries)
        predictions = self.getOrDefault(self.predictions)
        if not boundaries or len(boundaries) != len(predictions):
            raise ValueError("IsotonicCalibrationModel has no fitted boundaries")
        raw_col = self.getRawScoreCol()
        with_raw_df = dataset.withColumn(raw_col, positive_score(dataset, self.getInputCol()))
        return with_raw_df.withColumn(
            self.getOutputCol(),
            isotonic_value(
                F.col(raw_col), boundaries, predictions, self.getOrDefault(self.epsilon)
            ),
        )
