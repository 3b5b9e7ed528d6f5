"""The online store's contract, for SQLite and a real redis-server. Expected values are written
out by hand. The API over a lake written by the batch job and the stream is tested in
tests/test_streaming.py (test_api_answers_from_the_store_of_both_paths_and_the_history), on
that file's lake."""

from __future__ import annotations

import uuid

import pytest

from microseg.core.online_store import Member, RedisStore, SqliteStore

# --------------------------------------------------------------------------------------
# the store contract, for both stores


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = SqliteStore(str(tmp_path / "online.sqlite"))
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), f"t{uuid.uuid4().hex[:8]}:")
    yield s
    s.close()


def member(user, segment, entered, version="v1", score=None):
    return Member(user, segment, "stream", "s", version, score, entered)


def test_a_batch_applies_once_with_its_marker(store):
    assert store.marker("w") is None
    assert store.apply_batch(
        "w",
        0,
        [member("u1", "a", 10), member("u1", "b", 11, score=0.5), member("u2", "a", 12)],
        [],
        source="stream",
        scope="s",
        payload='["batch 0"]',
    )
    assert store.marker("w").batch == 0
    assert store.marker("w").payload == '["batch 0"]'
    # a replay of batch 0 (with other contents) is refused as a whole
    assert not store.apply_batch(
        "w", 0, [member("u3", "a", 13)], [("u1", "a")], source="stream", scope="s"
    )
    assert sorted(store.scope_members("stream", "s")) == [("u1", "a"), ("u1", "b"), ("u2", "a")]
    assert store.apply_batch(
        "w", 1, [member("u1", "a", 20, version="v2")], [("u2", "a")], source="stream", scope="s"
    )
    assert store.marker("w").batch == 1
    assert store.marker("w").payload is None
    assert sorted(store.user_segments("u1"), key=lambda m: m.segment_id) == [
        member("u1", "a", 20, version="v2"),
        member("u1", "b", 11, score=0.5),
    ]
    assert store.user_segments("u2") == []
    assert store.scope_members("stream", "s", ["u2", "u9"]) == {}
    assert store.scope_members("stream", "other") == {}
    sizes = sorted((s.segment_id, s.source, s.scope, s.size) for s in store.sizes())
    assert sizes == [("a", "stream", "s", 1), ("b", "stream", "s", 1)]
    # another writer's marker is its own
    assert store.apply_batch("w2", 0, [], [], source="stream", scope="s")

    assert store.set_aliases("aliases", 3, {"a6": "u6", "a7": "u7"})
    assert not store.set_aliases("aliases", 3, {})
    assert store.resolve("a6") == "u6"
    assert store.resolve("nobody") is None
    assert store.set_aliases("aliases", 4, {"a7": "u8"})
    assert (store.resolve("a6"), store.resolve("a7")) == (None, "u8")

    store.reset_scope("stream", "s", ["a", "b"], "w")
    assert store.scope_members("stream", "s") == {}
    assert store.marker("w") is None
    assert store.streamed() == {"a", "b"}
    assert store.sizes() == []


def test_forget_removes_members_aliases_and_pending_rows_of_the_people_only(store, tmp_path):
    payload = '[["u1","a","enter"],["u2","a","enter"],["anon:x1","b","enter"]]'
    store.apply_batch(
        "w",
        0,
        [member("u1", "a", 10), member("u1", "b", 11), member("u2", "a", 12)],
        [],
        source="stream",
        scope="s",
        payload=payload,
    )
    store.apply_batch(
        "batch",
        3,
        [Member("anon:x1", "c", "rule", "r", "v1", None, 13)],
        [],
        source="rule",
        scope="r",
    )
    store.set_aliases("aliases", 1, {"x1": "u1", "x2": "u2", "x3": "u1"})

    # u1 is the person; x1 and x3 are their anonymous ids
    removed = store.forget({"u1", "anon:x1", "anon:x3"}, {"x1", "x3"})

    # 3 memberships (u1 in a and b, anon:x1 in c), 2 aliases, 2 pending change rows
    assert removed == 7
    assert store.user_segments("u1") == []
    assert store.user_segments("anon:x1") == []
    assert store.user_segments("u2") == [member("u2", "a", 12)]
    assert store.resolve("x1") is None and store.resolve("x3") is None
    assert store.resolve("x2") == "u2"
    assert store.marker("w").payload == '[["u2","a","enter"]]'
    assert sorted((s.segment_id, s.size) for s in store.sizes()) == [("a", 1)]
    # forgetting again finds nothing
    assert store.forget({"u1", "anon:x1", "anon:x3"}, {"x1", "x3"}) == 0
    if isinstance(store, SqliteStore):
        # nothing of u1 left in the file or its write-ahead log (deleted rows are overwritten)
        for path in tmp_path.glob("online.sqlite*"):
            data = path.read_bytes()
            assert b"u1" not in data and b"x1" not in data and b"x3" not in data, path


def test_variants_are_insert_once_per_user_and_experiment_and_forgotten(store):
    from microseg.core.online_store import Variant

    first = (
        Variant("u1", "e1", "a", 10),
        Variant("u1", "e2", "b", 10),
        Variant("u2", "e1", "b", 10),
    )
    assert store.add_variants("batch:experiments", 1, (v for v in first))  # any iterable
    # a later batch cannot move u1 in e1 (sticky), but adds u3
    assert store.add_variants(
        "batch:experiments", 2, [Variant("u1", "e1", "b", 20), Variant("u3", "e1", "a", 20)]
    )
    assert not store.add_variants("batch:experiments", 2, [Variant("u4", "e1", "a", 30)])
    assert store.user_variants("u1") == [Variant("u1", "e1", "a", 10), Variant("u1", "e2", "b", 10)]
    assert store.user_variants("u3") == [Variant("u3", "e1", "a", 20)]
    assert store.user_variants("u4") == []
    store.forget({"u1"}, set())
    assert store.user_variants("u1") == []
    assert store.user_variants("u2") == [Variant("u2", "e1", "b", 10)]
