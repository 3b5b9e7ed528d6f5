"""The online store: current segment membership per user, for request-time answers.

Batch runs and the stream write it; `microseg serve` reads it; the Delta tables keep the
history. Two implementations with one interface: SQLite (one file in WAL mode, the embedded
default) and Redis (`serving.store: redis`).

What it holds:
* members: per user key, the segments they are in now, each under its writer's scope
  (source: rule, cluster, propensity, stream; scope: the rule file, model or target), with
  the definition version, the score and the time they entered;
* batch markers: per writer, the last batch it applied, and that batch's payload (the stream
  keeps the batch's change rows there until they are in Delta). A batch is applied with its
  marker in one transaction, and a batch at or below the marker is refused as a whole: a
  replayed micro-batch or a re-run changes nothing;
* aliases: anonymous id -> the user key it is stitched to (silver/identity_map), so that an
  anonymous id that logged in answers with the user's segments;
* streamed segments: the segment ids the stream keeps; for those only the stream's rows
  are current (it is fresher than the batch run of the same rules).

Times are integer microseconds since the epoch (UTC).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from microseg.core.config import Config


@dataclass(frozen=True)
class Member:
    """One current membership."""

    user_key: str
    segment_id: str
    source: str
    scope: str
    definition_version: str
    score: float | None
    entered_at: int  # microseconds since the epoch

    @property
    def pair(self) -> tuple[str, str]:
        return (self.user_key, self.segment_id)


@dataclass(frozen=True)
class Variant:
    """One experiment assignment (insert-once: a user keeps the first variant)."""

    user_key: str
    experiment_id: str
    variant: str
    assigned_at: int  # microseconds since the epoch


@dataclass(frozen=True)
class Marker:
    batch: int
    payload: str | None


@dataclass(frozen=True)
class SegmentSize:
    segment_id: str
    source: str
    scope: str
    size: int


class OnlineStore(Protocol):
    """What the writers and the API use (SqliteStore and RedisStore implement it)."""

    location: str

    def marker(self, writer: str) -> Marker | None: ...

    def apply_batch(
        self,
        writer: str,
        batch: int,
        upserts: Iterable[Member],
        removes: Iterable[tuple[str, str]],
        *,
        source: str,
        scope: str,
        payload: str | None = None,
    ) -> bool:
        """Upsert members and remove (user_key, segment_id) pairs of one scope, and set the
        writer's marker to `batch`, atomically; False (and nothing written) when the marker is
        already at or past `batch`."""
        ...

    def scope_members(
        self, source: str, scope: str, user_keys: Iterable[str] | None = None
    ) -> dict[tuple[str, str], Member]:
        """The scope's current members (of `user_keys` only, when given)."""
        ...

    def user_segments(self, user_key: str) -> list[Member]: ...

    def sizes(self) -> list[SegmentSize]: ...

    def resolve(self, anonymous_id: str) -> str | None: ...

    def set_aliases(self, writer: str, batch: int, aliases: dict[str, str]) -> bool:
        """Replace every alias, with the writer's marker, atomically (as apply_batch)."""
        ...

    def streamed(self) -> set[str]: ...

    def add_variants(self, writer: str, batch: int, variants: Iterable[Variant]) -> bool:
        """Add the assignments a user does not have yet (an existing one is kept), and set
        the writer's marker to `batch`, atomically (as apply_batch)."""
        ...

    def user_variants(self, user_key: str) -> list[Variant]: ...

    def reset_scope(self, source: str, scope: str, segment_ids: list[str], writer: str) -> None:
        """Remove the scope's members and the writer's marker; for the stream, record
        `segment_ids` as the streamed segments."""
        ...

    def forget(self, user_keys: set[str], anonymous_ids: set[str]) -> int:
        """Erase the people: their members, their aliases, and their rows in the writers'
        payloads, with nothing of them left in the store's files; the entries removed."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


def open_store(cfg: Config) -> OnlineStore:
    """The store serving.store names (created if it does not exist)."""
    if cfg.serving.store == "redis":
        return RedisStore(cfg.serving.redis_url, cfg.serving.redis_prefix)
    return SqliteStore(sqlite_path(cfg))


def sqlite_path(cfg: Config) -> str:
    if cfg.serving.sqlite_path:
        return cfg.serving.sqlite_path
    root = cfg.lake.root
    if root.startswith("file:"):
        root = root[len("file:") :]
    if "://" in root:
        raise ValueError(
            f"lake.root {root} is not a local folder: set serving.sqlite_path to a local file, "
            "or serving.store: redis"
        )
    return os.path.join(os.path.abspath(root), "_online", "segments.sqlite")


def _scrub_payload(payload: str | None, ids: set[str]) -> tuple[str | None, int]:
    """A writer's payload (JSON rows) without the rows that hold any of `ids`; and how many
    rows went."""
    if not payload:
        return payload, 0
    rows = json.loads(payload)
    kept = [row for row in rows if not any(v in ids for v in row if isinstance(v, str))]
    if len(kept) == len(rows):
        return payload, 0
    return json.dumps(kept, separators=(",", ":")), len(rows) - len(kept)


# --------------------------------------------------------------------------------------
# SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS members (
    user_key TEXT NOT NULL, source TEXT NOT NULL, scope TEXT NOT NULL,
    segment_id TEXT NOT NULL, definition_version TEXT NOT NULL, score REAL,
    entered_at INTEGER NOT NULL,
    PRIMARY KEY (user_key, source, scope, segment_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_scope ON members (source, scope, segment_id);
CREATE TABLE IF NOT EXISTS batches (
    writer TEXT PRIMARY KEY, batch INTEGER NOT NULL, payload TEXT
);
CREATE TABLE IF NOT EXISTS aliases (
    anonymous_id TEXT PRIMARY KEY, user_key TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streamed (segment_id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS variants (
    user_key TEXT NOT NULL, experiment_id TEXT NOT NULL, variant TEXT NOT NULL,
    assigned_at INTEGER NOT NULL,
    PRIMARY KEY (user_key, experiment_id)
) WITHOUT ROWID;
"""


