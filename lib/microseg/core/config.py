"""Typed configuration: a YAML file (which may `extends:` a base file), then `--set` overrides.

Every model forbids unknown keys and is frozen, so a typo is an error that names the key and
the file it came from, never a silent default.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError

DEFAULT_CONF = "conf/local.yaml"
CONF_ENV_VAR = "MICROSEG_CONF"


class ConfigError(Exception):
    """A configuration or usage problem; the CLI exits with status 2."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> Any:
    """Accept `90s`, `30m`, `1h`, `7d`, `2w`, a number of seconds, or an ISO 8601 duration."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


UtcDatetime = Annotated[datetime, BeforeValidator(_utc)]


def _spark_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float) else value


SparkValue = Annotated[str, BeforeValidator(_spark_value)]


class SparkConfig(Strict):
    master: str | None = Field(
        "local[*]", description="Spark master; null leaves it to spark-submit --master."
    )
    app_name: str = "microseg"
    shuffle_partitions: int = Field(8, ge=1)
    delta_jars: str | None = Field(
        "~/.cache/microseg/jars",
        description="Folder for the Delta Lake JARs, filled from Maven Central on first start "
        "and used offline after; null when spark-submit --packages/--jars provides them.",
    )
    conf: dict[str, SparkValue] = Field(
        default_factory=dict, description="Any other Spark settings (values may be YAML scalars)."
    )
    log_config: str | None = Field(
        None,
        description="log4j2 configuration of the driver's Spark log (a relative path is read "
        "from the folder of the config file that sets it); null leaves Spark's default.",
    )


class LakeConfig(Strict):
    root: str = Field("lake", description="Lake root: a local folder, s3a://, abfss://, hdfs://.")


DEFAULT_EVENT_TYPES = (
    "page_view",
    "product_view",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "add_to_wishlist",
    "checkout_started",
    "purchase",
)


class IngestConfig(Strict):
    sources_dir: str = Field("conf/sources", description="Folder of per-source mapping files.")
    event_types: tuple[str, ...] = DEFAULT_EVENT_TYPES
    max_future_skew: Duration = Field(
        timedelta(hours=1), description="How far past the ingest time an event_time may lie."
    )
    min_event_time: UtcDatetime = Field(
        datetime(2000, 1, 1, tzinfo=timezone.utc),
        description="Events before this instant are impossible (epoch-zero bugs and the like).",
    )


class SessionsConfig(Strict):
    inactivity_timeout: Duration = Field(
        timedelta(minutes=30),
        description="A gap strictly longer than this starts a new session; an equal gap does not.",
    )
    max_session_length: Duration = Field(
        timedelta(hours=6), description="Longer visits are cut into pieces of this length."
    )
    lookback: Duration = Field(
        timedelta(hours=1),
        description="Incremental runs also re-read events ingested this long before the "
        "watermark (covers ingest runs that committed after a sessionize run started).",
    )


class FeaturesConfig(Strict):
    include: tuple[str, ...] | None = Field(
        None, description="Feature names to compute (see README); null or empty: all."
    )


class SegmentsConfig(Strict):
    file: str = Field("conf/segments.yaml", description="The segment rules (see README).")


class ExperimentsConfig(Strict):
    file: str = Field(
        "conf/experiments.yaml", description="The experiments (see README, Experiments)."
    )


class TriggersConfig(Strict):
    file: str = Field("conf/triggers.yaml", description="The trigger rules (see README, Triggers).")


class DestinationsConfig(Strict):
    file: str = Field(
        "conf/destinations.yaml", description="Where segment changes go (see README, activate)."
    )


class ClusterConfig(Strict):
    """Settings of `microseg cluster` (owned by lib/microseg/clustering.py).

    Feature names are checked against the features `features.include` selects when a job
    starts (clustering.check_config), since that needs both sections.
    """

    model_name: str = Field(
        "behavior",
        pattern=r"^[a-z][a-z0-9_]*$",
        description="Model name: registry key, model folder and segment id prefix "
        "(cluster_<model_name>_<stable id>).",
    )
    features: tuple[str, ...] = Field(
        (
            "orders_lifetime",
            "avg_order_value_lifetime",
            "sessions_90d",
            "avg_session_seconds_lifetime",
            "pages_per_session_lifetime",
            "cart_abandoned_sessions_lifetime",
            "days_since_last_event",
            "tenure_days",
            "campaign_session_share",
            "desktop_session_share",
        ),
        description="Number features of gold/user_features the model clusters on.",
    )
    log_features: tuple[str, ...] = Field(
        (
            "orders_lifetime",
            "avg_order_value_lifetime",
            "sessions_90d",
            "avg_session_seconds_lifetime",
            "cart_abandoned_sessions_lifetime",
        ),
        description="Skewed money and count features taken as log1p (a subset of features).",
    )

    class Population(Strict):
        active_within_days: float | None = Field(
            None,
            gt=0,
            description="Only users whose last event is at most this many days before the "
            "as-of (days_since_last_event); null: everyone.",
        )
        where: str | None = Field(
            None,
            description="A Spark SQL condition over gold/user_features columns a user must "
            'meet (e.g. "orders_lifetime > 0"); null: no condition.',
        )

    population: ClusterConfig.Population = Field(
        default_factory=lambda: ClusterConfig.Population(),
        description="Who the model is trained on and assigns: one filter for both jobs.",
    )
    algorithm: Literal["kmeans", "bisecting_kmeans", "gaussian_mixture"] = Field(
        "kmeans", description="pyspark.ml KMeans, BisectingKMeans or GaussianMixture."
    )
    silhouette: Literal["euclidean", "squared_euclidean", "cosine"] = Field(
        "euclidean",
        description="The silhouette that picks k and is reported: euclidean (as scikit-learn "
        "and the literature compute it, on a sample), or Spark's squared_euclidean or cosine "
        "(on all rows of the search).",
    )
    silhouette_sample_rows: int = Field(
        5_000,
        ge=100,
        description="Rows the euclidean silhouette is computed on (pairwise distances on the "
        "driver: memory grows with the square).",
    )
    k_min: int = Field(3, ge=2, description="Smallest number of clusters tried.")
    k_max: int = Field(10, ge=2, description="Largest number of clusters tried (>= k_min).")
    pca_components: int | None = Field(
        None, ge=1, description="Project the scaled features on this many components; null: off."
    )
    search_sample_rows: int = Field(
        50_000, ge=100, description="The k search fits on a random sample of about this many rows."
    )
    max_iter: int = Field(40, ge=1, description="KMeans maximum iterations.")
    init_steps: int = Field(2, ge=1, description="k-means|| initialization steps.")
    seed: int = Field(42, description="Seed of sampling and initialization.")
    match_max_distance: float = Field(
        1.0,
        gt=0,
        description="Largest RMS distance (in standard deviations per feature) at which a new "
        "cluster inherits a previous cluster's stable id.",
    )


class PropensityConfig(Strict):
    """Settings of `microseg propensity` (owned by lib/microseg/propensity.py)."""

    class Target(Strict):
        kind: Literal["purchase", "churn"] = Field(
            description="purchase: buys in [T, T + horizon); churn: a prior buyer who does not."
        )
        horizon: Duration = Field(description="Length of the label window after T.")

    class Grid(Strict):
        max_depth: tuple[int, ...] = Field((2, 3), min_length=1, description="GBT maxDepth.")
        max_iter: tuple[int, ...] = Field((40,), min_length=1, description="GBT trees.")
        step_size: tuple[float, ...] = Field((0.1,), min_length=1, description="GBT stepSize.")

    targets: dict[str, PropensityConfig.Target] = Field(
        default_factory=lambda: {
            "purchase_7d": PropensityConfig.Target(kind="purchase", horizon=timedelta(days=7)),
            "churn_30d": PropensityConfig.Target(kind="churn", horizon=timedelta(days=30)),
        },
        description="Model name -> what it predicts; the name is --target and the model name.",
    )
    features: tuple[str, ...] | None = Field(
        None, description="Numeric features the models use; null: every numeric feature computed."
    )
    snapshots: int = Field(
        4, ge=2, description="Training as-of snapshots; the latest one fits the calibration."
    )
    snapshot_interval: Duration = Field(
        timedelta(days=7), description="Time between two training snapshots."
    )
    grid: PropensityConfig.Grid = Field(
        default_factory=lambda: PropensityConfig.Grid(), description="Hyperparameters tried."
    )
    validation: Literal["cross_validation", "train_validation_split"] = Field(
        "train_validation_split",
        description="How the grid point is chosen: one split by user, or folds by user.",
    )
    train_ratio: float = Field(
        0.75, gt=0, lt=1, description="train_validation_split: share of the users that fit."
    )
    folds: int = Field(3, ge=2, description="cross_validation: folds (all rows of a user in one).")
    class_weights: Literal["balanced", "none"] = Field(
        "balanced", description="balanced: each class weighs half of the fit rows."
    )
    metric: Literal["areaUnderPR", "areaUnderROC"] = Field(
        "areaUnderPR", description="What the grid search maximizes."
    )
    top_share: float = Field(
        0.1, gt=0, lt=1, description="Share of users in a target's segment (and for lift)."
    )
    calibration: Literal["isotonic"] = Field(
        "isotonic", description="Calibration of the GBT score on the held-out snapshot."
    )
    serve: Literal["auto", "gbt", "logistic_regression"] = Field(
        "auto",
        description="The model a training saves and scores with. auto: the GBT when it beats "
        "the logistic regression on propensity.metric on the validation users (the grid "
        "search's split or folds), else the logistic regression; or one of them.",
    )
    reasons: int = Field(
        3,
        ge=0,
        le=20,
        description="Per scored user, the features with the largest TreeSHAP values kept in "
        "gold/propensity_scores.reasons; 0: no explanations.",
    )
    importance_rows: int = Field(
        10_000,
        ge=100,
        description="Evaluation rows (a seeded sample) the global SHAP importances are "
        "averaged over at training.",
    )
    seed: int = Field(42, description="Seed of the GBT, the split and the folds.")


class HealthConfig(Strict):
    """Settings of `microseg health` (lib/microseg/segments/health.py)."""

    window: int = Field(
        12, ge=3, description="Previous runs of a segment the robust baseline is fitted on."
    )
    min_history: int = Field(
        4, ge=3, description="Runs a segment needs before it gets anomaly alerts."
    )
    threshold: float = Field(
        4.0,
        gt=0,
        description="Alert when the value is this many robust standard deviations (1.4826 x "
        "the median absolute deviation from the Theil-Sen trend) from the forecast.",
    )
    min_relative_change: float = Field(
        0.3, ge=0, description="...and at least this share away from the forecast."
    )
    min_size_change: int = Field(
        10, ge=0, description="...and, for sizes, at least this many users away."
    )
    alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Significance of the chi-square tests that a segment differs from its "
        "parent and siblings.",
    )
    min_members: int = Field(
        30, ge=1, description="Segments smaller than this are not tested for distinctness."
    )


class PipelineInput(Strict):
    source: str = Field(description="Source mapping name (conf/sources/NAME.yaml).")
    path: str = Field(description="File, folder (recursive) or glob to ingest new files from.")
    format: Literal["json", "csv", "parquet"] | None = None


class PipelineConfig(Strict):
    inputs: tuple[PipelineInput, ...] = Field(
        (), description="What `microseg pipeline` ingests (only files not ingested yet)."
    )


class StreamConfig(Strict):
    """Settings of `microseg stream` (owned by lib/microseg/streaming.py)."""

    class Kafka(Strict):
        """stream.source kafka: a topic ingested into bronze by a second streaming query."""

        bootstrap_servers: str = Field(
            "localhost:9092", description="Kafka brokers, host:port[,host:port...]."
        )
        topic: str = Field("events", description="Topic whose record values are the events.")
        mapping: str = Field(
            "synthetic",
            description="Source mapping (ingest.sources_dir) of the record values, as for "
            "`microseg ingest --source`; only its json format is read from Kafka.",
        )
        starting_offsets: Literal["earliest", "latest"] = Field(
            "earliest", description="Where a new checkpoint starts reading the topic."
        )
        max_offsets_per_trigger: int | None = Field(
            None, ge=1, description="At most this many records per micro-batch (null: all)."
        )
        options: dict[str, str] = Field(
            default_factory=dict,
            description="More Kafka reader options, e.g. kafka.security.protocol "
            "(passed to Spark's Kafka source as they are).",
        )

    source: Literal["delta", "kafka"] = Field(
        "delta",
        description="Where live events come from: delta reads bronze/events as a Delta "
        "stream; kafka also runs a query that ingests stream.kafka.topic into bronze/events "
        "and bronze/quarantine with the batch validation.",
    )
    kafka: Kafka = Kafka()
    checkpoint: str | None = Field(
        None,
        description="Checkpoint folder of the stream's one sink; null: "
        "<lake.root>/_checkpoints/stream. A new segment catalog needs a new folder.",
    )
    trigger_interval: Duration = Field(
        timedelta(seconds=1),
        description="Processing-time trigger: a micro-batch at most this often.",
    )
    history_interval: Duration = Field(
        timedelta(seconds=5),
        description="How often the history query turns the stream's change rows into "
        "intervals of gold/segment_membership (off the hot path).",
    )
    watermark_delay: Duration = Field(
        timedelta(minutes=10),
        description="Events older than the latest event time minus this are late: the stream "
        "drops and counts them (the next batch run uses them); time-driven exits fire once "
        "the watermark passes them.",
    )
    state_partitions: int = Field(
        8,
        ge=1,
        description="Shuffle partitions of the per-user state; fixed by the first run of a "
        "checkpoint (later values are ignored for that checkpoint).",
    )
    state_store: Literal["hdfs", "rocksdb"] = Field(
        "rocksdb",
        description="State store provider (fixed by the first run of a checkpoint): rocksdb "
        "keeps large state off the JVM heap; hdfs is Spark's in-memory default.",
    )
    state_api: Literal[
        "apply_in_pandas_with_state", "transform_with_state_in_pandas", "transform_with_state"
    ] = Field(
        "transform_with_state",
        description="Spark API of the per-user state (fixed by the first run of a checkpoint): "
        "the state API v2's transformWithState (rows) or transformWithStateInPandas, or "
        "applyInPandasWithState (bench/state_api_bench.py compares them).",
    )
    max_files_per_trigger: int | None = Field(
        None, ge=1, description="Delta source: at most this many new files per micro-batch."
    )
    segments: tuple[str, ...] | None = Field(
        None,
        description="Segment ids the stream keeps; null: every streaming-capable segment whose "
        "rule has an event condition (feature-only rules change with snapshots, not events).",
    )


class SqlConfig(Strict):
    """Tables by name for SQL and BI tools (`microseg register`, `microseg sql-server`)."""

    metastore_dir: str | None = Field(
        "metastore",
        description="Folder of a local Hive metastore (Derby) shared by `microseg register` and "
        "the Thrift Server; null: the catalog spark.conf configures (external Hive metastore, "
        "Glue, Unity Catalog, ...).",
    )
    database_prefix: str = Field(
        "",
        pattern=r"^[a-z0-9_]*$",
        description="Prefix of the per-layer databases: '' gives gold.segment_membership, "
        "'shop_' gives shop_gold.segment_membership.",
    )
    host: str = Field("127.0.0.1", description="Address the Thrift Server listens on.")
    port: int = Field(10000, ge=1, le=65535, description="Port of the Thrift Server.")


class ServingConfig(Strict):
    """The online store of current membership and `microseg serve` (README "Serving")."""

    store: Literal["sqlite", "redis"] = Field(
        "sqlite",
        description="Online store of current membership, written by batch and stream: sqlite "
        "(one file, WAL; the embedded default) or redis (production).",
    )
    sqlite_path: str | None = Field(
        None, description="The SQLite file; null: <lake.root>/_online/segments.sqlite."
    )
    redis_url: str = Field(
        "redis://localhost:6379/0", description="serving.store redis: the server and database."
    )
    redis_prefix: str = Field("microseg:", description="Prefix of every Redis key microseg writes.")
    host: str = Field("127.0.0.1", description="Address `microseg serve` listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of `microseg serve`.")


class ConsentConfig(Strict):
    """How consent (silver/consent) is honoured; README "Consent"."""

    analytics_unknown: Literal["granted", "denied"] = Field(
        "granted",
        description="Analytics consent of a user with no consent_analytics signal before the "
        "as-of time. Users whose analytics consent does not hold get no features row, so no "
        "segment, cluster or score.",
    )
    marketing_unknown: Literal["granted", "denied"] = Field(
        "denied",
        description="Marketing consent of a user with no consent_marketing signal before the "
        "as-of time.",
    )
    marketing_tags: list[str] = Field(
        default_factory=list,
        description="Rule segments carrying any of these tags are marketing segments: their "
        "members are only users whose marketing consent holds at the run's as-of time.",
    )


class PrivacyConfig(Strict):
    pseudonymization_key: SecretStr | None = Field(
        None, description="Key of the keyed hash for personal fields; prefer the env variable."
    )
    pseudonymization_key_env: str = "MICROSEG_PSEUDONYMIZATION_KEY"
    consent: ConsentConfig = ConsentConfig()
    erasure_retention: Duration = Field(
        timedelta(days=7),
        description="VACUUM retention of `microseg forget` and `microseg maintain`: the files "
        "a delete replaced stay readable (time travel, running readers) this long, then the "
        "next forget or maintain deletes them. The erasure deadline is this plus the interval "
        "of your maintain schedule; below 7 days a reader of an older version may fail.",
    )

    def key(self) -> bytes | None:
        from_env = os.environ.get(self.pseudonymization_key_env)
        if from_env:
            return from_env.encode()
        if self.pseudonymization_key is not None:
            return self.pseudonymization_key.get_secret_value().encode()
        return None


class MaintainConfig(Strict):
    """`microseg maintain`: the tables' upkeep and the retention policy."""

    retention: Duration | None = Field(
        None,
        description="Delete events older than this, and what derives from them (sessions, "
        "daily rollups, features, closed membership intervals, changes, scores, quarantine), "
        "at each maintain; null keeps everything.",
    )
    log_retention: Duration = Field(
        timedelta(days=30),
        description="delta.logRetentionDuration of every table: how long its transaction log "
        "keeps old versions (time travel); whole days.",
    )
    checkpoint_interval: int = Field(
        10, ge=1, description="delta.checkpointInterval: a log checkpoint every this many commits."
    )


