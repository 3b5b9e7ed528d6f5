"""The generator's world: catalogue, calendar, personas and the samplers shared by all chunks.

Everything here is fixed by the settings' seed and date range, so every chunk of users is
simulated against the same products, prices, sale days and page table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np

from microseg.core.config import DEFAULT_EVENT_TYPES, GenerateConfig

DAY_MS = 86_400_000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
HOUR_MS = 3_600_000
SALE_DISCOUNT = 0.7
N_PRODUCTS = 5_000
SHOP = "https://shop.example.com"

EVENT_TYPES = DEFAULT_EVENT_TYPES  # the generator's type codes index this tuple
PAGE_VIEW, PRODUCT_VIEW, SEARCH, ADD_TO_CART, REMOVE_FROM_CART, WISHLIST, CHECKOUT, PURCHASE = (
    range(8)
)
HOVER, TYPE_NULL = 8, 9  # codes only used by invalid records
PRODUCT_TYPES = (PRODUCT_VIEW, ADD_TO_CART, REMOVE_FROM_CART, WISHLIST, PURCHASE)

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
# seeds and samplers


def seed_words(seed: int) -> list[int]:
    """SeedSequence entropy must be non-negative; keep the sign as a separate word."""
    return [abs(int(seed)), 1 if seed < 0 else 0]


class Grouped:
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


# --------------------------------------------------------------------------------------
# the world: catalogue, calendar and lookup tables shared by all chunks


@dataclass
class World:
    days: int
    start_ms: int
    product_cat: np.ndarray  # int8 per product
    product_cents: np.ndarray  # int32 base price per product
    product_sampler: Grouped  # group = persona * N_CATEGORIES + category
    category_sampler: Grouped  # group = persona
    hour_sampler: Grouped  # group = persona
    device_sampler: Grouped  # group = persona
    browse_sampler: Grouped  # group = persona
    qty_sampler: Grouped  # group = persona
    login_sampler: Grouped  # group = persona
    channel_sampler: Grouped  # group = persona * 2 + sale day
    geo_sampler: Grouped
    persona_sampler: Grouped
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


def build_world(settings: GenerateConfig) -> World:
    rng = np.random.default_rng([*seed_words(settings.seed), 0])
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
    product_sampler = Grouped(weights, values)

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

    return World(
        days=days,
        start_ms=(settings.start - EPOCH) // timedelta(milliseconds=1),
        product_cat=product_cat,
        product_cents=product_cents,
        product_sampler=product_sampler,
        category_sampler=Grouped([p.categories for p in PERSONAS]),
        hour_sampler=Grouped(hour_weights),
        device_sampler=Grouped([p.devices for p in PERSONAS]),
        browse_sampler=Grouped(
            [p.browse_mix for p in PERSONAS],
            [np.array([PAGE_VIEW, SEARCH, PRODUCT_VIEW, WISHLIST])] * n_pers,
        ),
        qty_sampler=Grouped([p.qty_mix for p in PERSONAS], [np.array([1, 2, 3])] * n_pers),
        login_sampler=Grouped([p.login for p in PERSONAS]),
        channel_sampler=Grouped(channel_weights),
        geo_sampler=Grouped([[g[2] for g in GEOS]]),
        persona_sampler=Grouped([[p.weight for p in PERSONAS]]),
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
