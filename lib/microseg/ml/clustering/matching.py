"""Stable cluster ids across versions: the new clusters are matched one-to-one to the
previous version's by the distance between centroids; unmatched ones get fresh ids."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from pyspark.ml.feature import StandardScalerModel
from scipy.optimize import linear_sum_assignment

from microseg.core.config import ClusterConfig
from microseg.ml.clustering.naming import name_cluster, still_holds, unique_name


def stable_id(number: int) -> str:
    return f"c{number:02d}"


def stable_number(cluster_id: str) -> int:
    match = re.fullmatch(r"c(\d+)", cluster_id)
    return int(match.group(1)) if match else 0


def match_distances(
    new_centroids: list[Mapping[str, float]],
    old_centroids: list[Mapping[str, float]],
    *,
    std: Mapping[str, float],
) -> np.ndarray:
    """RMS distance between centroids in the model-input space (before scaling), each
    feature divided by its standard deviation `std` (the new model's scaler; its mean
    cancels out), over the features both have with a positive std. Rows: new, columns:
    old; inf where nothing is comparable."""
    costs = np.full((len(new_centroids), len(old_centroids)), np.inf)
    for i, new in enumerate(new_centroids):
        for j, old in enumerate(old_centroids):
            common = [
                f
                for f in new
                if std.get(f, 0.0) > 0 and new[f] is not None and old.get(f) is not None
            ]
            if common:
                diffs = [(new[f] - old[f]) / std[f] for f in common]
                costs[i, j] = math.sqrt(sum(d * d for d in diffs) / len(diffs))
    return costs


def match_clusters(costs: np.ndarray, max_distance: float) -> list[tuple[int, int, float]]:
    """Optimal one-to-one (new, old, distance) pairs closer than max_distance."""
    if costs.size == 0:
        return []
    finite = np.where(np.isfinite(costs), costs, 1e12)
    rows, cols = linear_sum_assignment(finite)
    return [
        (int(i), int(j), float(costs[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if costs[i, j] <= max_distance
    ]


def rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)


def identify(
    profiles: list[dict],
    settings: ClusterConfig,
    scaler: StandardScalerModel,
    previous: dict | None,
    next_number: int,
) -> dict:
    """Give every profile stable_id, name and segment_id (in place); return the matching
    report: previous_version, matched, appeared, vanished."""
    report: dict[str, Any] = {
        "previous_version": None,
        "matched": [],
        "appeared": [],
        "vanished": [],
    }
    taken: set[str] = set()
    pending = list(range(len(profiles)))
    if previous is not None:
        report["previous_version"] = previous["version"]
        old = previous["profiles"]
        old_logged = set(previous.get("log_features", []))
        logged = set(settings.log_features)
        features = list(settings.features)
        std = dict(zip(features, scaler.std.toArray().tolist(), strict=True))
        comparable = {f for f in features if (f in logged) == (f in old_logged)}

        def centroid(p: dict) -> dict:
            return {f: v for f, v in p.get("centroid", {}).items() if f in comparable}

        costs = match_distances(
            [centroid(p) for p in profiles], [centroid(p) for p in old], std=std
        )
        pairs = match_clusters(costs, settings.match_max_distance)
        matched_old = set()
        renamed = []
        for i, j, distance in pairs:
            profile = profiles[i]
            profile["stable_id"] = old[j]["stable_id"]
            old_base = old[j].get("base_name", old[j]["name"])
            if still_holds(old_base, profile["z"], profile["mean"]):
                profile["name"], profile["base_name"] = old[j]["name"], old_base
                taken.add(profile["name"])
            else:  # named after the other clusters keep theirs
                renamed.append(i)
            matched_old.add(j)
            pending.remove(i)
            report["matched"].append(
                {
                    "stable_id": old[j]["stable_id"],
                    "name": old[j]["name"],
                    "index": profile["index"],
                    "distance": rounded(distance),
                }
            )
        for i in renamed:
            _name(profiles[i], taken)
            entry = next(m for m in report["matched"] if m["index"] == profiles[i]["index"])
            entry["renamed_to"] = profiles[i]["name"]
        for j, p in enumerate(old):
            if j not in matched_old:
                nearest = float(np.min(costs[:, j])) if costs.shape[0] else math.inf
                report["vanished"].append(
                    {
                        "stable_id": p["stable_id"],
                        "name": p["name"],
                        "nearest_distance": rounded(nearest) if math.isfinite(nearest) else None,
                    }
                )
    for i in sorted(pending, key=lambda i: (-profiles[i]["size"], profiles[i]["index"])):
        profile = profiles[i]
        profile["stable_id"] = stable_id(next_number)
        next_number += 1
        _name(profile, taken)
        if previous is not None:
            report["appeared"].append(
                {"stable_id": profile["stable_id"], "name": profile["name"], "index": i}
            )
    for profile in profiles:
        profile["segment_id"] = segment_id(settings.model_name, profile["stable_id"])
    return report


def _name(profile: dict, taken: set[str]) -> None:
    """Give profile its name_cluster name (base_name) and a unique name (name)."""
    profile["base_name"] = name_cluster(profile["z"], profile["mean"])
    profile["name"] = unique_name(profile["base_name"], taken, profile["z"])
    taken.add(profile["name"])


def segment_id(model_name: str, cluster_id: str) -> str:
    """The segment id a cluster's members get in gold/segment_membership."""
    return f"cluster_{model_name}_{cluster_id}"