class GenerateConfig(Strict):
    seed: int = 42
    users: int = Field(2000, ge=1)
    start: UtcDatetime = datetime(2026, 9, 1, tzinfo=timezone.utc)
    days: int = Field(60, ge=1)
    format: Literal["json", "parquet"] = "json"
    output: str = "data/generated"
    malformed_share: float = Field(0.0, ge=0, le=0.5)
    duplicate_share: float = Field(0.0, ge=0, le=0.5)
    late_share: float = Field(0.0, ge=0, le=0.5)
    invalid_share: float = Field(0.0, ge=0, le=0.5)


class Config(Strict):
    spark: SparkConfig = SparkConfig()
    lake: LakeConfig = LakeConfig()
    ingest: IngestConfig = IngestConfig()
    sessions: SessionsConfig = SessionsConfig()
    features: FeaturesConfig = FeaturesConfig()
    segments: SegmentsConfig = SegmentsConfig()
    experiments: ExperimentsConfig = ExperimentsConfig()
    destinations: DestinationsConfig = DestinationsConfig()
    triggers: TriggersConfig = TriggersConfig()
    pipeline: PipelineConfig = PipelineConfig()
    cluster: ClusterConfig = ClusterConfig()
    propensity: PropensityConfig = PropensityConfig()
    health: HealthConfig = HealthConfig()
    stream: StreamConfig = StreamConfig()
    sql: SqlConfig = SqlConfig()
    serving: ServingConfig = ServingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    maintain: MaintainConfig = MaintainConfig()
    generate: GenerateConfig = GenerateConfig()


