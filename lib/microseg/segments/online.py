"""Batch runs -> the online store: after a run writes gold/segment_membership, its scope's
current members replace the scope's members in the store (only what differs is written),
and silver/identity_map's stitching replaces the store's aliases.

Each sync carries the Delta version it read as its batch marker, so a sync of a version
the store already has is skipped, and a run that failed between the Delta commit and the
store write is completed by the next sync of the scope (any later run or `microseg segments
sync`)."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from microseg.core import lake
from microseg.core.config import Config
from microseg.core.failpoints import durable
from microseg.core.online_store import Member, OnlineStore, open_store
from microseg.segments.membership import Scope, scope_history

ALIASES_WRITER = "batch:aliases"


def batch_writer(scope: Scope) -> str:
    return f"batch:{scope.source}:{scope.name}"


@dataclass(frozen=True)
class SyncStats:
    upserted: int
    removed: int
    skipped: bool  # the store already had this version


def sync_scope(spark: SparkSession, root: str, scope: Scope, store: OnlineStore) -> SyncStats:
    """Make the store's members of `scope` equal the scope's current intervals."""
    version = lake.table_version(spark, root, lake.SEGMENT_MEMBERSHIP)
    writer = batch_writer(scope)
    marker = store.marker(writer)
    if version is None or (marker is not None and marker.batch >= version):
        return SyncStats(0, 0, True)
    current_df = (
        scope_history(spark, root, scope)
        .filter("is_current")
        .select(
            "user_key",
            "segment_id",
            "definition_version",
            "score",
            F.unix_micros("valid_from").alias("entered_at"),
        )
    )
    wanted = {
        (r.user_key, r.segment_id): Member(
            r.user_key,
            r.segment_id,
            scope.source,
            scope.name,
            r.definition_version,
            r.score,
            r.entered_at,
        )
        for r in current_df.toLocalIterator()
    }
    have = store.scope_members(scope.source, scope.name)
    upserts = [m for pair, m in wanted.items() if have.get(pair) != m]
    removes = [pair for pair in have if pair not in wanted]
    store.apply_batch(writer, version, upserts, removes, source=scope.source, scope=scope.name)
    durable(f"store {writer}")
    return SyncStats(len(upserts), len(removes), False)


def sync_aliases(spark: SparkSession, root: str, store: OnlineStore) -> int | None:
    """Replace the store's aliases with silver/identity_map's (anonymous id -> user key);
    the number of aliases, or None when the store has this version already or there is no
    map."""
    version = lake.table_version(spark, root, lake.IDENTITY_MAP)
    marker = store.marker(ALIASES_WRITER)
    if version is None or (marker is not None and marker.batch >= version):
        return None
    rows = lake.read_table(spark, root, lake.IDENTITY_MAP).select("anonymous_id", "user_key")
    aliases = {r.anonymous_id: r.user_key for r in rows.toLocalIterator()}
    store.set_aliases(ALIASES_WRITER, version, aliases)
    durable("store aliases")
    return len(aliases)


def publish(spark: SparkSession, cfg: Config, scope: Scope) -> SyncStats:
    """After a batch run of `scope`: sync the scope and the aliases into serving.store."""
    store = open_store(cfg)
    try:
        stats = sync_scope(spark, cfg.lake.root, scope, store)
        sync_aliases(spark, cfg.lake.root, store)
        return stats
    finally:
        store.close()
