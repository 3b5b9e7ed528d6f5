"""Machine-learned segments: the model registry, KMeans clusters, GBT propensity."""