# --------------------------------------------------------------------------------------
# loading


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, not {type(data).__name__}")
    return data


def load_model_file(path: Path, model: type[BaseModel], setting: str):
    """A YAML file of the project (experiments, destinations) checked by a pydantic model;
    each problem names the file and the key. `setting`: the config key naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({setting})")
    try:
        return model.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, {(): str(path)})) from None


def _merge(base: dict, overlay: dict, origin: str, provenance: dict, prefix: tuple = ()) -> dict:
    """Deep-merge overlay into base; remember which file set each leaf (for error messages)."""
    merged = dict(base)
    for key, value in overlay.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value, origin, provenance, path)
        else:
            merged[key] = value
        provenance[path] = origin
    return merged


# Files named relative to the config file that names them (like `extends:`), so that the
# command finds them from any directory.
BESIDE_CONFIG = (("spark", "log_config"),)


def _resolve_beside(data: dict[str, Any], path: Path) -> None:
    for section, key in BESIDE_CONFIG:
        values = data.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            values[key] = str(path.resolve().parent / value)


def _load_chain(path: Path, provenance: dict, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle")
    data = _read_yaml(path)
    _resolve_beside(data, path)
    parent = data.pop("extends", None)
    base: dict[str, Any] = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: `extends` must be a file name")
        base = _load_chain(path.parent / parent, provenance, (*seen, resolved))
    return _merge(base, data, str(path), provenance)


def _set_path(model: type[BaseModel], parts: list[str], assignment: str) -> tuple[str, ...]:
    """Split a dotted --set key along the model's nesting; dict-valued fields take the rest."""
    path: list[str] = []
    current: Any = model
    while parts:
        name = parts.pop(0)
        fields = getattr(current, "model_fields", None)
        if fields is None or name not in fields:
            known = ", ".join(sorted(fields)) if fields else ""
            where = ".".join(path) or "top level"
            raise ConfigError(
                f"--set {assignment}: unknown key '{name}' under {where}"
                + (f" (known: {known})" if known else "")
            )
        path.append(name)
        annotation = fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
            continue
        if parts and getattr(annotation, "__origin__", None) is dict:
            path.append(".".join(parts))
            parts = []
        elif parts:
            raise ConfigError(f"--set {assignment}: '{'.'.join(path)}' has no sub-keys")
    return tuple(path)


