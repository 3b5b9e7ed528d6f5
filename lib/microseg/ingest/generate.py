"""Seeded synthetic e-commerce click-stream with known ground-truth personas.

`generate(settings)` simulates users of seven behavioural personas, their sessions and the
events inside them, and writes

    <output>/events/events-YYYY-MM-DD.jsonl   (or .parquet), one file per UTC day, sorted by ts
    <output>/users.csv                        ground truth: persona, activity span, anonymous ids
    <output>/manifest.json                    settings, counts, files and injected faults

Everything is plain numpy + pyarrow and vectorised: users are simulated in chunks of a fixed
size, each chunk with its own `numpy.random.default_rng` stream seeded from (seed, chunk), so
the same settings always give byte-identical files.

Model, in short
---------------
* A catalogue of products, each in one of twelve categories, with a log-normal base price
  around its category's median and a Zipf-like popularity.
* Each user has one persona, an active window of days, 1-2 anonymous ids (one cookie per
  device, each with a device type and consent flags) and a favourite category.
* Sessions start on a day of the active window at an hour drawn from the persona's daily
  rhythm and never overlap (at least 35 minutes apart). A session is a burst of events 10 s -
  15 min apart: browsing (page_view / search / product_view / add_to_wishlist), then possibly
  add_to_cart of the product just viewed (more items each after their own product_view),
  maybe a remove_from_cart, a checkout_started and one purchase event per bought product.
* Events before the login carry only the anonymous id; from the login on (the session start,
  the first add_to_cart, a random point, or never; always before a checkout) they also carry
  the user id and e-mail.
* Two sale windows of up to four days: 30 % off everything and campaign traffic
  (utm_campaign "summer_sale" / "black_friday"), which deal seekers mostly visit.
* About 0.5 % of anonymous ids are shared by two users (a family computer).

Faults are injected on distinct records after the clean simulation; their exact counts go to
the manifest (see `generate`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from microseg.core.config import DEFAULT_EVENT_TYPES, GenerateConfig

__all__ = [
    "EVENT_TYPES",
    "INVALID_KINDS",
    "PERSONAS",
    "estimate_users_for_events",
    "generate",
]

GENERATOR_VERSION = 1
USERS_PER_CHUNK = 20_000  # part of the determinism contract: changing it changes the output
JSON_RENDER_ROWS = 200_000  # lines rendered at once (bounds the memory of a day)
PARQUET_ROW_GROUP = 500_000  # rows rendered at once, one row group each
WRITER_THREADS = 2
DAY_MS = 86_400_000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
HOUR_MS = 3_600_000
MIN_SESSION_GAP_MS = 35 * 60_000  # sessions of one user are at least this far apart
MAX_EVENT_GAP_MS = 15 * 60_000  # in-session gaps are capped here (well below 30 minutes)
MIN_EVENT_GAP_MS = 10_000
NEW_VISITOR_DAYS = 10
SALE_DISCOUNT = 0.7
SHARED_ANON_SHARE = 0.005
N_PRODUCTS = 5_000
SHOP = "https://shop.example.com"

EVENT_TYPES = DEFAULT_EVENT_TYPES  # the generator's type codes index this tuple
PAGE_VIEW, PRODUCT_VIEW, SEARCH, ADD_TO_CART, REMOVE_FROM_CART, WISHLIST, CHECKOUT, PURCHASE = (
    range(8)
)
HOVER, TYPE_NULL = 8, 9  # codes only used by invalid records
PRODUCT_TYPES = (PRODUCT_VIEW, ADD_TO_CART, REMOVE_FROM_CART, WISHLIST, PURCHASE)

INVALID_KINDS = (
    "unknown_event_type",
    "unparseable_timestamp",
    "future_timestamp",
    "negative_price",
    "missing_user",
    "missing_event_type",
)
(
    INV_UNKNOWN_TYPE,
    INV_BAD_TS,
    INV_FUTURE_TS,
    INV_NEGATIVE_PRICE,
    INV_MISSING_USER,
    INV_MISSING_TYPE,
) = range(1, 7)
UNPARSEABLE_TS = "yesterday noon"
FUTURE_YEAR = 2099
NEGATIVE_PRICE_CENTS = -500

DEVICES = ("mobile", "desktop", "tablet")
DESKTOP = 1

# (name, median price in EUR, share of the catalogue, search terms)
# fmt: off
CATEGORIES = (
    ("electronics.audio", 79, 1.0, ("wireless headphones", "bluetooth speaker",
                                    "noise cancelling", "earbuds", "soundbar", "turntable")),
    ("electronics.computers", 649, 0.7, ("laptop", "gaming laptop", "monitor 27 inch",
                                         "mechanical keyboard", "tablet", "usb-c hub")),
    ("apparel.shoes", 69, 1.2, ("running shoes", "sneakers", "leather boots", "sandals",
                                "hiking boots", "kids shoes")),
    ("apparel.fashion", 39, 1.6, ("summer dress", "denim jacket", "wool sweater", "t-shirt",
                                  "rain jacket", "linen shirt")),
    ("home.kitchen", 34, 1.0, ("coffee maker", "chef knife", "frying pan", "blender",
                               "espresso cups", "air fryer")),
    ("home.furniture", 229, 0.8, ("sofa", "desk chair", "bookshelf", "bed frame",
                                  "dining table", "floor lamp")),
    ("beauty.skincare", 19, 1.0, ("face cream", "sunscreen spf 50", "serum", "cleanser",
                                  "lip balm", "retinol")),
    ("sports.outdoor", 59, 0.9, ("tent", "sleeping bag", "yoga mat", "bike helmet",
                                 "water bottle", "trekking poles")),
    ("books", 14, 1.2, ("crime novel", "cookbook", "children books", "fantasy series",
                        "biography", "travel guide")),
    ("toys", 24, 0.9, ("lego", "puzzle", "board game", "plush toy", "rc car", "dollhouse")),
    ("grocery", 6, 1.0, ("coffee beans", "olive oil", "dark chocolate", "green tea", "pasta",
                         "protein bar")),
    ("jewelry.watches", 249, 0.7, ("smartwatch", "automatic watch", "silver necklace",
                                   "gold ring", "earrings", "leather strap")),
)
# fmt: on
N_CATEGORIES = len(CATEGORIES)
TERMS_PER_CATEGORY = 6

# fmt: off
GEOS = (
    ("DE", "Berlin", 12), ("DE", "Munich", 8), ("DE", "Hamburg", 7), ("DE", "Cologne", 5),
    ("FR", "Paris", 10), ("FR", "Lyon", 4), ("NL", "Amsterdam", 6), ("NL", "Rotterdam", 3),
    ("AT", "Vienna", 5), ("ES", "Madrid", 7), ("ES", "Barcelona", 5), ("IT", "Milan", 6),
    ("IT", "Rome", 5), ("BE", "Brussels", 4), ("IE", "Dublin", 3), ("FI", "Helsinki", 2),
    ("PT", "Lisbon", 3),
)
# fmt: on

SALE_CAMPAIGNS = ("summer_sale", "black_friday")
SALE = "<sale>"
# (name, referrer of the landing page, utm (source, medium, campaign) or None)
CHANNELS = (
    ("direct", None, None),
    ("organic", "https://www.google.com/", None),
    ("organic_bing", "https://www.bing.com/", None),
    ("newsletter", None, ("newsletter", "email", "weekly_digest")),
    ("social", "https://www.instagram.com/", ("instagram", "social", "autumn_lookbook")),
    ("paid_search", "https://www.google.com/", ("google", "cpc", "brand_search")),
    ("sale_email", None, ("newsletter", "email", SALE)),
    ("sale_social", "https://www.facebook.com/", ("facebook", "paid_social", SALE)),
    ("coupon", "https://www.dealspotr.com/", ("dealspotr", "affiliate", "coupon_codes")),
)


@dataclass(frozen=True)
class Persona:
    name: str
    weight: float
    sessions_per_week: float  # 0 for new visitors (1-3 sessions in the last days)
    first_day_frac: float  # first active day is uniform in [0, frac * days]
    last_day_frac: float  # active until this fraction of the range
    browse_mean: float  # mean number of browse events per session (>= 1)
    browse_mix: tuple[float, float, float, float]  # page_view, search, product_view, wishlist
    gap_mean_s: float
    p_cart: float
    p_cart_sale: float
    extra_items: float  # mean number of further cart items
    p_remove: float
    p_checkout: float  # given a non-empty cart
    p_purchase: float  # given a checkout
    qty_mix: tuple[float, float, float]  # 1, 2, 3 items of a product
    price_level: float  # preferred price relative to the category median
    categories: tuple[float, ...]  # preference over CATEGORIES
    concentration: float  # probability an event is in the user's favourite category
    hour_peaks: tuple[tuple[float, float, float], ...]  # (hour, sigma, weight)
    devices: tuple[float, float, float]  # mobile, desktop, tablet
    p_two_cookies: float
    login: tuple[float, float, float, float]  # at start, at first cart, random point, never
    channels: tuple[float, ...]  # over CHANNELS on ordinary days
    channels_sale: tuple[float, ...]  # over CHANNELS on sale days
    p_marketing: float
    p_sale_day: float = 0.0  # share of sessions placed on sale days


# Category preference order: audio, computers, shoes, fashion, kitchen, furniture, skincare,
# outdoor, books, toys, grocery, watches. Channel order: see CHANNELS.
# fmt: off
PERSONAS = (
    Persona(
        name="loyal_frequent_buyer", weight=0.12,
        sessions_per_week=4.0, first_day_frac=0.10, last_day_frac=1.0,
        browse_mean=4.0, browse_mix=(0.25, 0.15, 0.55, 0.05), gap_mean_s=40,
        p_cart=0.55, p_cart_sale=0.60, extra_items=0.6, p_remove=0.08,
        p_checkout=0.85, p_purchase=0.92, qty_mix=(0.88, 0.09, 0.03), price_level=1.0,
        categories=(0.5, 0.3, 0.8, 1.5, 2.0, 0.4, 2.0, 0.8, 2.0, 0.8, 3.0, 0.3),
        concentration=0.6, hour_peaks=((20.0, 1.5, 1.0),), devices=(0.45, 0.45, 0.10),
        p_two_cookies=0.45, login=(0.65, 0.20, 0.10, 0.05),
        channels=(0.45, 0.15, 0.02, 0.30, 0.03, 0.05, 0, 0, 0),
        channels_sale=(0.35, 0.10, 0.02, 0.15, 0.03, 0.05, 0.25, 0.05, 0),
        p_marketing=0.6,
    ),
    Persona(
        name="high_value_occasional", weight=0.08,
        sessions_per_week=0.7, first_day_frac=0.20, last_day_frac=1.0,
        browse_mean=7.0, browse_mix=(0.20, 0.20, 0.58, 0.02), gap_mean_s=90,
        p_cart=0.45, p_cart_sale=0.50, extra_items=0.2, p_remove=0.05,
        p_checkout=0.80, p_purchase=0.90, qty_mix=(0.88, 0.09, 0.03), price_level=1.5,
        categories=(2.0, 2.0, 0.8, 1.0, 1.0, 1.8, 0.6, 1.0, 0.5, 0.5, 0.4, 2.0),
        concentration=0.45, hour_peaks=((12.5, 1.0, 1.0), (20.5, 1.5, 0.25)),
        devices=(0.15, 0.75, 0.10), p_two_cookies=0.40, login=(0.40, 0.40, 0.10, 0.10),
        channels=(0.30, 0.35, 0.05, 0.05, 0, 0.25, 0, 0, 0),
        channels_sale=(0.30, 0.30, 0.05, 0.05, 0, 0.25, 0.05, 0, 0),
        p_marketing=0.4,
    ),
    Persona(
        name="deal_seeker", weight=0.12,
        sessions_per_week=1.0, first_day_frac=0.15, last_day_frac=1.0, p_sale_day=0.75,
        browse_mean=6.0, browse_mix=(0.20, 0.35, 0.43, 0.02), gap_mean_s=50,
        p_cart=0.20, p_cart_sale=0.60, extra_items=0.8, p_remove=0.10,
        p_checkout=0.75, p_purchase=0.85, qty_mix=(0.60, 0.25, 0.15), price_level=0.45,
        categories=(1.5, 0.8, 2.0, 2.5, 1.5, 0.5, 1.2, 1.0, 0.6, 2.0, 0.8, 0.5),
        concentration=0.25, hour_peaks=((8.0, 1.5, 0.6), (21.0, 1.5, 0.6)),
        devices=(0.75, 0.15, 0.10), p_two_cookies=0.35, login=(0.30, 0.40, 0.10, 0.20),
        channels=(0.10, 0.15, 0.05, 0.20, 0.05, 0.05, 0, 0, 0.40),
        channels_sale=(0.03, 0.04, 0.01, 0.05, 0.02, 0, 0.45, 0.35, 0.05),
        p_marketing=0.85,
    ),
    Persona(
        name="window_shopper", weight=0.25,
        sessions_per_week=2.0, first_day_frac=0.20, last_day_frac=1.0,
        browse_mean=9.0, browse_mix=(0.25, 0.10, 0.50, 0.15), gap_mean_s=80,
        p_cart=0.04, p_cart_sale=0.05, extra_items=0.0, p_remove=0.50,
        p_checkout=0.0, p_purchase=0.0, qty_mix=(0.88, 0.09, 0.03), price_level=1.3,
        categories=(0.8, 0.8, 2.5, 3.0, 0.8, 2.0, 1.5, 0.6, 0.6, 0.4, 0.3, 2.0),
        concentration=0.2, hour_peaks=((23.5, 1.5, 1.0),), devices=(0.70, 0.10, 0.20),
        p_two_cookies=0.35, login=(0.10, 0.20, 0.20, 0.50),
        channels=(0.20, 0.25, 0.03, 0.02, 0.45, 0.05, 0, 0, 0),
        channels_sale=(0.15, 0.20, 0.02, 0.02, 0.40, 0.05, 0.06, 0.10, 0),
        p_marketing=0.5,
    ),
    Persona(
        name="cart_abandoner", weight=0.15,
        sessions_per_week=1.5, first_day_frac=0.20, last_day_frac=1.0,
        browse_mean=5.0, browse_mix=(0.20, 0.20, 0.58, 0.02), gap_mean_s=60,
        p_cart=0.75, p_cart_sale=0.80, extra_items=1.0, p_remove=0.30,
        p_checkout=0.35, p_purchase=0.04, qty_mix=(0.88, 0.09, 0.03), price_level=1.2,
        categories=(2.0, 2.0, 1.5, 1.0, 1.0, 1.0, 0.8, 2.0, 0.5, 0.8, 0.4, 1.0),
        concentration=0.4, hour_peaks=((16.0, 2.0, 1.0),), devices=(0.35, 0.55, 0.10),
        p_two_cookies=0.40, login=(0.30, 0.50, 0.10, 0.10),
        channels=(0.30, 0.30, 0.05, 0.05, 0.10, 0.20, 0, 0, 0),
        channels_sale=(0.25, 0.25, 0.05, 0.05, 0.10, 0.20, 0.05, 0.05, 0),
        p_marketing=0.4,
    ),
    Persona(
        name="lapsed_customer", weight=0.13,
        sessions_per_week=2.0, first_day_frac=0.08, last_day_frac=1 / 3,
        browse_mean=4.0, browse_mix=(0.30, 0.15, 0.52, 0.03), gap_mean_s=50,
        p_cart=0.35, p_cart_sale=0.40, extra_items=0.4, p_remove=0.10,
        p_checkout=0.70, p_purchase=0.85, qty_mix=(0.88, 0.09, 0.03), price_level=1.0,
        categories=(0.8, 0.6, 0.8, 1.0, 1.5, 0.5, 0.8, 2.0, 2.5, 2.0, 1.0, 0.5),
        concentration=0.5, hour_peaks=((19.0, 2.5, 1.0),), devices=(0.45, 0.40, 0.15),
        p_two_cookies=0.30, login=(0.40, 0.30, 0.10, 0.20),
        channels=(0.35, 0.30, 0.05, 0.20, 0.05, 0.05, 0, 0, 0),
        channels_sale=(0.30, 0.25, 0.05, 0.15, 0.05, 0.05, 0.10, 0.05, 0),
        p_marketing=0.5,
    ),
    Persona(
        name="new_visitor", weight=0.15,
        sessions_per_week=0.0, first_day_frac=0.0, last_day_frac=1.0,  # see NEW_VISITOR_DAYS
        browse_mean=3.0, browse_mix=(0.45, 0.15, 0.38, 0.02), gap_mean_s=45,
        p_cart=0.15, p_cart_sale=0.20, extra_items=0.2, p_remove=0.10,
        p_checkout=0.50, p_purchase=0.60, qty_mix=(0.88, 0.09, 0.03), price_level=0.9,
        categories=(1.0,) * N_CATEGORIES,
        concentration=0.15, hour_peaks=((14.0, 4.0, 1.0),), devices=(0.80, 0.15, 0.05),
        p_two_cookies=0.10, login=(0.0, 0.10, 0.05, 0.85),
        channels=(0.05, 0.45, 0.10, 0, 0.25, 0.15, 0, 0, 0),
        channels_sale=(0.05, 0.35, 0.10, 0, 0.25, 0.10, 0.05, 0.10, 0),
        p_marketing=0.3,
    ),
)
# fmt: on
PERSONA_NAMES = tuple(p.name for p in PERSONAS)
NEW_VISITOR = PERSONA_NAMES.index("new_visitor")


# --------------------------------------------------------------------------------------
# small helpers


def _seed_words(seed: int) -> list[int]:
    """SeedSequence entropy must be non-negative; keep the sign as a separate word."""
    return [abs(int(seed)), 1 if seed < 0 else 0]


class _Grouped:
    """Several discrete distributions, sampled for many (group, uniform) pairs at once."""

    def __init__(self, weights: list, values: list | None = None):
        cums, starts, ends, vals = [], [], [], []
        pos = 0
        for g, w in enumerate(weights):
            w = np.asarray(w, dtype=np.float64)
            if w.sum() <= 0:
                raise ValueError("a distribution needs a positive weight")
            c = np.cumsum(w) / w.sum()
            c[-1] = 1.0
            cums.append(g + c)
            starts.append(pos)
            pos += len(w)
            ends.append(pos)
            vals.append(np.arange(len(w)) if values is None else np.asarray(values[g]))
        self.cum = np.concatenate(cums)
        self.start = np.asarray(starts)
        self.end = np.asarray(ends)
        self.values = np.concatenate(vals)

    def sample(self, group: np.ndarray, u: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.cum, group + u, side="right")
        pos = np.clip(pos, self.start[group], self.end[group] - 1)
        return self.values[pos]


def _seg_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def _ts_strings(ms: np.ndarray) -> pa.StringArray:
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


def _join(*pieces) -> pa.StringArray:
    return pc.binary_join_element_wise(*pieces, "")


def _strings(values) -> pa.StringArray:
    return pa.array(list(values), type=pa.string())


# --------------------------------------------------------------------------------------
# the world: catalogue, calendar and lookup tables shared by all chunks


@dataclass
class _World:
    days: int
    start_ms: int
    product_cat: np.ndarray  # int8 per product
    product_cents: np.ndarray  # int32 base price per product
    product_sampler: _Grouped  # group = persona * N_CATEGORIES + category
    category_sampler: _Grouped  # group = persona
    hour_sampler: _Grouped  # group = persona
    device_sampler: _Grouped  # group = persona
    browse_sampler: _Grouped  # group = persona
    qty_sampler: _Grouped  # group = persona
    login_sampler: _Grouped  # group = persona
    channel_sampler: _Grouped  # group = persona * 2 + sale day
    geo_sampler: _Grouped
    persona_sampler: _Grouped
    day_campaign: np.ndarray  # int8 per day: index into SALE_CAMPAIGNS or -1
    sale_days: np.ndarray  # sorted day numbers
    sale_windows: list  # [(campaign, first day, last day)]
    # page table: home, category pages, search pages, product pages, cart, checkout,
    # confirmation, then external referrers
    page_home: int
    page_category: int
    page_search: int
    page_product: int
    page_cart: int
    page_checkout: int
    page_confirmation: int
    channel_referrer: np.ndarray  # page index or -1 per channel
    channel_utm: np.ndarray  # (channel, sale campaign) -> utm row or -1
    pages: list
    utm_rows: list


def _sale_windows(days: int) -> list[tuple[str, int, int]]:
    length = 4 if days >= 20 else max(1, days // 5)
    windows = []
    for name, frac in zip(SALE_CAMPAIGNS, (0.25, 0.70), strict=True):
        first = min(int(days * frac), days - 1)
        windows.append((name, first, min(first + length, days) - 1))
    return windows


def _build_world(settings: GenerateConfig) -> _World:
    rng = np.random.default_rng([*_seed_words(settings.seed), 0])
    days = settings.days
    n_pers = len(PERSONAS)

    shares = np.array([c[2] for c in CATEGORIES])
    product_cat = rng.choice(N_CATEGORIES, size=N_PRODUCTS, p=shares / shares.sum())
    product_cat = product_cat.astype(np.int8)
    medians = np.array([c[1] for c in CATEGORIES], dtype=np.float64)
    price = np.exp(np.log(medians[product_cat]) + rng.normal(0.0, 0.75, N_PRODUCTS))
    product_cents = (np.clip(np.round(price), 1, 9999) * 100 - 1).astype(np.int32)
    # Zipf-like popularity: a random rank inside the category, weight 1 / rank^1.1
    popularity = np.empty(N_PRODUCTS)
    for c in range(N_CATEGORIES):
        members = np.flatnonzero(product_cat == c)
        ranks = rng.permutation(len(members)) + 1
        popularity[members] = 1.0 / ranks**1.1

    weights, values = [], []
    for p in PERSONAS:
        for c in range(N_CATEGORIES):
            members = np.flatnonzero(product_cat == c)
            target = np.log(medians[c] * p.price_level)
            fit = np.exp(-((np.log(product_cents[members] / 100) - target) ** 2) / (2 * 0.5**2))
            weights.append(popularity[members] * (fit + 1e-6))
            values.append(members)
    product_sampler = _Grouped(weights, values)

    hours = np.arange(24) + 0.5
    hour_weights = []
    for p in PERSONAS:
        w = np.full(24, 0.03)
        for centre, sigma, weight in p.hour_peaks:
            dist = np.abs(hours - centre)
            dist = np.minimum(dist, 24 - dist)
            w += weight * np.exp(-(dist**2) / (2 * sigma**2))
        hour_weights.append(w)

    campaign = np.full(days, -1, dtype=np.int8)
    windows = _sale_windows(days)
    for k, (_, first, last) in enumerate(windows):
        campaign[first : last + 1] = k

    pages = [f"{SHOP}/"]
    page_category = len(pages)
    pages += [f"{SHOP}/c/{c[0]}" for c in CATEGORIES]
    page_search = len(pages)
    pages += [f"{SHOP}/search?q={t.replace(' ', '+')}" for c in CATEGORIES for t in c[3]]
    page_product = len(pages)
    pages += [f"{SHOP}/p/p{i:05d}" for i in range(N_PRODUCTS)]
    page_cart = len(pages)
    pages += [f"{SHOP}/cart", f"{SHOP}/checkout", f"{SHOP}/checkout/confirmation"]
    utm_rows: list = []
    channel_referrer = np.full(len(CHANNELS), -1, dtype=np.int32)
    channel_utm = np.full((len(CHANNELS), len(SALE_CAMPAIGNS) + 1), -1, dtype=np.int8)
    for ch, (_, referrer, utm) in enumerate(CHANNELS):
        if referrer is not None:
            if referrer not in pages:
                pages.append(referrer)
            channel_referrer[ch] = pages.index(referrer)
        if utm is None:
            continue
        names = SALE_CAMPAIGNS if utm[2] == SALE else (utm[2],) * (len(SALE_CAMPAIGNS) + 1)
        for k, name in enumerate(names):
            row = (utm[0], utm[1], name)
            if row not in utm_rows:
                utm_rows.append(row)
            channel_utm[ch, k] = utm_rows.index(row)
        if utm[2] == SALE:  # a sale channel on an ordinary day never happens; be safe
            channel_utm[ch, -1] = channel_utm[ch, 0]

    channel_weights = []
    for p in PERSONAS:
        channel_weights += [p.channels, p.channels_sale]

    return _World(
        days=days,
        start_ms=(settings.start - EPOCH) // timedelta(milliseconds=1),
        product_cat=product_cat,
        product_cents=product_cents,
        product_sampler=product_sampler,
        category_sampler=_Grouped([p.categories for p in PERSONAS]),
        hour_sampler=_Grouped(hour_weights),
        device_sampler=_Grouped([p.devices for p in PERSONAS]),
        browse_sampler=_Grouped(
            [p.browse_mix for p in PERSONAS],
            [np.array([PAGE_VIEW, SEARCH, PRODUCT_VIEW, WISHLIST])] * n_pers,
        ),
        qty_sampler=_Grouped([p.qty_mix for p in PERSONAS], [np.array([1, 2, 3])] * n_pers),
        login_sampler=_Grouped([p.login for p in PERSONAS]),
        channel_sampler=_Grouped(channel_weights),
        geo_sampler=_Grouped([[g[2] for g in GEOS]]),
        persona_sampler=_Grouped([[p.weight for p in PERSONAS]]),
        day_campaign=campaign,
        sale_days=np.flatnonzero(campaign >= 0),
        sale_windows=windows,
        page_home=0,
        page_category=page_category,
        page_search=page_search,
        page_product=page_product,
        page_cart=page_cart,
        page_checkout=page_cart + 1,
        page_confirmation=page_cart + 2,
        channel_referrer=channel_referrer,
        channel_utm=channel_utm,
        pages=pages,
        utm_rows=utm_rows,
    )


def _persona_array(attr: str, dtype=np.float64) -> np.ndarray:
    return np.array([getattr(p, attr) for p in PERSONAS], dtype=dtype)


# --------------------------------------------------------------------------------------
# simulation of one chunk of users


def _simulate_chunk(world: _World, seed: int, chunk: int, n_users: int) -> dict:
    """Users, anonymous ids and events (in user, time order) of one chunk; indices are local."""
    rng = np.random.default_rng([*_seed_words(seed), 1, chunk])
    days = world.days
    U = n_users
    zeros = np.zeros(U, dtype=np.int64)

    # ---- users
    persona = world.persona_sampler.sample(zeros, rng.random(U)).astype(np.int8)
    first = np.floor(
        rng.random(U) * (np.floor(_persona_array("first_day_frac") * days) + 1)[persona]
    ).astype(np.int64)
    last_by_persona = np.maximum(np.ceil(_persona_array("last_day_frac") * days) - 1, 0)
    last = last_by_persona[persona].astype(np.int64)
    first = np.minimum(first, last)
    is_new = persona == NEW_VISITOR
    first[is_new] = max(0, days - NEW_VISITOR_DAYS)
    span = last - first + 1
    rate = _persona_array("sessions_per_week")[persona] / 7.0 * span
    rate *= rng.gamma(6.0, 1.0 / 6.0, U)
    n_sessions = np.maximum(rng.poisson(rate), 1)
    n_sessions[is_new] = 1 + np.searchsorted([0.5, 0.8], rng.random(int(is_new.sum())))
    favourite = world.category_sampler.sample(persona, rng.random(U))
    geo = world.geo_sampler.sample(zeros, rng.random(U))

    # ---- cookies: 1-2 per user, ~0.5 % of them shared by two users
    n_slots = 1 + (rng.random(U) < _persona_array("p_two_cookies")[persona])
    n_shared = int(rng.binomial(int(n_slots.sum()), SHARED_ANON_SHARE)) if U >= 2 else 0
    n_shared = min(n_shared, U // 2)
    pairs = rng.permutation(U)[: 2 * n_shared].reshape(-1, 2)  # (owner, borrower)
    own_slots = n_slots.copy()
    borrower = np.zeros(U, dtype=bool)
    borrower[pairs[:, 1]] = True
    own_slots[borrower] = 1  # the borrower's second cookie is the owner's first one
    n_slots[borrower] = 2
    anon_base = _seg_starts(own_slots)
    n_anon = int(own_slots.sum())
    slot_anon = np.stack([anon_base, np.where(own_slots == 2, anon_base + 1, -1)], axis=1)
    slot_anon[pairs[:, 1], 1] = anon_base[pairs[:, 0]]
    geo[pairs[:, 1]] = geo[pairs[:, 0]]  # same household
    shared_anon = np.full(U, -1, dtype=np.int64)
    shared_anon[pairs[:, 0]] = anon_base[pairs[:, 0]]
    shared_anon[pairs[:, 1]] = anon_base[pairs[:, 0]]
    anon_owner = np.repeat(np.arange(U), own_slots)
    anon_device = world.device_sampler.sample(persona[anon_owner], rng.random(n_anon))
    anon_device[anon_base[pairs[:, 0]]] = DESKTOP  # the family computer
    analytics = rng.random(n_anon) < 0.92
    marketing = rng.random(n_anon) < _persona_array("p_marketing")[persona[anon_owner]]
    anon_consent = (analytics.astype(np.int8) * 2 + marketing).astype(np.int8)

    # ---- sessions: day and hour, sorted per user
    S = int(n_sessions.sum())
    s_user = np.repeat(np.arange(U), n_sessions)
    sp = persona[s_user]
    day = first[s_user] + np.floor(rng.random(S) * span[s_user]).astype(np.int64)
    on_sale = rng.random(S) < _persona_array("p_sale_day")[sp]
    if len(world.sale_days) and on_sale.any():
        k0 = np.searchsorted(world.sale_days, first[s_user])
        k1 = np.searchsorted(world.sale_days, last[s_user], side="right")
        ok = on_sale & (k1 > k0)
        pick = k0 + np.floor(rng.random(S) * (k1 - k0)).astype(np.int64)
        day[ok] = world.sale_days[np.minimum(pick, len(world.sale_days) - 1)[ok]]
    hour = world.hour_sampler.sample(sp.astype(np.int64), rng.random(S))
    start = day * DAY_MS + hour * HOUR_MS + rng.integers(0, HOUR_MS, S)
    order = np.lexsort((start, s_user))
    start = start[order]
    campaign = world.day_campaign[start // DAY_MS]
    sale = campaign >= 0

    # ---- session structure
    n_b = np.minimum(1 + rng.poisson(_persona_array("browse_mean")[sp] - 1), 40)
    p_cart = np.where(sale, _persona_array("p_cart_sale")[sp], _persona_array("p_cart")[sp])
    has_cart = rng.random(S) < p_cart
    n_c = has_cart * (1 + np.minimum(rng.poisson(_persona_array("extra_items")[sp]), 5))
    removed = (n_c > 0) & (rng.random(S) < _persona_array("p_remove")[sp])
    kept = n_c - removed
    checkout = (kept > 0) & (rng.random(S) < _persona_array("p_checkout")[sp])
    bought = checkout & (rng.random(S) < _persona_array("p_purchase")[sp])
    n_p = bought * kept
    cart_seg = np.where(n_c > 0, 2 * n_c - 1, 0)
    total = n_b + cart_seg + removed + checkout + n_p

    # ---- events
    E = int(total.sum())
    ev_s = np.repeat(np.arange(S), total)
    s_first = _seg_starts(total)
    pos = np.arange(E) - s_first[ev_s]
    ep = sp[ev_s].astype(np.int64)
    b = n_b[ev_s]
    cart_end = b + cart_seg[ev_s]
    remove_end = cart_end + removed[ev_s]
    checkout_end = remove_end + checkout[ev_s]

    etype = world.browse_sampler.sample(ep, rng.random(E)).astype(np.int8)
    etype[(pos == 0) & (etype == WISHLIST)] = PRODUCT_VIEW
    etype[(pos == b - 1) & (n_c[ev_s] > 0)] = PRODUCT_VIEW
    in_cart = (pos >= b) & (pos < cart_end)
    etype[in_cart] = np.where((pos[in_cart] - b[in_cart]) % 2 == 0, ADD_TO_CART, PRODUCT_VIEW)
    etype[(pos >= cart_end) & (pos < remove_end)] = REMOVE_FROM_CART
    etype[(pos >= remove_end) & (pos < checkout_end)] = CHECKOUT
    is_purchase = pos >= checkout_end
    etype[is_purchase] = PURCHASE

    category = world.category_sampler.sample(ep, rng.random(E))
    fav = rng.random(E) < _persona_array("concentration")[ep]
    category[fav] = favourite[s_user[ev_s[fav]]]
    after_search = np.flatnonzero(pos > 0)
    after_search = after_search[etype[after_search - 1] == SEARCH]
    category[after_search] = category[after_search - 1]

    product = np.full(E, -1, dtype=np.int32)
    viewed = (etype == PRODUCT_VIEW) | (etype == WISHLIST)
    product[viewed] = world.product_sampler.sample(
        ep[viewed] * N_CATEGORIES + category[viewed], rng.random(int(viewed.sum()))
    )
    qty = np.zeros(E, dtype=np.int8)
    atc = np.flatnonzero(etype == ADD_TO_CART)
    product[atc] = product[atc - 1]
    qty[atc] = world.qty_sampler.sample(ep[atc], rng.random(len(atc)))
    rm = np.flatnonzero(etype == REMOVE_FROM_CART)
    product[rm] = product[rm - 1]
    qty[rm] = qty[rm - 1]
    pur = np.flatnonzero(is_purchase)
    src = s_first[ev_s[pur]] + b[pur] + 2 * (pos[pur] - checkout_end[pur])
    product[pur] = product[src]
    qty[pur] = qty[src]

    has_product = product >= 0
    search = np.full(E, -1, dtype=np.int16)
    is_search = etype == SEARCH
    search[is_search] = category[is_search] * TERMS_PER_CATEGORY + rng.integers(
        0, TERMS_PER_CATEGORY, int(is_search.sum())
    )

    page = np.empty(E, dtype=np.int32)
    is_pv = etype == PAGE_VIEW
    home = is_pv & (pos == 0) & (rng.random(E) < 0.5)
    page[is_pv] = world.page_category + category[is_pv]
    page[home] = world.page_home
    page[is_search] = world.page_search + search[is_search]
    page[has_product] = world.page_product + product[has_product]
    page[(etype == ADD_TO_CART) | (etype == REMOVE_FROM_CART)] = world.page_cart
    page[etype == CHECKOUT] = world.page_checkout
    page[is_purchase] = world.page_confirmation

    # ---- timing: gaps inside sessions, clamping to the active window, no overlaps
    gap_mean = (_persona_array("gap_mean_s")[ep] - MIN_EVENT_GAP_MS / 1000) * 1000
    gap = MIN_EVENT_GAP_MS + np.minimum(rng.exponential(1.0, E) * gap_mean, MAX_EVENT_GAP_MS)
    gap = gap.astype(np.int64)
    next_items = is_purchase & (pos > checkout_end)  # one order: items a few ms apart
    gap[next_items] = rng.integers(1, 50, int(next_items.sum()))
    gap[pos == 0] = 0
    offset = np.cumsum(gap)
    offset -= offset[s_first][ev_s]
    duration = offset[s_first + total - 1]

    window_start = first[s_user] * DAY_MS
    window_end = (last[s_user] + 1) * DAY_MS
    start = np.clip(start, window_start, np.maximum(window_start, window_end - duration - 1))
    u_first = _seg_starts(n_sessions)
    step = duration + MIN_SESSION_GAP_MS
    c = np.cumsum(step) - step  # exclusive running sum ...
    c = c - c[u_first][s_user]  # ... restarted for every user
    key = start - c
    lift = int(key.max() - key.min() + 1)
    key = key + s_user.astype(np.int64) * lift
    start = np.maximum.accumulate(key) - s_user.astype(np.int64) * lift + c
    end = start + duration
    keep_session = end < window_end
    keep_session[u_first] = True
    # a pushed session may have moved to another day: prices and campaigns follow its start
    campaign = world.day_campaign[np.minimum(start // DAY_MS, days - 1)]
    sale = campaign >= 0
    base = world.product_cents[np.maximum(product, 0)]
    price = np.where(sale[ev_s], np.round(base * SALE_DISCOUNT), base).astype(np.int32)
    price[~has_product] = 0

    # ---- identity: login point, cookie and channel per session
    login_kind = world.login_sampler.sample(sp.astype(np.int64), rng.random(S))
    login_at = np.select(
        [login_kind == 0, (login_kind == 1) & (n_c > 0), login_kind == 2],
        [0, n_b, np.floor(rng.random(S) * total).astype(np.int64)],
        default=total,
    )
    co_pos = n_b + cart_seg + removed
    login_at = np.where(checkout, np.minimum(login_at, co_pos), login_at)
    logged = pos >= login_at[ev_s]
    second = (n_slots[s_user] == 2) & (rng.random(S) < 0.35)
    s_anon = slot_anon[s_user, second.astype(np.int64)]
    channel = world.channel_sampler.sample(sp.astype(np.int64) * 2 + sale, rng.random(S))
    s_utm = world.channel_utm[channel, np.where(sale, campaign, len(SALE_CAMPAIGNS))]
    referrer = np.empty(E, dtype=np.int32)
    referrer[1:] = page[:-1]
    referrer[s_first] = world.channel_referrer[channel]

    keep = keep_session[ev_s]
    ev_session_start = start[ev_s]
    events = {
        "ts": (world.start_ms + ev_session_start + offset)[keep],
        "type": etype[keep],
        "user": s_user[ev_s][keep].astype(np.int32),
        "logged": logged[keep],
        "anon": s_anon[ev_s][keep].astype(np.int32),
        "product": product[keep],
        "price": price[keep],
        "qty": qty[keep],
        "search": search[keep],
        "page": page[keep],
        "referrer": referrer[keep],
        "utm": s_utm[ev_s][keep],
    }
    ev_user = events["user"]
    first_ix = np.searchsorted(ev_user, np.arange(U))
    last_ix = np.searchsorted(ev_user, np.arange(U), side="right") - 1
    users = {
        "persona": persona,
        "geo": geo.astype(np.int8),
        "first_seen": events["ts"][first_ix],
        "last_seen": events["ts"][last_ix],
        "slot_anon": slot_anon,
        "shared_anon": shared_anon,
    }
    anons = {"device": anon_device.astype(np.int8), "consent": anon_consent}
    return {"events": events, "users": users, "anons": anons, "n_anon": n_anon}


# --------------------------------------------------------------------------------------
# rendering


class _Tables:
    """String lookup tables used to render records (JSON fragments and plain values)."""

    def __init__(self, world: _World, seed: int, n_users: int, n_anon: int, users, anons):
        self.seed = seed
        q = json.dumps
        uid = _padded("u", np.arange(n_users), 7)
        aid = _padded("a", np.arange(n_anon), 8)
        email = _join(uid, "@example.com")
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
        self.devices = _strings(DEVICES)
        self.country = _strings(g[0] for g in GEOS)
        self.city = _strings(g[1] for g in GEOS)
        self.utm = [pa.array([r[k] for r in world.utm_rows], type=pa.string()) for k in range(3)]
        self.user_geo = users["geo"]
        self.anon_device = anons["device"]
        self.anon_consent = anons["consent"]
        self.n_users = n_users
        self.n_anon = n_anon

        # JSON fragments
        self.j_type = _strings([q(t) for t in EVENT_TYPES] + [q("hover"), "null"])
        self.j_user_head = pa.concat_arrays(
            [_join('"', uid, '","anon_id":'), _strings(['null,"anon_id":'])]
        )
        self.j_anon = pa.concat_arrays([_join('"', aid, '"'), _strings(["null"])])
        self.j_user_tail = pa.concat_arrays(
            [_join(',"email":"', email, '"},"product":'), _strings([',"email":null},"product":'])]
        )
        self.j_product = _strings(
            [
                f'{{"id":{q(pid)},"category":{q(CATEGORIES[c][0])},"price":'
                for pid, c in zip(pids, world.product_cat, strict=True)
            ]
            + ["null"]
        )
        self.j_cents = _strings(
            [f".{f // 10}}}" if f % 10 == 0 else f".{f:02d}}}" for f in range(100)]
        )
        self.j_qty = _strings(
            [',"qty":null,"currency":"EUR","search":']
            + [f',"qty":{k},"currency":"EUR","search":' for k in range(1, 128)]
        )
        self.j_search = _strings(
            [q(t) + ',"page":{"url":"' for t in terms] + ['null,"page":{"url":"']
        )
        self.j_referrer = _strings([q(p) for p in world.pages] + ["null"])
        self.j_device_geo = _strings(
            [
                f'}},"device":{q(d)},"geo":{{"country":{q(g[0])},"city":{q(g[1])}}},"utm":'
                for d in DEVICES
                for g in GEOS
            ]
        )
        self.j_utm = _strings(
            [
                f'{{"source":{q(r[0])},"medium":{q(r[1])},"campaign":{q(r[2])}}}'
                for r in world.utm_rows
            ]
            + ["null"]
        )
        self.j_consent = _strings(
            [
                f',"consent":{{"analytics":{q(bool(code // 2))},'
                f'"marketing":{q(bool(code % 2))}}}}}\n'
                for code in range(4)
            ]
        )


def _null_index(values: np.ndarray, null_value: int) -> pa.Array:
    """Indices into a lookup table whose last entry (null_value) stands for null."""
    return pa.array(np.where(values < 0, null_value, values).astype(np.int64))


def _prepared(rows: np.ndarray, ev: dict, inv: np.ndarray, world: _World) -> dict:
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
    ts = _ts_strings(g["ts_ms"])
    bad = g["inv"] == INV_BAD_TS
    if bad.any():
        ts = pc.if_else(pa.array(bad), pa.scalar(UNPARSEABLE_TS), ts)
    return ts


def _render_json(rows: np.ndarray, g: dict, t: _Tables, malformed: np.ndarray) -> pa.Array:
    has_product = g["product"] >= 0
    cents = g["price"].astype(np.int64)
    price = _join(
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
    lines = _join(*pieces)
    bad = malformed[rows]
    if bad.any():
        where = np.flatnonzero(bad)
        rng = np.random.default_rng([*_seed_words(t.seed), 3, int(rows[0])])
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


def _render_parquet(rows: np.ndarray, g: dict, t: _Tables) -> pa.Table:
    n = len(rows)
    user = _null_index(g["user_shown"], t.n_users)
    product = _null_index(g["product"], N_PRODUCTS)
    has_product = g["product"] >= 0
    utm = g["utm"].astype(np.int64)
    utm_ix = pa.array(np.maximum(utm, 0))
    geo = pa.array(t.user_geo[g["user"]].astype(np.int64))
    consent = t.anon_consent[g["anon"]]
    columns = [
        _join(f"ev-{t.seed}-", pc.cast(pa.array(rows.astype(np.int64)), pa.string())),
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


def _string_bytes(arr: pa.StringArray) -> memoryview:
    """The concatenated characters of a string array (no separators)."""
    _, offsets_buf, data = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    return memoryview(data)[int(offsets[0]) : int(offsets[-1])]


# --------------------------------------------------------------------------------------
# public API


def _simulate_all(settings: GenerateConfig, world: _World, progress) -> tuple[dict, dict, dict]:
    n_chunks = math.ceil(settings.users / USERS_PER_CHUNK)
    ev_parts: dict[str, list] = {}
    user_parts: dict[str, list] = {}
    anon_parts: dict[str, list] = {}
    user_offset = anon_offset = 0
    for chunk in range(n_chunks):
        n = min(USERS_PER_CHUNK, settings.users - user_offset)
        part = _simulate_chunk(world, settings.seed, chunk, n)
        part["events"]["user"] += user_offset
        part["events"]["anon"] += anon_offset
        slot_anon = part["users"]["slot_anon"]
        part["users"]["slot_anon"] = np.where(slot_anon >= 0, slot_anon + anon_offset, -1)
        shared = part["users"]["shared_anon"]
        part["users"]["shared_anon"] = np.where(shared >= 0, shared + anon_offset, -1)
        for store, values in (
            (ev_parts, part["events"]),
            (user_parts, part["users"]),
            (anon_parts, part["anons"]),
        ):
            for key, value in values.items():
                store.setdefault(key, []).append(value)
        user_offset += n
        anon_offset += part["n_anon"]
        if progress:
            progress(
                f"simulated users {user_offset}/{settings.users} "
                f"({sum(len(a) for a in ev_parts['ts'])} events)"
            )
    events = {}
    for key in list(ev_parts):
        events[key] = np.concatenate(ev_parts.pop(key))
    users = {key: np.concatenate(v) for key, v in user_parts.items()}
    anons = {key: np.concatenate(v) for key, v in anon_parts.items()}
    return events, users, anons


def _check_shares(settings: GenerateConfig) -> None:
    shares = [settings.duplicate_share, settings.late_share, settings.invalid_share]
    if settings.format == "json":
        shares.append(settings.malformed_share)
    if sum(shares) > 1:
        raise ValueError(
            f"the fault shares add up to {sum(shares):g} of the clean events, but every fault "
            "needs a record of its own: keep their sum at most 1"
        )


def _plan_faults(settings: GenerateConfig, events: dict, day: np.ndarray, days: int) -> dict:
    """Choose distinct records for every fault kind (exact counts).

    `day` is the UTC day of each (time-sorted) record counted from the first file day;
    `days` is the number of file days.
    """
    n = len(day)
    rng = np.random.default_rng([*_seed_words(settings.seed), 2])
    want_malformed = math.floor(n * settings.malformed_share) if settings.format == "json" else 0
    want = {
        "late": math.floor(n * settings.late_share),
        "duplicate": math.floor(n * settings.duplicate_share),
        "malformed": want_malformed,
    }
    n_invalid = math.floor(n * settings.invalid_share)
    per_kind = [n_invalid // len(INVALID_KINDS)] * len(INVALID_KINDS)
    for k in range(n_invalid % len(INVALID_KINDS)):
        per_kind[k] += 1
    assert sum(want.values()) + n_invalid <= n  # guaranteed by _check_shares
    any_fault = sum(want.values()) + n_invalid > 0
    perm = rng.permutation(n) if any_fault else np.zeros(0, dtype=np.int64)
    used = np.zeros(n, dtype=bool)

    def pick(count: int, eligible: np.ndarray | None = None) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        ok = ~used[perm]
        if eligible is not None:
            ok &= eligible[perm]
        chosen = np.sort(perm[ok][:count])
        used[chosen] = True
        return chosen

    late = pick(want["late"], day <= days - 2)
    has_product = events["product"] >= 0
    inv = np.zeros(n, dtype=np.int8)
    negative = pick(per_kind[INV_NEGATIVE_PRICE - 1], has_product)
    inv[negative] = INV_NEGATIVE_PRICE
    duplicate = pick(want["duplicate"])
    malformed_ix = pick(want["malformed"])
    invalid_counts = {}
    for code, kind in enumerate(INVALID_KINDS, start=1):
        if code == INV_NEGATIVE_PRICE:
            invalid_counts[kind] = len(negative)
            continue
        chosen = pick(per_kind[code - 1])
        inv[chosen] = code
        invalid_counts[kind] = len(chosen)

    file_day = day.copy()
    lag = 1 + rng.integers(0, 3, len(late))
    file_day[late] = np.minimum(day[late] + lag, days - 1)
    dup_day = day[duplicate] + (rng.random(len(duplicate)) < 0.5)
    dup_day = np.minimum(dup_day, days - 1)
    malformed = np.zeros(n, dtype=bool)
    malformed[malformed_ix] = True
    return {
        "file_day": file_day,
        "duplicate": duplicate,
        "dup_day": dup_day,
        "inv": inv,
        "malformed": malformed,
        "requested": {**want, "invalid": n_invalid},
        "counts": {
            "malformed": len(malformed_ix),
            "duplicate": len(duplicate),
            "late": len(late),
            "invalid": invalid_counts,
            "invalid_total": sum(invalid_counts.values()),
        },
    }


def _write_users_csv(path: Path, users: dict, tables: _Tables) -> None:
    n = len(users["persona"])
    slot = users["slot_anon"]
    has_second = slot[:, 1] >= 0
    anon_list = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(1 + has_second)]).astype(np.int32)),
        tables.anon_id.take(pa.array(slot[slot >= 0].reshape(-1))),
    )
    # slot[slot >= 0] keeps row order: first, (second) per user
    shared = users["shared_anon"]
    shared_ids = pc.if_else(
        pa.array(shared >= 0),
        tables.anon_id.take(pa.array(np.maximum(shared, 0))),
        pa.scalar(""),
    )
    lines = _join(
        tables.user_id.slice(0, n),
        ",",
        _strings(PERSONA_NAMES).take(pa.array(users["persona"].astype(np.int64))),
        ",",
        _ts_strings(users["first_seen"]),
        ",",
        _ts_strings(users["last_seen"]),
        ",",
        pc.binary_join(anon_list, ";"),
        ",",
        shared_ids,
        "\n",
    )
    with open(path, "wb") as fh:
        fh.write(b"user_id,persona,first_seen,last_seen,anonymous_ids,shared_anonymous_id\n")
        fh.write(_string_bytes(lines))


def generate(
    settings: GenerateConfig,
    output: str | Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Simulate the users and write events, ground truth and manifest; return the manifest.

    Files under `output` (default `settings.output`):

    * `events/events-YYYY-MM-DD.jsonl` (or `.parquet`): one file per UTC day of event time,
      rows sorted by ts. Earlier `events-*.jsonl|parquet` files there are removed first.
    * `users.csv`: user_id, persona, first_seen, last_seen, anonymous_ids (';'-joined),
      shared_anonymous_id (empty unless the user shares a cookie with another user).
    * `manifest.json`: the settings, counts and the exact number of injected faults.

    Faults (shares of the clean event count, rounded down, each on distinct records):
    `malformed` lines are cut in the middle (JSON only), `duplicate` records are exact copies
    in the same or the next day's file, `late` records sit in a file 1-3 days after their
    event day (valid data; only records at least two days before the end can be late), and
    `invalid` records replace clean ones with one of INVALID_KINDS.
    """
    _check_shares(settings)
    out = Path(output if output is not None else settings.output)
    events_dir = out / "events"
    events_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*events_dir.glob("events-*.jsonl"), *events_dir.glob("events-*.parquet")]:
        stale.unlink()

    world = _build_world(settings)
    events, users, anons = _simulate_all(settings, world, progress)

    order = np.argsort(events["ts"], kind="stable")
    for key in list(events):
        events[key] = events[key][order]
    del order
    n_clean = len(events["ts"])
    # files are per UTC calendar day (the range need not start at midnight)
    first_day = world.start_ms // DAY_MS
    n_days = (world.start_ms + settings.days * DAY_MS - 1) // DAY_MS - first_day + 1
    day = (events["ts"] // DAY_MS - first_day).astype(np.int32)
    plan = _plan_faults(settings, events, day, n_days)
    del day

    src = np.concatenate([np.arange(n_clean, dtype=np.int64), plan["duplicate"]])
    file_day = np.concatenate([plan["file_day"], plan["dup_day"]]).astype(np.int64)
    row_order = np.argsort(file_day * (n_clean + 1) + src, kind="stable")
    src = src[row_order]
    file_day = file_day[row_order]
    del row_order
    bounds = np.searchsorted(file_day, np.arange(n_days + 1))

    n_anon = len(anons["device"])
    tables = _Tables(world, settings.seed, settings.users, n_anon, users, anons)
    ext = "jsonl" if settings.format == "json" else "parquet"
    start_date = datetime.fromtimestamp(first_day * DAY_MS / 1000, tz=timezone.utc).date()

    def write_day(d: int) -> dict | None:
        rows_all = src[bounds[d] : bounds[d + 1]]
        if len(rows_all) == 0:
            return None
        name = f"events-{start_date + timedelta(days=d)}.{ext}"
        path = events_dir / name
        if settings.format == "json":
            with open(path, "wb") as fh:
                for lo in range(0, len(rows_all), JSON_RENDER_ROWS):
                    rows = rows_all[lo : lo + JSON_RENDER_ROWS]
                    g = _prepared(rows, events, plan["inv"], world)
                    fh.write(_string_bytes(_render_json(rows, g, tables, plan["malformed"])))
        else:
            with pq.ParquetWriter(path, PARQUET_SCHEMA, compression="zstd") as writer:
                for lo in range(0, len(rows_all), PARQUET_ROW_GROUP):
                    rows = rows_all[lo : lo + PARQUET_ROW_GROUP]
                    g = _prepared(rows, events, plan["inv"], world)
                    writer.write_table(_render_parquet(rows, g, tables), len(rows))
        return {"path": f"events/{name}", "records": int(len(rows_all))}

    # days are independent: render and write two at a time (numpy and pyarrow release the GIL)
    files = []
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        for entry in pool.map(write_day, range(n_days)):
            if entry is None:
                continue
            files.append(entry)
            if progress:
                progress(f"wrote {entry['path']} ({entry['records']} records)")

    _write_users_csv(out / "users.csv", users, tables)

    start_utc = settings.start.astimezone(timezone.utc)
    type_counts = np.bincount(events["type"].astype(np.int64), minlength=len(EVENT_TYPES))
    persona_counts = np.bincount(users["persona"].astype(np.int64), minlength=len(PERSONAS))
    counts = plan["counts"]
    total_records = int(len(src))
    manifest = {
        "generator": {"name": "microseg.ingest.generate", "version": GENERATOR_VERSION},
        "settings": {**settings.model_dump(mode="json"), "output": str(out)},
        "format": settings.format,
        "users": settings.users,
        "anonymous_ids": n_anon,
        "shared_anonymous_ids": int((users["shared_anon"] >= 0).sum() // 2),
        "personas": {name: int(c) for name, c in zip(PERSONA_NAMES, persona_counts, strict=True)},
        "clean_events": n_clean,
        "events_per_type": {name: int(c) for name, c in zip(EVENT_TYPES, type_counts, strict=True)},
        "faults": counts,
        "faults_requested": plan["requested"],
        "valid_unique_events": n_clean - counts["malformed"] - counts["invalid_total"],
        "total_records": total_records,
        "files": files,
        "sale_windows": [
            {
                "campaign": name,
                "first_day": (start_utc + timedelta(days=first)).date().isoformat(),
                "last_day": (start_utc + timedelta(days=last)).date().isoformat(),
                "discount": round(1 - SALE_DISCOUNT, 2),
            }
            for name, first, last in world.sale_windows
        ],
        "products": N_PRODUCTS,
        "categories": [c[0] for c in CATEGORIES],
        "notes": [
            "clean_events counts simulated events; malformed and invalid records replace "
            "clean ones, duplicates add exact copies, late records are clean but sit in a "
            "later day's file.",
            "events_per_type counts the clean events (before any fault was injected).",
            "total_records = clean_events + faults.duplicate.",
            "faults_requested = floor(share * clean_events); faults may be fewer when records "
            "do not qualify (late records need an event day at least two days before the last "
            "file day).",
        ]
        + (
            ["malformed records are not applicable to parquet output: 0 were injected."]
            if settings.format == "parquet"
            else []
        ),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        progress(f"done: {total_records} records in {len(files)} files under {out}")
    return manifest


@lru_cache(maxsize=1)
def _events_per_user() -> float:
    settings = GenerateConfig(seed=12345, users=USERS_PER_CHUNK)
    world = _build_world(settings)
    part = _simulate_chunk(world, settings.seed, 0, USERS_PER_CHUNK)
    return len(part["events"]["ts"]) / USERS_PER_CHUNK


def estimate_users_for_events(n_events: int) -> int:
    """Users needed for about `n_events` clean events (default persona mix and 60 days)."""
    return max(1, round(n_events / _events_per_user()))
