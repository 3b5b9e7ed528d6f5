"""The experiment file (conf/experiments.yaml): what each experiment targets, its variants,
weights, holdout, coverage and metrics. `load_experiments` checks it and names every problem
with its file and key."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from microseg.core.config import (
    Config,
    ConfigError,
    Duration,
    Strict,
    UtcDatetime,
    load_model_file,
)
from microseg.experiments.hashing import bucket_ranges

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


def utc(at: datetime) -> datetime:
    """A naive time is UTC."""
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


class Bandit(Strict):
    floor: float = Field(
        0.05, ge=0, le=0.5, description="Smallest weight any variant keeps, so none starves."
    )
    draws: int = Field(20000, ge=100, le=1_000_000, description="Monte Carlo draws per update.")


class Metrics(Strict):
    window: Duration = Field(
        timedelta(days=14),
        description="A user's outcome counts sessions from the first exposure for this long.",
    )
    pre_period: Duration = Field(
        timedelta(days=28),
        description="CUPED covariate: the same metric in this period before assignment.",
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level of tests and CIs.")
    srm_threshold: float = Field(
        0.001, gt=0, lt=0.5, description="Sample ratio mismatch is flagged below this p-value."
    )


class Experiment(Strict):
    id: str = Field(pattern=_ID, max_length=100)
    name: str | None = None
    description: str | None = None
    segment: str = Field(description="Target segment id: its members as of assignment time.")
    start: UtcDatetime
    end: UtcDatetime | None = None
    variants: tuple[str, ...] = Field(min_length=2, description="The first is the control.")
    weights: tuple[float, ...] | None = Field(
        None, description="Share of covered users per variant (default: equal); sums to 1."
    )
    coverage: float = Field(1.0, ge=0, le=1, description="Share of eligible users included.")
    holdout: float = Field(
        0.0, ge=0, lt=1, description="Share of eligible users kept out of every variant."
    )
    seed: str | None = Field(None, description="Hash seed (default: the experiment id).")
    hash_version: Literal[1, 2] = 2
    namespace: tuple[str, float, float] | None = Field(
        None, description="[id, start, end]: only users whose namespace hash is in [start, end)."
    )
    allocation: Literal["fixed", "bandit"] = "fixed"
    bandit: Bandit = Bandit()
    metrics: Metrics = Metrics()

    @field_validator("variants")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("variant names must be distinct")
        if "holdout" in value:
            raise ValueError("'holdout' is reserved for the holdout group")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        if self.weights is not None:
            if len(self.weights) != len(self.variants):
                raise ValueError(
                    f"weights has {len(self.weights)} entries for {len(self.variants)} variants"
                )
            if any(w < 0 for w in self.weights) or abs(sum(self.weights) - 1) > 0.01:
                raise ValueError(f"weights must be >= 0 and add up to 1 (got {self.weights})")
        if self.end is not None and self.end <= self.start:
            raise ValueError("end must be after start")
        if self.namespace is not None and not 0 <= self.namespace[1] <= self.namespace[2] <= 1:
            raise ValueError("namespace range must satisfy 0 <= start <= end <= 1")
        return self

    @property
    def hash_seed(self) -> str:
        return self.seed or self.id

    @property
    def control(self) -> str:
        return self.variants[0]

    def active_at(self, at: datetime) -> bool:
        at = utc(at)
        return self.start <= at and (self.end is None or at < self.end)

    def fixed_weights(self) -> tuple[float, ...]:
        return self.weights or tuple(1 / len(self.variants) for _ in self.variants)

    def ranges(self, weights: tuple[float, ...] | None = None) -> list[tuple[float, float]]:
        """GrowthBook's bucket ranges of the variants for these weights (default: the file's)."""
        return bucket_ranges(len(self.variants), self.coverage, weights or self.fixed_weights())

    def version(self) -> str:
        """Hash of what decides assignment; a change of it is reported, never re-assigns."""
        decisive = self.model_dump(
            mode="json",
            include={"segment", "variants", "weights", "coverage", "holdout", "seed"}
            | {"hash_version", "namespace", "allocation"},
        )
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()[:12]


class ExperimentFile(Strict):
    experiments: tuple[Experiment, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> ExperimentFile:
        ids = [e.id for e in self.experiments]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"experiment ids must be unique: {', '.join(twice)} repeated")
        return self

    def __getitem__(self, experiment_id: str) -> Experiment:
        for experiment in self.experiments:
            if experiment.id == experiment_id:
                return experiment
        raise ConfigError(
            f"no experiment '{experiment_id}' (ids: "
            f"{', '.join(e.id for e in self.experiments) or 'none'})"
        )


def load_experiments(cfg: Config, path: str | Path | None = None) -> ExperimentFile:
    return load_model_file(Path(path or cfg.experiments.file), ExperimentFile, "experiments.file")