def parse_overrides(assignments: list[str], provenance: dict) -> dict[str, Any]:
    overlay: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {assignment}: expected key=value")
        path = _set_path(Config, key.strip().split("."), assignment)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = overlay
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _merge({}, overlay, "--set", provenance)


def _origin(provenance: dict, loc: tuple) -> str:
    parts = tuple(str(p) for p in loc)
    for end in range(len(parts), -1, -1):
        if parts[:end] in provenance:
            return provenance[parts[:end]]
    return "defaults"


def load_config(conf_path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load the config file (following `extends:`), apply `--set` overrides and validate."""
    provenance: dict[tuple, str] = {}
    data: dict[str, Any] = {}
    if conf_path is not None:
        data = _load_chain(Path(conf_path), provenance)
    data = _merge(data, parse_overrides(list(overrides), provenance), "--set", {})
    return validate_config(data, provenance)


def validate_config(data: dict[str, Any], provenance: dict[tuple, str] | None = None) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, provenance or {})) from exc


def describe_validation_error(exc: ValidationError, provenance: dict[tuple, str]) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        origin = _origin(provenance, err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"{origin}: unknown key '{key}'")
        else:
            problems.append(f"{origin}: key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(problems)


def resolve_conf_path(explicit: str | None) -> str:
    return explicit or os.environ.get(CONF_ENV_VAR) or DEFAULT_CONF
