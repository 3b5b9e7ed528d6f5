"""The online store (SQLite and a real redis-server) and `microseg serve` over a lake built by
the real jobs and the stream, on a real HTTP server. Expected values are written out by hand.

ev(..., minute) is 2026-09-01 10:00 + minutes (tests.test_sessions)."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta

import httpx
import pytest
import uvicorn
from tests.conftest import make_config
from tests.redis_server import free_port
from tests.test_sessions import T0, ev, write_bronze
from tests.test_streaming import CATALOG, at

from microseg.core.online_store import Member, RedisStore, SqliteStore
from microseg.features.job import run_features
from microseg.segments.evaluate import run_segments
from microseg.serving.api import create_app
from microseg.silver.sessions import run_sessionize
from microseg.streaming import query as streaming

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

CAB, RB = "cart_abandoners_24h", "recent_buyers"


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


# --------------------------------------------------------------------------------------
# the API over a lake: batch runs at T1 and T2, then the stream


T2 = T0 + timedelta(hours=2)


class Server:
    """uvicorn serving the app on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start within 20 s")
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def lake_cfg(spark, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("serving")
    path = tmp_path / "segments.yaml"
    path.write_text(CATALOG)
    cfg = make_config(tmp_path, f"segments.file={path}", "stream.state_partitions=2")
    write_bronze(
        spark,
        cfg,
        [
            ev("a1", 0, "add_to_cart", user="u1"),
            ev("b1", 10, "purchase", user="u2", price=5.0),
            # a cart add while anonymous, then a login on the same device: stitched to u6
            ev("f1", 20, "add_to_cart", anon="a6"),
            ev("f2", 30, "page_view", user="u6", anon="a6"),
            ev("a2", 90, "purchase", user="u1", price=7.0),
        ],
    )
    run_sessionize(spark, cfg)
    run_features(spark, cfg, as_of=T2)
    run_segments(spark, cfg, as_of=T2)
    return cfg


def iso(at: datetime) -> str:
    return at.isoformat() + "Z"


def rule(segment, entered, version):
    return {
        "segment_id": segment,
        "source": "rule",
        "scope": "segments",
        "entered_at": iso(entered),
        "score": None,
        "definition_version": version,
    }


@pytest.mark.slow
def test_api_answers_from_the_store_and_the_history(spark, lake_cfg):
    with Server(create_app(lake_cfg)) as api:
        segments = api.get("/segments").json()
        versions = {s["segment_id"]: s["definition_version"] for s in segments}
        assert [(s["segment_id"], s["source"], s["size"], s["status"]) for s in segments] == [
            (CAB, "rule", 1, "active"),  # u6
            ("carting_buyers", "rule", 1, "active"),  # u1: bought, and a cart add in 24h
            (RB, "rule", 2, "active"),  # u1, u2
        ]
        assert api.get("/users/u1/segments").json() == {
            "id": "u1",
            "user_key": "u1",
            "as_of": None,
            "segments": [
                rule("carting_buyers", T2, versions["carting_buyers"]),
                rule(RB, T2, versions[RB]),
            ],
        }
        # as of a time (gold/segment_membership); one with an offset is converted:
        # 13:30+01:00 is 12:30 UTC, after the run at 12:00; 11:30 UTC is before it
        later = api.get("/users/u1/segments", params={"as_of": "2026-09-01T13:30:00+01:00"})
        assert later.json()["as_of"] == "2026-09-01T12:30:00Z"
        assert [s["segment_id"] for s in later.json()["segments"]] == ["carting_buyers", RB]
        early = api.get("/users/u1/segments", params={"as_of": "2026-09-01T11:30:00"})
        assert early.json()["segments"] == []
        # the anonymous id that logged in answers with the user's segments
        stitched = api.get("/users/a6/segments").json()
        assert (stitched["user_key"], stitched["segments"]) == (
            "u6",
            [rule(CAB, T2, versions[CAB])],
        )
        assert api.get("/users/nobody/segments").json() == {
            "id": "nobody",
            "user_key": "nobody",
            "as_of": None,
            "segments": [],
        }
        bad = api.get("/users/u1/segments", params={"as_of": "yesterday"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["query", "as_of"]
        detail = api.get(f"/segments/{RB}").json()
        assert [(d["source"], d["size"]) for d in detail] == [("rule", 2)]
        assert detail[0]["sizes"] == [{"as_of": iso(T2), "size": 2, "status": "active"}]
        assert detail[0]["definition"]["conditions"] == [{"last": "purchase", "within": "30d"}]
        missing = api.get("/segments/nope")
        assert (missing.status_code, missing.json()) == (404, {"detail": "no segment 'nope'"})
        health = api.get("/health").json()
        assert (health["status"], health["store"]) == ("ok", "sqlite")
        assert "/users/{user_id}/segments" in api.get("/openapi.json").json()["paths"]
        assert api.get("/docs").status_code == 200

    # the stream keeps the event segments: from now on they are answered from its rows
    streaming.run_stream(spark, lake_cfg, available_now=True)
    with Server(create_app(lake_cfg)) as api:

        def answer(user, **params):
            segments = api.get(f"/users/{user}/segments", params=params).json()["segments"]
            return [(s["segment_id"], s["source"], s["entered_at"]) for s in segments]

        # feature conditions use the latest snapshot (T2: u1 has an order) at every point
        assert answer("u1") == [
            ("carting_buyers", "stream", iso(at(0))),
            (RB, "stream", iso(at(90))),
        ]
        # as of minute 50, from the stream's intervals
        assert answer("u1", as_of=iso(at(50))) == [
            (CAB, "stream", iso(at(0))),
            ("carting_buyers", "stream", iso(at(0))),
        ]
        # the stream keys a6's events to u6 through silver/identity_map
        assert answer("a6") == [(CAB, "stream", iso(at(20)))]
        sizes = {(s["segment_id"], s["source"]): s["size"] for s in api.get("/segments").json()}
        assert (sizes[(CAB, "stream")], sizes[(RB, "stream")]) == (1, 2)
