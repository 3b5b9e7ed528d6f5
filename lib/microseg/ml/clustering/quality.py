"""Cluster quality against a ground truth: the adjusted Rand index between the clusters and
the personas of a `microseg generate` users.csv."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from microseg.ml.clustering.steps import CLUSTER_ID


def adjusted_rand_index(contingency: Mapping[tuple[Any, Any], int]) -> float:
    """Adjusted Rand index (Hubert and Arabie) from a contingency table
    {(true label, predicted label): count}; 1.0 when both partitions are trivial alike."""
    rows: dict[Any, int] = {}
    cols: dict[Any, int] = {}
    for (a, b), count in contingency.items():
        rows[a] = rows.get(a, 0) + count
        cols[b] = cols.get(b, 0) + count
    n = sum(rows.values())
    if n < 2:
        return 1.0
    index = sum(math.comb(c, 2) for c in contingency.values())
    sum_rows = sum(math.comb(c, 2) for c in rows.values())
    sum_cols = sum(math.comb(c, 2) for c in cols.values())
    expected = sum_rows * sum_cols / math.comb(n, 2)
    maximum = (sum_rows + sum_cols) / 2
    if maximum == expected:
        return 1.0
    return (index - expected) / (maximum - expected)


def persona_labels(spark: SparkSession, users_csv: str) -> DataFrame:
    """user_key, persona from the users.csv `microseg generate` writes.

    A user's key after identity stitching is their user_id once any of their cookies was seen
    with it, else anon:<anonymous id> (a user who never logged in, or a cookie never used
    after login); every such key of the user carries the persona. Keys claimed by two
    personas (a shared family cookie, listed in anonymous_ids or shared_anonymous_id) are
    left out."""
    users_df = spark.read.csv(users_csv, header=True)
    cookies = F.concat_ws(";", F.col("anonymous_ids"), F.col("shared_anonymous_id"))
    keys_df = users_df.select(F.col("user_id").alias("user_key"), "persona").unionByName(
        users_df.select(F.explode(F.split(cookies, ";")).alias("_anon"), "persona")
        .filter(F.col("_anon") != "")
        .select(F.concat(F.lit("anon:"), F.col("_anon")).alias("user_key"), "persona")
    )
    return (
        keys_df.groupBy("user_key")
        .agg(F.min("persona").alias("persona"), F.count_distinct("persona").alias("_personas"))
        .filter(F.col("_personas") == 1)
        .select("user_key", "persona")
    )


def persona_ari(
    spark: SparkSession, assignments_df: DataFrame, users_csv: str, *, column: str = CLUSTER_ID
) -> tuple[float, int]:
    """(ARI between `column` of assignments_df and the generator's personas, users compared);
    users without a persona are left out."""
    joined_df = assignments_df.join(persona_labels(spark, users_csv), on="user_key", how="inner")
    counts = joined_df.groupBy("persona", column).count().collect()
    table = {(r["persona"], r[column]): r["count"] for r in counts}
    return adjusted_rand_index(table), sum(table.values())