class SqliteStore:
    """One SQLite file in WAL mode: readers never wait for the writer, and a commit is
    durable once it returns (synchronous=FULL). One connection per thread."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.location = path
        self._readonly = readonly
        self._local = threading.local()
        if not readonly:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            db = self._db()
            db.executescript(_SCHEMA)
        elif not os.path.exists(path):
            raise FileNotFoundError(
                f"online store {path} does not exist yet: run `microseg segments run` or "
                "`microseg stream` first"
            )

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if self._readonly:
                db = sqlite3.connect(f"file:{self.location}?mode=ro", uri=True, timeout=30)
            else:
                db = sqlite3.connect(self.location, timeout=30, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                # a deleted row's bytes are overwritten, not left in the file's free space
                db.execute("PRAGMA secure_delete=ON")
            self._local.db = db
        return db

    def marker(self, writer: str) -> Marker | None:
        row = (
            self._db()
            .execute("SELECT batch, payload FROM batches WHERE writer = ?", (writer,))
            .fetchone()
        )
        return None if row is None else Marker(row[0], row[1])

    def forget(self, user_keys, anonymous_ids):
        keys = sorted(user_keys)
        anons = sorted(anonymous_ids)
        db = self._begin()
        try:
            removed = 0
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                marks = ",".join("?" * len(chunk))
                removed += db.execute(
                    f"DELETE FROM members WHERE user_key IN ({marks})", chunk
                ).rowcount
                removed += db.execute(
                    f"DELETE FROM aliases WHERE user_key IN ({marks})", chunk
                ).rowcount
                removed += db.execute(
                    f"DELETE FROM variants WHERE user_key IN ({marks})", chunk
                ).rowcount
            for i in range(0, len(anons), 500):
                chunk = anons[i : i + 500]
                removed += db.execute(
                    f"DELETE FROM aliases WHERE anonymous_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                ).rowcount
            for writer, payload in db.execute("SELECT writer, payload FROM batches").fetchall():
                kept, dropped = _scrub_payload(payload, user_keys | anonymous_ids)
                if dropped:
                    removed += dropped
                    db.execute("UPDATE batches SET payload = ? WHERE writer = ?", (kept, writer))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        # Deleted rows stay in free pages and in the write-ahead log until these rewrite them
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def _begin(self) -> sqlite3.Connection:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        return db

    def _claim(self, db: sqlite3.Connection, writer: str, batch: int, payload: str | None) -> bool:
        row = db.execute("SELECT batch FROM batches WHERE writer = ?", (writer,)).fetchone()
        if row is not None and row[0] >= batch:
            return False
        db.execute(
            "INSERT INTO batches (writer, batch, payload) VALUES (?, ?, ?) "
            "ON CONFLICT (writer) DO UPDATE SET batch = excluded.batch, "
            "payload = excluded.payload",
            (writer, batch, payload),
        )
        return True

    def apply_batch(self, writer, batch, upserts, removes, *, source, scope, payload=None):
        db = self._begin()
        try:
            if not self._claim(db, writer, batch, payload):
                db.execute("ROLLBACK")
                return False
            db.executemany(
                "DELETE FROM members WHERE user_key = ? AND source = ? AND scope = ? "
                "AND segment_id = ?",
                ((u, source, scope, s) for u, s in removes),
            )
            db.executemany(
                "INSERT OR REPLACE INTO members VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        m.user_key,
                        source,
                        scope,
                        m.segment_id,
                        m.definition_version,
                        m.score,
                        m.entered_at,
                    )
                    for m in upserts
                ),
            )
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def scope_members(self, source, scope, user_keys=None):
        db = self._db()
        query = (
            "SELECT user_key, segment_id, source, scope, definition_version, score, entered_at "
            "FROM members WHERE source = ? AND scope = ?"
        )
        if user_keys is None:
            rows = db.execute(query, (source, scope)).fetchall()
        else:
            rows = []
            keys = list(user_keys)
            for i in range(0, len(keys), 500):
                chunk = keys[i : i + 500]
                rows += db.execute(
                    f"{query} AND user_key IN ({','.join('?' * len(chunk))})",
                    (source, scope, *chunk),
                ).fetchall()
        return {(r[0], r[1]): Member(*r) for r in rows}

    def user_segments(self, user_key):
        rows = (
            self._db()
            .execute(
                "SELECT user_key, segment_id, source, scope, definition_version, score, "
                "entered_at FROM members WHERE user_key = ?",
                (user_key,),
            )
            .fetchall()
        )
        return [Member(*r) for r in rows]

    def sizes(self):
        rows = (
            self._db()
            .execute(
                "SELECT segment_id, source, scope, count(*) FROM members "
                "GROUP BY source, scope, segment_id"
            )
            .fetchall()
        )
        return [SegmentSize(*r) for r in rows]

    def resolve(self, anonymous_id):
        row = (
            self._db()
            .execute("SELECT user_key FROM aliases WHERE anonymous_id = ?", (anonymous_id,))
            .fetchone()
        )
        return None if row is None else row[0]

    def set_aliases(self, writer, batch, aliases):
        db = self._begin()
        try:
            if not self._claim(db, writer, batch, None):
                db.execute("ROLLBACK")
                return False
            db.execute("DELETE FROM aliases")
            db.executemany("INSERT INTO aliases VALUES (?, ?)", aliases.items())
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def streamed(self):
        return {r[0] for r in self._db().execute("SELECT segment_id FROM streamed")}

    def add_variants(self, writer, batch, variants):
        db = self._begin()
        try:
            if not self._claim(db, writer, batch, None):
                db.execute("ROLLBACK")
                return False
            db.executemany(
                "INSERT OR IGNORE INTO variants VALUES (?, ?, ?, ?)",
                ((v.user_key, v.experiment_id, v.variant, v.assigned_at) for v in variants),
            )
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def user_variants(self, user_key):
        rows = self._db().execute(
            "SELECT experiment_id, variant, assigned_at FROM variants WHERE user_key = ? "
            "ORDER BY experiment_id",
            (user_key,),
        )
        return [Variant(user_key, e, v, a) for e, v, a in rows]

    def reset_scope(self, source, scope, segment_ids, writer):
        db = self._begin()
        try:
            db.execute("DELETE FROM members WHERE source = ? AND scope = ?", (source, scope))
            db.execute("DELETE FROM batches WHERE writer = ?", (writer,))
            if source == "stream":
                db.execute("DELETE FROM streamed")
                db.executemany("INSERT INTO streamed VALUES (?)", ((s,) for s in segment_ids))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def ping(self):
        self._db().execute("SELECT 1").fetchone()

    def close(self):
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


# --------------------------------------------------------------------------------------
# Redis


class RedisStore:
    """Keys under `prefix`: m:<user_key> a hash (source|scope|segment -> JSON [version, score,
    entered_at]); s:<source>|<scope>|<segment> the set of its members (sizes); scopes the set
    of source|scope|segment with members; b:<writer> the marker hash (batch, payload); alias
    a hash anonymous id -> user key; streamed the set of streamed segment ids. A batch is one
    MULTI/EXEC transaction under WATCH of its marker."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self.location = url
        self._p = prefix
        self._r = redis.Redis.from_url(url, decode_responses=True)

    def _k(self, *parts: str) -> str:
        return self._p + ":".join(parts)

    @staticmethod
    def _field(source: str, scope: str, segment_id: str) -> str:
        return f"{source}|{scope}|{segment_id}"

    def marker(self, writer):
        data = self._r.hgetall(self._k("b", writer))
        return Marker(int(data["batch"]), data.get("payload")) if data else None

    def _transaction(self, writer: str, batch: int, write) -> bool:
        import redis

        marker_key = self._k("b", writer)
        with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(marker_key)
                    current = pipe.hget(marker_key, "batch")
                    if current is not None and int(current) >= batch:
                        pipe.unwatch()
                        return False
                    prepared = write(pipe)  # reads (immediate, under WATCH) -> writes
                    pipe.multi()
                    prepared(pipe)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def apply_batch(self, writer, batch, upserts, removes, *, source, scope, payload=None):
        upserts, removes = list(upserts), list(removes)

        def write(pipe):
            def queued(p):
                for user_key, segment_id in removes:
                    p.hdel(self._k("m", user_key), self._field(source, scope, segment_id))
                    p.srem(self._k("s", self._field(source, scope, segment_id)), user_key)
                for m in upserts:
                    field = self._field(source, scope, m.segment_id)
                    p.hset(
                        self._k("m", m.user_key),
                        field,
                        json.dumps([m.definition_version, m.score, m.entered_at]),
                    )
                    p.sadd(self._k("s", field), m.user_key)
                    p.sadd(self._k("scopes"), field)
                mapping = {"batch": batch}
                if payload is not None:
                    mapping["payload"] = payload
                p.delete(self._k("b", writer))
                p.hset(self._k("b", writer), mapping=mapping)

            return queued

        return self._transaction(writer, batch, write)

    def add_variants(self, writer, batch, variants):
        variants = list(variants)  # a WATCH conflict runs `write` again

        def write(pipe):
            def queued(p):
                for v in variants:
                    p.hsetnx(
                        self._k("v", v.user_key),
                        v.experiment_id,
                        json.dumps([v.variant, v.assigned_at]),
                    )
                p.hset(self._k("b", writer), mapping={"batch": batch})

            return queued

        return self._transaction(writer, batch, write)

    def user_variants(self, user_key):
        rows = self._r.hgetall(self._k("v", user_key))
        out = []
        for experiment_id, value in rows.items():
            variant, assigned_at = json.loads(value)
            out.append(Variant(user_key, experiment_id, variant, assigned_at))
        return sorted(out, key=lambda v: v.experiment_id)

    def scope_members(self, source, scope, user_keys=None):
        out: dict[tuple[str, str], Member] = {}
        prefix = f"{source}|{scope}|"
        if user_keys is None:
            keys: list[str] = []
            for field in self._r.smembers(self._k("scopes")):
                if field.startswith(prefix):
                    keys += self._r.smembers(self._k("s", field))
            user_keys = sorted(set(keys))
        user_keys = list(user_keys)
        pipe = self._r.pipeline(transaction=False)
        for user_key in user_keys:
            pipe.hgetall(self._k("m", user_key))
        for user_key, fields in zip(user_keys, pipe.execute(), strict=True):
            for field, value in fields.items():
                if field.startswith(prefix):
                    segment_id = field[len(prefix) :]
                    out[(user_key, segment_id)] = self._member(user_key, field, value)
        return out

    @staticmethod
    def _member(user_key: str, field: str, value: str) -> Member:
        source, scope, segment_id = field.split("|", 2)
        version, score, entered_at = json.loads(value)
        return Member(user_key, segment_id, source, scope, version, score, entered_at)

    def user_segments(self, user_key):
        fields = self._r.hgetall(self._k("m", user_key))
        return [self._member(user_key, f, v) for f, v in fields.items()]

    def sizes(self):
        fields = sorted(self._r.smembers(self._k("scopes")))
        pipe = self._r.pipeline(transaction=False)
        for field in fields:
            pipe.scard(self._k("s", field))
        out = []
        for field, size in zip(fields, pipe.execute(), strict=True):
            if size:
                source, scope, segment_id = field.split("|", 2)
                out.append(SegmentSize(segment_id, source, scope, size))
        return out

    def resolve(self, anonymous_id):
        return self._r.hget(self._k("alias"), anonymous_id)

    def set_aliases(self, writer, batch, aliases):
        def write(pipe):
            def queued(p):
                p.delete(self._k("alias"))
                items = list(aliases.items())
                for i in range(0, len(items), 10_000):
                    p.hset(self._k("alias"), mapping=dict(items[i : i + 10_000]))
                p.delete(self._k("b", writer))
                p.hset(self._k("b", writer), mapping={"batch": batch})

            return queued

        return self._transaction(writer, batch, write)

    def streamed(self):
        return set(self._r.smembers(self._k("streamed")))

    def reset_scope(self, source, scope, segment_ids, writer):
        members = self.scope_members(source, scope)
        fields = [
            f for f in self._r.smembers(self._k("scopes")) if f.startswith(f"{source}|{scope}|")
        ]
        with self._r.pipeline(transaction=True) as p:
            for user_key, segment_id in members:
                p.hdel(self._k("m", user_key), self._field(source, scope, segment_id))
            for field in fields:
                p.delete(self._k("s", field))
                p.srem(self._k("scopes"), field)
            p.delete(self._k("b", writer))
            if source == "stream":
                p.delete(self._k("streamed"))
                if segment_ids:
                    p.sadd(self._k("streamed"), *segment_ids)
            p.execute()

    def forget(self, user_keys, anonymous_ids):
        removed = 0
        scope_sets = [self._k("s", f) for f in self._r.smembers(self._k("scopes"))]
        aliases = self._r.hgetall(self._k("alias"))
        stale_aliases = [a for a, u in aliases.items() if a in anonymous_ids or u in user_keys]
        writers = list(self._r.scan_iter(self._k("b", "*")))
        with self._r.pipeline(transaction=True) as p:
            for user_key in sorted(user_keys):
                p.delete(self._k("m", user_key))
                for scope_set in scope_sets:
                    p.srem(scope_set, user_key)
            if stale_aliases:
                p.hdel(self._k("alias"), *stale_aliases)
            for writer_key in writers:
                payload = self._r.hget(writer_key, "payload")
                kept, dropped = _scrub_payload(payload, user_keys | anonymous_ids)
                if dropped:
                    removed += dropped
                    p.hset(writer_key, "payload", kept)
            results = p.execute()
        per_user = 1 + len(scope_sets)  # the user's hash, then one SREM per segment set
        for i in range(len(user_keys)):
            removed += sum(int(r) for r in results[i * per_user + 1 : (i + 1) * per_user])
        variant_keys = [self._k("v", user_key) for user_key in sorted(user_keys)]
        if variant_keys:
            removed += int(self._r.delete(*variant_keys))
        return removed + len(stale_aliases)

    def ping(self):
        self._r.ping()

    def close(self):
        self._r.close()
