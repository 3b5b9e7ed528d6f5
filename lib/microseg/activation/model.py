"""The destination file (conf/destinations.yaml): where segment changes go (a webhook, file
exports), which segments and fields each gets. `load_destinations` checks it and names every
problem with its file and key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from microseg.core.config import Config, ConfigError, Duration, Strict, load_model_file

_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"

# what a change row can carry to a destination (gold/segment_changes columns)
CHANGE_FIELDS = (
    "user_key",
    "segment_id",
    "source",
    "scope",
    "change",
    "reason",
    "changed_at",
    "definition_version",
)


class _Destination(Strict):
    id: str = Field(pattern=_ID, max_length=100)
    segments: tuple[str, ...] = Field((), description="Segment ids whose changes go")
    triggers: tuple[str, ...] = Field(
        (),
        description="Trigger ids (conf/triggers.yaml) whose firings go: a firing is sent as a "
        "change `trigger` with segment_id the trigger id and changed_at its fire time",
    )
    fields: tuple[str, ...] = Field(
        ("user_key", "segment_id", "change", "changed_at"),
        description=f"Fields of each change sent, of: {', '.join(CHANGE_FIELDS)}",
    )
    consent: Literal["marketing", "none"] = Field(
        "marketing",
        description="marketing: only changes of users whose marketing consent holds at the "
        "change's time go (others are recorded as no_consent); none: no gate (operational "
        "destinations only)",
    )

    @model_validator(mode="after")
    def _fields(self):
        if not self.segments and not self.triggers:
            raise ValueError("name the segments and/or the triggers whose changes go")
        unknown = [f for f in self.fields if f not in CHANGE_FIELDS]
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(CHANGE_FIELDS)}"
            )
        return self


class Webhook(_Destination):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://", description="Receives POSTs of JSON batches")
    batch_size: int = Field(100, ge=1, le=10000, description="Changes per POST")
    max_attempts: int = Field(6, ge=1, le=50, description="Tries per batch in one run")
    backoff: Duration = Field(
        timedelta(seconds=0.5), description="Wait before the first retry; doubles each retry"
    )
    max_backoff: Duration = Field(timedelta(seconds=30), description="Longest wait")
    timeout: Duration = Field(timedelta(seconds=10), description="Per request")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra headers; a value `env:NAME` is read from environment variable NAME",
    )


class FileExport(_Destination):
    type: Literal["file"]
    path: str = Field(description="Folder (local or a Hadoop file system URI) of the exports")
    format: Literal["csv", "parquet"] = "csv"
    snapshot: bool = Field(
        False,
        description="Also write each run the current members of its segments: "
        "<path>/<id>/snapshot-<run id>/ (user_key, segment_id, entered_at), consent-gated",
    )


class KafkaTopic(_Destination):
    type: Literal["kafka"]
    bootstrap_servers: str = Field(description="host:port[,host:port...] of the brokers")
    topic: str = Field(min_length=1)
    batch_size: int = Field(1000, ge=1, le=1_000_000, description="Changes per write")
    options: dict[str, str] = Field(
        default_factory=dict,
        description="Kafka producer settings for Spark's writer, e.g. kafka.security.protocol",
    )


Destination = Annotated[Webhook | FileExport | KafkaTopic, Field(discriminator="type")]


class DestinationFile(Strict):
    destinations: tuple[Destination, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> DestinationFile:
        ids = [d.id for d in self.destinations]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"destination ids must be unique: {', '.join(twice)} repeated")
        return self

    def chosen(self, ids: list[str] | None) -> list:
        if not ids:
            return list(self.destinations)
        known = {d.id: d for d in self.destinations}
        missing = [i for i in ids if i not in known]
        if missing:
            raise ConfigError(
                f"no destination {', '.join(missing)} (ids: {', '.join(known) or 'none'})"
            )
        return [known[i] for i in ids]


def load_destinations(cfg: Config, path: str | Path | None = None) -> DestinationFile:
    return load_model_file(
        Path(path or cfg.destinations.file), DestinationFile, "destinations.file"
    )
