"""The custom pyspark.ml stages of a cluster pipeline (saved inside its PipelineModel):
FillMissing, Log1p and ClusterLabeler, and the names of the columns they add."""

from __future__ import annotations

from pyspark import keyword_only
from pyspark.ml import Transformer
from pyspark.ml.functions import vector_to_array
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasInputCols, HasOutputCols, HasPredictionCol
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

LOG_PREFIX = "_log1p_"
RAW_VECTOR = "_cluster_input"
SCALED = "_cluster_scaled"
PROJECTED = "_cluster_pca"
INDEX = "_cluster_index"
PROBABILITY = "_cluster_probability"  # GaussianMixture's membership probabilities
CLUSTER_ID = "cluster_id"
SEGMENT_ID = "segment_id"
CLUSTER_NAME = "cluster_name"
DISTANCE = "cluster_distance"


class FillMissing(Transformer, HasInputCols, DefaultParamsReadable, DefaultParamsWritable):
    """Casts inputCols to double in place and replaces null (and NaN): by the value of
    fillFromCols[i] when that names a column and it is not null, else by fillValues[i]."""

    fillValues = Param(
        Params._dummy(),
        "fillValues",
        "value per input column that replaces null",
        typeConverter=TypeConverters.toListFloat,
    )
    fillFromCols = Param(
        Params._dummy(),
        "fillFromCols",
        "column per input column whose value replaces null first ('' for none)",
        typeConverter=TypeConverters.toListString,
    )

    @keyword_only
    def __init__(self, *, inputCols=None, fillValues=None, fillFromCols=None):
        super().__init__()
        self._setDefault(fillValues=[], fillFromCols=[])
        self._set(**self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        names = self.getInputCols()
        values = self.getOrDefault(self.fillValues) or [0.0] * len(names)
        sources = self.getOrDefault(self.fillFromCols) or [""] * len(names)
        if not len(names) == len(values) == len(sources):
            raise ValueError("FillMissing: inputCols, fillValues and fillFromCols differ in length")
        filled = {}
        for name, value, source in zip(names, values, sources, strict=True):
            column = _not_nan(F.col(name))
            if source:
                column = F.coalesce(column, _not_nan(F.col(source)))
            filled[name] = F.coalesce(column, F.lit(float(value)))
        return dataset.withColumns(filled)


def _not_nan(column: Column) -> Column:
    value = column.cast("double")
    return F.when(~F.isnan(value), value)


class Log1p(Transformer, HasInputCols, HasOutputCols, DefaultParamsReadable, DefaultParamsWritable):
    """outputCols[i] = ln(1 + max(inputCols[i], 0)); null stays null."""

    @keyword_only
    def __init__(self, *, inputCols=None, outputCols=None):
        super().__init__()
        self._set(**self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        return dataset.withColumns(
            {
                out: F.log1p(F.when(F.col(name) < 0, 0.0).otherwise(F.col(name).cast("double")))
                for name, out in zip(self.getInputCols(), self.getOutputCols(), strict=True)
            }
        )


class ClusterLabeler(
    Transformer, HasFeaturesCol, HasPredictionCol, DefaultParamsReadable, DefaultParamsWritable
):
    """Adds cluster_id (stableIds[raw index]), segment_id (segmentPrefix + cluster_id),
    cluster_name and cluster_distance (Euclidean distance from featuresCol to
    centers[raw index]). Plain Spark SQL, no Python UDF."""

    stableIds = Param(
        Params._dummy(),
        "stableIds",
        "stable cluster id per raw cluster index",
        typeConverter=TypeConverters.toListString,
    )
    names = Param(
        Params._dummy(), "names", "name per raw index", typeConverter=TypeConverters.toListString
    )
    centers = Param(
        Params._dummy(),
        "centers",
        "cluster centre per raw index, in the featuresCol space",
        typeConverter=TypeConverters.identity,
    )
    segmentPrefix = Param(
        Params._dummy(),
        "segmentPrefix",
        "segment_id = segmentPrefix + stable id",
        typeConverter=TypeConverters.toString,
    )

    @keyword_only
    def __init__(
        self,
        *,
        featuresCol=None,
        predictionCol=None,
        stableIds=None,
        names=None,
        centers=None,
        segmentPrefix=None,
    ):
        super().__init__()
        self._setDefault(segmentPrefix="cluster_")
        self._set(**self._input_kwargs)

    def _transform(self, dataset: DataFrame) -> DataFrame:
        ids = self.getOrDefault(self.stableIds)
        names = self.getOrDefault(self.names)
        centers = self.getOrDefault(self.centers)
        position = F.col(self.getPredictionCol()) + 1
        center = F.element_at(
            F.array(*[F.array(*[F.lit(float(x)) for x in c]) for c in centers]), position
        )
        vector = vector_to_array(F.col(self.getFeaturesCol()))
        squares = F.zip_with(vector, center, lambda a, b: (a - b) * (a - b))
        cluster_id = F.element_at(F.array(*[F.lit(i) for i in ids]), position)
        return dataset.withColumns(
            {
                CLUSTER_ID: cluster_id,
                SEGMENT_ID: F.concat(F.lit(self.getOrDefault(self.segmentPrefix)), cluster_id),
                CLUSTER_NAME: F.element_at(F.array(*[F.lit(n) for n in names]), position),
                DISTANCE: F.sqrt(F.aggregate(squares, F.lit(0.0), lambda acc, x: acc + x)),
            }
        )
