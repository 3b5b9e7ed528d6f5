"""Rendering simulated events as JSON lines or Parquet row groups (pyarrow, vectorised).

Records are built from lookup tables of ready-made JSON fragments and strings, indexed by the
simulation's integer codes; invalid-record substitutions (see faults) are applied per slice.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from microseg.ingest.generate.faults import (
    FUTURE_YEAR,
    INV_BAD_TS,
    INV_FUTURE_TS,
    INV_MISSING_TYPE,
    INV_MISSING_USER,
    INV_NEGATIVE_PRICE,
    INV_UNKNOWN_TYPE,
    NEGATIVE_PRICE_CENTS,
    UNPARSEABLE_TS,
)
from microseg.ingest.generate.world import (
    CATEGORIES,
    DAY_MS,
    DEVICES,
    EVENT_TYPES,
    GEOS,
    HOUR_MS,
    HOVER,
    N_PRODUCTS,
    TYPE_NULL,
    World,
    seed_words,
)

# --------------------------------------------------------------------------------------
# string arrays


def ts_strings(ms: np.ndarray) -> pa.StringArray:
    """Epoch milliseconds -> 'YYYY-MM-DDTHH:MM:SS.mmmZ', built as fixed-width bytes."""
    n = len(ms)
    days = ms // DAY_MS
    tod = ms - days * DAY_MS
    uniq, inverse = np.unique(days, return_inverse=True)
    dates = np.datetime_as_string(uniq.astype("datetime64[D]"), unit="D")
    date_bytes = np.frombuffer("".join(dates).encode("ascii"), dtype=np.uint8).reshape(-1, 10)
    out = np.empty((n, 24), dtype=np.uint8)
    out[:, :10] = date_bytes[inverse.reshape(-1)]
    out[:, 10] = ord("T")
    out[:, 13] = out[:, 16] = ord(":")
    out[:, 19] = ord(".")
    out[:, 23] = ord("Z")
    for col, value in (
        (11, tod // HOUR_MS),
        (14, tod // 60_000 % 60),
        (17, tod // 1000 % 60),
    ):
        out[:, col] = 48 + value // 10
        out[:, col + 1] = 48 + value % 10
    millis = tod % 1000
    out[:, 20] = 48 + millis // 100
    out[:, 21] = 48 + millis // 10 % 10
    out[:, 22] = 48 + millis % 10
    offsets = np.arange(0, 24 * (n + 1), 24, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out))


def _padded(prefix: str, numbers: np.ndarray, width: int) -> pa.StringArray:
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers, type=pa.int64()), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def join_strings(*pieces) -> pa.StringArray:
    return pc.binary_join_element_wise(*pieces, "")


def string_array(values) -> pa.StringArray:
    return pa.array(list(values), type=pa.string())


# --------------------------------------------------------------------------------------
# records


class Tables:
    """String lookup tables used to render records (JSON fragments and plain values)."""

    def __init__(self, world: World, seed: int, n_users: int, n_anon: int, users, anons):
        self.seed = seed
        q = json.dumps
        uid = _padded("u", np.arange(n_users), 7)
        aid = _padded("a", np.arange(n_anon), 8)
        email = join_strings(uid, "@example.com")
        self.user_id = pa.concat_arrays([uid, pa.nulls(1, pa.string())])
        self.anon_id = pa.concat_arrays([aid, pa.nulls(1, pa.string())])
        self.email = pa.concat_arrays([email, pa.nulls(1, pa.string())])
        self.types = pa.array([*EVENT_TYPES, "hover", None], type=pa.string())
        pids = [f"p{i:05d}" for i in range(N_PRODUCTS)]
        self.product_id = pa.array([*pids, None], type=pa.string())
        self.product_cat = pa.array(
            [CATEGORIES[c][0] for c in world.product_cat] + [None], type=pa.string()
        )
        terms = [t for c in CATEGORIES for t in c[3]]
        self.search = pa.array([*terms, None], type=pa.string())
        self.pages = pa.array([*world.pages, None], type=pa.string())
        self.devices = string_array(DEVICES)
        self.country = string_array(g[0] for g in GEOS)
        self.city = string_array(g[1] for g in GEOS)
        self.utm = [pa.array([r[k] for r in world.utm_rows], type=pa.string()) for k in range(3)]
        self.user_geo = users["geo"]
        self.anon_device = anons["device"]
        self.anon_consent = anons["consent"]
        self.n_users = n_users
        self.n_anon = n_anon

        # JSON fragments
        self.j_type = string_array([q(t) for t in EVENT_TYPES] + [q("hover"), "null"])
        self.j_user_head = pa.concat_arrays(
            [join_strings('"', uid, '","anon_id":'), string_array(['null,"anon_id":'])]
        )
        self.j_anon = pa.concat_arrays([join_strings('"', aid, '"'), string_array(["null"])])
        self.j_user_tail = pa.concat_arrays(
            [
                join_strings(',"email":"', email, '"},"product":'),
                string_array([',"email":null},"product":']),
            ]
        )
        self.j_product = string_array(
            [
                f'{{"id":{q(pid)},"category":{q(CATEGORIES[c][0])},"price":'
                for pid, c in zip(pids, world.product_cat, strict=True)
            ]
            + ["null"]
        )
        self.j_cents = string_array(
            [f".{f // 10}}}" if f % 10 == 0 else f".{f:02d}}}" for f in range(100)]
        )
        self.j_qty = string_array(
            [',"qty":null,"currency":"EUR","search":']
            + [f',"qty":{k},"currency":"EUR","search":' for k in range(1, 128)]
        )
        self.j_search = string_array(
            [q(t) + ',"page":{"url":"' for t in terms] + ['null,"page":{"url":"']
        )
        self.j_referrer = string_array([q(p) for p in world.pages] + ["null"])
        self.j_device_geo = string_array(
            [
                f'}},"device":{q(d)},"geo":{{"country":{q(g[0])},"city":{q(g[1])}}},"utm":'
                for d in DEVICES
                for g in GEOS
            ]
        )
        self.j_utm = string_array(
            [
                f'{{"source":{q(r[0])},"medium":{q(r[1])},"campaign":{q(r[2])}}}'
                for r in world.utm_rows
            ]
            + ["null"]
        )
        self.j_consent = string_array(
            [
                f',"consent":{{"analytics":{q(bool(code // 2))},'
                f'"marketing":{q(bool(code % 2))}}}}}\n'
                for code in range(4)
            ]
        )


def _null_index(values: np.ndarray, null_value: int) -> pa.Array:
    """Indices into a lookup table whose last entry (null_value) stands for null."""
    return pa.array(np.where(values < 0, null_value, values).astype(np.int64))


def prepared(rows: np.ndarray, ev: dict, inv: np.ndarray, world: World) -> dict:
    """Gather the rows of one output slice and apply the invalid-record substitutions."""
    g = {k: v[rows] for k, v in ev.items()}
    kind = inv[rows]
    g["inv"] = kind
    g["ts_ms"] = g["ts"].copy()
    future = kind == INV_FUTURE_TS
    if future.any():
        start_day = world.start_ms // DAY_MS
        target_day = (datetime(FUTURE_YEAR, 1, 1, tzinfo=timezone.utc).timestamp() * 1000) // DAY_MS
        g["ts_ms"][future] += int(target_day - start_day) * DAY_MS
    g["type_code"] = g["type"].astype(np.int64)
    g["type_code"][kind == INV_UNKNOWN_TYPE] = HOVER
    g["type_code"][kind == INV_MISSING_TYPE] = TYPE_NULL
    g["price"] = np.where(kind == INV_NEGATIVE_PRICE, NEGATIVE_PRICE_CENTS, g["price"])
    g["user_shown"] = np.where(g["logged"] & (kind != INV_MISSING_USER), g["user"], -1)
    g["anon_shown"] = np.where(kind == INV_MISSING_USER, -1, g["anon"])
    return g


def _ts_column(g: dict) -> pa.Array:
    ts = ts_strings(g["ts_ms"])
    bad = g["inv"] == INV_BAD_TS
    if bad.any():
        ts = pc.if_else(pa.array(bad), pa.scalar(UNPARSEABLE_TS), ts)
    return ts


def render_json(rows: np.ndarray, g: dict, t: Tables, malformed: np.ndarray) -> pa.Array:
    has_product = g["product"] >= 0
    cents = g["price"].astype(np.int64)
    price = join_strings(
        pc.cast(pa.array(cents // 100 + (cents < 0) * ((cents % 100) != 0)), pa.string()),
        t.j_cents.take(pa.array(np.abs(cents) % 100)),
    )
    price = pc.if_else(pa.array(has_product), price, pa.scalar(""))
    user = g["user_shown"]
    pieces = [
        f'{{"id":"ev-{t.seed}-',
        pc.cast(pa.array(rows.astype(np.int64)), pa.string()),
        '","ts":"',
        _ts_column(g),
        '","type":',
        t.j_type.take(pa.array(g["type_code"])),
        ',"user":{"id":',
        t.j_user_head.take(_null_index(user, t.n_users)),
        t.j_anon.take(_null_index(g["anon_shown"], t.n_anon)),
        t.j_user_tail.take(_null_index(user, t.n_users)),
        t.j_product.take(_null_index(g["product"], N_PRODUCTS)),
        price,
        t.j_qty.take(pa.array(g["qty"].astype(np.int64))),
        t.j_search.take(_null_index(g["search"].astype(np.int64), len(t.j_search) - 1)),
        t.pages.take(pa.array(g["page"].astype(np.int64))),
        '","referrer":',
        t.j_referrer.take(_null_index(g["referrer"], len(t.j_referrer) - 1)),
        t.j_device_geo.take(
            pa.array(t.anon_device[g["anon"]].astype(np.int64) * len(GEOS) + t.user_geo[g["user"]])
        ),
        t.j_utm.take(_null_index(g["utm"].astype(np.int64), len(t.j_utm) - 1)),
        t.j_consent.take(pa.array(t.anon_consent[g["anon"]].astype(np.int64))),
    ]
    lines = join_strings(*pieces)
    bad = malformed[rows]
    if bad.any():
        where = np.flatnonzero(bad)
        rng = np.random.default_rng([*seed_words(t.seed), 3, int(rows[0])])
        cut = _truncated(lines.take(pa.array(where)), rng.uniform(0.25, 0.75, len(where)))
        lines = pc.replace_with_mask(lines, pa.array(bad), cut)
    return lines


def _truncated(lines: pa.StringArray, fraction: np.ndarray, block: int = 20_000) -> pa.Array:
    """Cut every line (ending in a newline) after `fraction` of its characters, keep the newline.

    The records are ASCII, so characters are bytes; a strict prefix of a JSON object is never
    valid JSON.
    """
    parts = []
    for lo in range(0, len(lines), block):
        part = lines.slice(lo, block)
        n = len(part)
        _, offsets_buf, data = part.buffers()
        offsets = np.frombuffer(
            offsets_buf, dtype=np.int32, count=n + 1, offset=part.offset * 4
        ).astype(np.int64)
        text = np.frombuffer(data, dtype=np.uint8)
        length = np.diff(offsets) - 1  # without the newline
        keep = np.clip((length * fraction[lo : lo + n]).astype(np.int64), 1, length - 1)
        new_offsets = np.concatenate([[0], np.cumsum(keep + 1)])
        row = np.repeat(np.arange(n), keep + 1)
        within = np.arange(new_offsets[-1]) - new_offsets[row]
        out = text[offsets[row] + within]
        out[new_offsets[1:] - 1] = ord("\n")
        parts.append(
            pa.StringArray.from_buffers(
                n, pa.py_buffer(new_offsets.astype(np.int32)), pa.py_buffer(out)
            )
        )
    return pa.concat_arrays(parts) if parts else pa.array([], type=pa.string())


PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("ts", pa.string()),
        ("type", pa.string()),
        (
            "user",
            pa.struct([("id", pa.string()), ("anon_id", pa.string()), ("email", pa.string())]),
        ),
        (
            "product",
            pa.struct([("id", pa.string()), ("category", pa.string()), ("price", pa.float64())]),
        ),
        ("qty", pa.int32()),
        ("currency", pa.string()),
        ("search", pa.string()),
        ("page", pa.struct([("url", pa.string()), ("referrer", pa.string())])),
        ("device", pa.string()),
        ("geo", pa.struct([("country", pa.string()), ("city", pa.string())])),
        (
            "utm",
            pa.struct(
                [("source", pa.string()), ("medium", pa.string()), ("campaign", pa.string())]
            ),
        ),
        ("consent", pa.struct([("analytics", pa.bool_()), ("marketing", pa.bool_())])),
    ]
)


def _struct(name: str, children: list, mask: np.ndarray | None = None) -> pa.StructArray:
    field = PARQUET_SCHEMA.field(name).type
    return pa.StructArray.from_arrays(
        children, fields=list(field), mask=None if mask is None else pa.array(mask)
    )


def render_parquet(rows: np.ndarray, g: dict, t: Tables) -> pa.Table:
    n = len(rows)
    user = _null_index(g["user_shown"], t.n_users)
    product = _null_index(g["product"], N_PRODUCTS)
    has_product = g["product"] >= 0
    utm = g["utm"].astype(np.int64)
    utm_ix = pa.array(np.maximum(utm, 0))
    geo = pa.array(t.user_geo[g["user"]].astype(np.int64))
    consent = t.anon_consent[g["anon"]]
    columns = [
        join_strings(f"ev-{t.seed}-", pc.cast(pa.array(rows.astype(np.int64)), pa.string())),
        _ts_column(g),
        t.types.take(pa.array(g["type_code"])),
        _struct(
            "user",
            [
                t.user_id.take(user),
                t.anon_id.take(_null_index(g["anon_shown"], t.n_anon)),
                t.email.take(user),
            ],
        ),
        _struct(
            "product",
            [
                t.product_id.take(product),
                t.product_cat.take(product),
                pa.array(g["price"] / 100.0, mask=~has_product),
            ],
            ~has_product,
        ),
        pa.array(g["qty"].astype(np.int32), mask=g["qty"] == 0),
        pa.array(["EUR"]).take(pa.array(np.zeros(n, dtype=np.int64))),
        t.search.take(_null_index(g["search"].astype(np.int64), len(t.search) - 1)),
        _struct(
            "page",
            [
                t.pages.take(pa.array(g["page"].astype(np.int64))),
                t.pages.take(_null_index(g["referrer"], len(t.pages) - 1)),
            ],
        ),
        t.devices.take(pa.array(t.anon_device[g["anon"]].astype(np.int64))),
        _struct("geo", [t.country.take(geo), t.city.take(geo)]),
        _struct("utm", [col.take(utm_ix) for col in t.utm], utm < 0),
        _struct("consent", [pa.array(consent >= 2), pa.array(consent % 2 == 1)]),
    ]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


def string_bytes(arr: pa.StringArray) -> memoryview:
    """The concatenated characters of a string array (no separators)."""
    _, offsets_buf, data = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    return memoryview(data)[int(offsets[0]) : int(offsets[-1])]
