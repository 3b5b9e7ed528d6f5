"""Behavioral clusters: a KMeans pipeline per model version, with cluster ids that stay stable.

`train_clusters` (job `microseg cluster train --as-of T`) reads gold/user_features as of T,
keeps the model's population (cluster.population: by default users seen in the last 90 days;
recorded in the registry, and `assign` applies the recorded one) and fits one pyspark.ml
pipeline, saved as one PipelineModel under <lake>/models/<model_name>/<version>:

    FillMissing -> Log1p -> VectorAssembler -> StandardScaler(mean, std) -> [PCA]
        -> KMeans | BisectingKMeans | GaussianMixture -> ClusterLabeler

* FillMissing replaces nulls (see FILL_FROM): days_since_last_purchase of a user who never
  bought takes the user's tenure_days (no purchase in all the time we have seen them; 365 if
  tenure_days is not computed); every other null (a ratio whose denominator is zero, an RFM
  score of a non-buyer) takes 0.
* Log1p takes ln(1 + max(x, 0)) of the skewed money and count features (cluster.log_features).
* The k search fits each k in [k_min, k_max] on a sample of about search_sample_rows rows of
  the scaled vectors (computed once, local-checkpointed), scores it with the silhouette
  cluster.silhouette names (default euclidean: scikit-learn's, on a sample; or Spark's
  squared_euclidean or cosine) and the within-cluster sum of squares, and keeps the k with
  the best silhouette (ties: the smaller k). The final model is fitted with that k
  on all rows.
* ClusterLabeler, the last stage, maps KMeans' raw index to the stable id and adds
  `cluster_id` (e.g. c03), `segment_id` (cluster_<model_name>_<stable id>), `cluster_name`
  and `cluster_distance`: the Euclidean distance from the user's vector to the cluster
  centre in the space KMeans clusters in (standardized features, PCA-projected when
  pca_components is set); smaller is more typical. It is the membership score.

Profiles, per cluster: size, share, mean and median of every feature in its original units
(after FillMissing, before Log1p), z (the cluster mean of the standardized model input, i.e.
(cluster mean - overall mean) / overall standard deviation, on the log1p scale for log
features), the three features with the largest |z|, and a name: the first NAME_RULES rule whose
every claim holds for the profile (naming.py).

Stable ids: each cluster of a new version is matched to the clusters of the previous version
(the latest of the same model_name in gold/model_registry). Both versions' centroids in the
model-input space (after FillMissing and Log1p, before scaling) are standardized with the NEW
model's scaler; the distance is the RMS difference over the features both versions use (with
the same log flag), in standard deviations per feature. scipy's linear_sum_assignment finds
the one-to-one matching of least total distance; a pair closer than match_max_distance is a
match: the new cluster keeps the old stable id, and the old name while its claims still
hold. Unmatched new clusters get fresh ids (one past the largest id the model ever issued,
largest cluster first); unmatched old clusters are reported as vanished. A first version
numbers its clusters c01, c02, ... by size, largest first.

`assign_clusters` (job `microseg cluster assign --as-of T [--version V]`) loads the latest (or
the given) version, transforms the features as of T and writes the members through
membership.write_membership (source "cluster", definition_version = the model version), and
one gold/segment_catalog row per cluster.
"""

from microseg.ml.clustering.jobs import (
    ClusterAssignReport,
    ClusterResult,
    ClusterTrainReport,
    assign_clusters,
    train_clusters,
)

__all__ = [
    "ClusterAssignReport",
    "ClusterResult",
    "ClusterTrainReport",
    "assign_clusters",
    "train_clusters",
]
