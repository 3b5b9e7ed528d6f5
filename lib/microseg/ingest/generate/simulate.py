"""Simulating users, their cookies, sessions and events, one chunk of users at a time.

Each chunk draws from its own random stream, seeded from (seed, chunk). The steps of
`simulate_chunk` draw from that stream one after another, so their order and what each
draws are part of the determinism contract: changing either changes the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from microseg.core.config import GenerateConfig
from microseg.ingest.generate.world import (
    ADD_TO_CART,
    CHECKOUT,
    DAY_MS,
    DESKTOP,
    HOUR_MS,
    N_CATEGORIES,
    NEW_VISITOR,
    PAGE_VIEW,
    PERSONAS,
    PRODUCT_VIEW,
    PURCHASE,
    REMOVE_FROM_CART,
    SALE_CAMPAIGNS,
    SALE_DISCOUNT,
    SEARCH,
    TERMS_PER_CATEGORY,
    WISHLIST,
    World,
    build_world,
    seed_words,
)

USERS_PER_CHUNK = 20_000  # part of the determinism contract: changing it changes the output
MIN_SESSION_GAP_MS = 35 * 60_000  # sessions of one user are at least this far apart
MAX_EVENT_GAP_MS = 15 * 60_000  # in-session gaps are capped here (well below 30 minutes)
MIN_EVENT_GAP_MS = 10_000
NEW_VISITOR_DAYS = 10
SHARED_ANON_SHARE = 0.005


def _persona_array(attr: str, dtype=np.float64) -> np.ndarray:
    return np.array([getattr(p, attr) for p in PERSONAS], dtype=dtype)


def _seg_starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


# --------------------------------------------------------------------------------------
# what the steps produce (arrays indexed by local user, cookie, session or event)


@dataclass
class _Users:
    persona: np.ndarray  # int8
    first: np.ndarray  # first active day
    last: np.ndarray  # last active day (inclusive)
    span: np.ndarray  # active days
    n_sessions: np.ndarray
    favourite: np.ndarray  # category
    geo: np.ndarray  # index into GEOS


@dataclass
class _Cookies:
    n_slots: np.ndarray  # per user: 1 or 2 cookies in use
    slot_anon: np.ndarray  # per user: (first, second or -1) anonymous id
    shared_anon: np.ndarray  # per user: the cookie shared with another user, or -1
    n_anon: int
    device: np.ndarray  # per anonymous id
    consent: np.ndarray  # per anonymous id: analytics * 2 + marketing


@dataclass
class _Sessions:
    user: np.ndarray
    persona: np.ndarray
    start: np.ndarray  # ms from the range start, sorted per user (before any pushing apart)
    n_browse: np.ndarray  # browse events, the last one the first cart item's product_view
    n_cart: np.ndarray  # items added to the cart
    removed: np.ndarray  # one item removed again
    checkout: np.ndarray
    cart_events: np.ndarray  # add_to_cart events and the product_views between them
    total: np.ndarray  # events


@dataclass
class _Events:
    session: np.ndarray
    session_first: np.ndarray  # per session: index of its first event
    pos: np.ndarray  # position inside the session
    persona: np.ndarray  # int64, for the samplers' groups
    browse_end: np.ndarray  # per event: its session's browse event count
    checkout_end: np.ndarray  # per event: position of the first purchase event
    etype: np.ndarray  # int8 type code
    is_purchase: np.ndarray
    product: np.ndarray | None = None  # int32, -1 without a product
    qty: np.ndarray | None = None  # int8, 0 without a quantity
    search: np.ndarray | None = None  # int16 search term, -1 without
    page: np.ndarray | None = None  # int32 page index


@dataclass
class _Timing:
    offset: np.ndarray  # per event: ms after its session's start
    start: np.ndarray  # per session: final start, clamped and pushed apart
    keep: np.ndarray  # per session: still ends inside the user's active window
    campaign: np.ndarray  # per session: sale campaign of its (final) start day, or -1
    sale: np.ndarray
    price: np.ndarray  # per event: int32 cents, sale discount applied


@dataclass
class _Identity:
    logged: np.ndarray  # per event: carries the user id
    anon: np.ndarray  # per session: the cookie used
    utm: np.ndarray  # per session: utm row or -1
    referrer: np.ndarray  # per event: page index or -1


# --------------------------------------------------------------------------------------
# the steps, in the order they draw


def _draw_users(world: World, rng: np.random.Generator, n_users: int) -> _Users:
    days = world.days
    zeros = np.zeros(n_users, dtype=np.int64)
    persona = world.persona_sampler.sample(zeros, rng.random(n_users)).astype(np.int8)
    first = np.floor(
        rng.random(n_users) * (np.floor(_persona_array("first_day_frac") * days) + 1)[persona]
    ).astype(np.int64)
    last_by_persona = np.maximum(np.ceil(_persona_array("last_day_frac") * days) - 1, 0)
    last = last_by_persona[persona].astype(np.int64)
    first = np.minimum(first, last)
    is_new = persona == NEW_VISITOR
    first[is_new] = max(0, days - NEW_VISITOR_DAYS)
    span = last - first + 1
    rate = _persona_array("sessions_per_week")[persona] / 7.0 * span
    rate *= rng.gamma(6.0, 1.0 / 6.0, n_users)
    n_sessions = np.maximum(rng.poisson(rate), 1)
    n_sessions[is_new] = 1 + np.searchsorted([0.5, 0.8], rng.random(int(is_new.sum())))
    favourite = world.category_sampler.sample(persona, rng.random(n_users))
    geo = world.geo_sampler.sample(zeros, rng.random(n_users))
    return _Users(persona, first, last, span, n_sessions, favourite, geo)


def _draw_cookies(world: World, rng: np.random.Generator, users: _Users) -> _Cookies:
    """1-2 cookies per user, ~0.5 % of them shared by two users of one household (the
    borrower takes the owner's geo: users.geo is updated)."""
    persona = users.persona
    n_users = len(persona)
    n_slots = 1 + (rng.random(n_users) < _persona_array("p_two_cookies")[persona])
    n_shared = int(rng.binomial(int(n_slots.sum()), SHARED_ANON_SHARE)) if n_users >= 2 else 0
    n_shared = min(n_shared, n_users // 2)
    pairs = rng.permutation(n_users)[: 2 * n_shared].reshape(-1, 2)  # (owner, borrower)
    own_slots = n_slots.copy()
    borrower = np.zeros(n_users, dtype=bool)
    borrower[pairs[:, 1]] = True
    own_slots[borrower] = 1  # the borrower's second cookie is the owner's first one
    n_slots[borrower] = 2
    anon_base = _seg_starts(own_slots)
    n_anon = int(own_slots.sum())
    slot_anon = np.stack([anon_base, np.where(own_slots == 2, anon_base + 1, -1)], axis=1)
    slot_anon[pairs[:, 1], 1] = anon_base[pairs[:, 0]]
    users.geo[pairs[:, 1]] = users.geo[pairs[:, 0]]  # same household
    shared_anon = np.full(n_users, -1, dtype=np.int64)
    shared_anon[pairs[:, 0]] = anon_base[pairs[:, 0]]
    shared_anon[pairs[:, 1]] = anon_base[pairs[:, 0]]
    anon_owner = np.repeat(np.arange(n_users), own_slots)
    device = world.device_sampler.sample(persona[anon_owner], rng.random(n_anon))
    device[anon_base[pairs[:, 0]]] = DESKTOP  # the family computer
    analytics = rng.random(n_anon) < 0.92
    marketing = rng.random(n_anon) < _persona_array("p_marketing")[persona[anon_owner]]
    consent = (analytics.astype(np.int8) * 2 + marketing).astype(np.int8)
    return _Cookies(n_slots, slot_anon, shared_anon, n_anon, device, consent)


def _draw_sessions(world: World, rng: np.random.Generator, users: _Users) -> _Sessions:
    """Start (day and hour, sorted per user) and shape (event counts) of every session."""
    n = int(users.n_sessions.sum())
    user = np.repeat(np.arange(len(users.persona)), users.n_sessions)
    sp = users.persona[user]
    day = users.first[user] + np.floor(rng.random(n) * users.span[user]).astype(np.int64)
    on_sale = rng.random(n) < _persona_array("p_sale_day")[sp]
    if len(world.sale_days) and on_sale.any():
        k0 = np.searchsorted(world.sale_days, users.first[user])
        k1 = np.searchsorted(world.sale_days, users.last[user], side="right")
        ok = on_sale & (k1 > k0)
        pick = k0 + np.floor(rng.random(n) * (k1 - k0)).astype(np.int64)
        day[ok] = world.sale_days[np.minimum(pick, len(world.sale_days) - 1)[ok]]
    hour = world.hour_sampler.sample(sp.astype(np.int64), rng.random(n))
    start = day * DAY_MS + hour * HOUR_MS + rng.integers(0, HOUR_MS, n)
    start = start[np.lexsort((start, user))]
    sale = world.day_campaign[start // DAY_MS] >= 0

    n_browse = np.minimum(1 + rng.poisson(_persona_array("browse_mean")[sp] - 1), 40)
    p_cart = np.where(sale, _persona_array("p_cart_sale")[sp], _persona_array("p_cart")[sp])
    has_cart = rng.random(n) < p_cart
    n_cart = has_cart * (1 + np.minimum(rng.poisson(_persona_array("extra_items")[sp]), 5))
    removed = (n_cart > 0) & (rng.random(n) < _persona_array("p_remove")[sp])
    kept = n_cart - removed
    checkout = (kept > 0) & (rng.random(n) < _persona_array("p_checkout")[sp])
    bought = checkout & (rng.random(n) < _persona_array("p_purchase")[sp])
    n_bought = bought * kept
    cart_events = np.where(n_cart > 0, 2 * n_cart - 1, 0)
    total = n_browse + cart_events + removed + checkout + n_bought
    return _Sessions(user, sp, start, n_browse, n_cart, removed, checkout, cart_events, total)


def _draw_event_types(world: World, rng: np.random.Generator, sessions: _Sessions) -> _Events:
    """Browsing, then the cart (add_to_cart after the product_view of its product), a
    remove_from_cart, a checkout_started and one purchase event per bought item."""
    n = int(sessions.total.sum())
    ev_s = np.repeat(np.arange(len(sessions.total)), sessions.total)
    s_first = _seg_starts(sessions.total)
    pos = np.arange(n) - s_first[ev_s]
    ep = sessions.persona[ev_s].astype(np.int64)
    b = sessions.n_browse[ev_s]
    cart_end = b + sessions.cart_events[ev_s]
    remove_end = cart_end + sessions.removed[ev_s]
    checkout_end = remove_end + sessions.checkout[ev_s]

    etype = world.browse_sampler.sample(ep, rng.random(n)).astype(np.int8)
    etype[(pos == 0) & (etype == WISHLIST)] = PRODUCT_VIEW
    etype[(pos == b - 1) & (sessions.n_cart[ev_s] > 0)] = PRODUCT_VIEW
    in_cart = (pos >= b) & (pos < cart_end)
    etype[in_cart] = np.where((pos[in_cart] - b[in_cart]) % 2 == 0, ADD_TO_CART, PRODUCT_VIEW)
    etype[(pos >= cart_end) & (pos < remove_end)] = REMOVE_FROM_CART
    etype[(pos >= remove_end) & (pos < checkout_end)] = CHECKOUT
    is_purchase = pos >= checkout_end
    etype[is_purchase] = PURCHASE
    return _Events(ev_s, s_first, pos, ep, b, checkout_end, etype, is_purchase)


def _draw_products(
    world: World, rng: np.random.Generator, users: _Users, sessions: _Sessions, events: _Events
) -> np.ndarray:
    """Fill events.product and events.qty; return the category of every event."""
    ep, etype, pos = events.persona, events.etype, events.pos
    category = world.category_sampler.sample(ep, rng.random(len(etype)))
    fav = rng.random(len(etype)) < _persona_array("concentration")[ep]
    category[fav] = users.favourite[sessions.user[events.session[fav]]]
    after_search = np.flatnonzero(pos > 0)
    after_search = after_search[etype[after_search - 1] == SEARCH]
    category[after_search] = category[after_search - 1]

    product = np.full(len(etype), -1, dtype=np.int32)
    viewed = (etype == PRODUCT_VIEW) | (etype == WISHLIST)
    product[viewed] = world.product_sampler.sample(
        ep[viewed] * N_CATEGORIES + category[viewed], rng.random(int(viewed.sum()))
    )
    qty = np.zeros(len(etype), dtype=np.int8)
    atc = np.flatnonzero(etype == ADD_TO_CART)
    product[atc] = product[atc - 1]
    qty[atc] = world.qty_sampler.sample(ep[atc], rng.random(len(atc)))
    rm = np.flatnonzero(etype == REMOVE_FROM_CART)
    product[rm] = product[rm - 1]
    qty[rm] = qty[rm - 1]
    pur = np.flatnonzero(events.is_purchase)
    src = (
        events.session_first[events.session[pur]]
        + events.browse_end[pur]
        + 2 * (pos[pur] - events.checkout_end[pur])
    )
    product[pur] = product[src]
    qty[pur] = qty[src]
    events.product, events.qty = product, qty
    return category


def _draw_pages(
    world: World, rng: np.random.Generator, events: _Events, category: np.ndarray
) -> None:
    """Fill events.search (the term of a search event) and events.page."""
    etype, pos = events.etype, events.pos
    search = np.full(len(etype), -1, dtype=np.int16)
    is_search = etype == SEARCH
    search[is_search] = category[is_search] * TERMS_PER_CATEGORY + rng.integers(
        0, TERMS_PER_CATEGORY, int(is_search.sum())
    )

    page = np.empty(len(etype), dtype=np.int32)
    is_pv = etype == PAGE_VIEW
    home = is_pv & (pos == 0) & (rng.random(len(etype)) < 0.5)
    has_product = events.product >= 0
    page[is_pv] = world.page_category + category[is_pv]
    page[home] = world.page_home
    page[is_search] = world.page_search + search[is_search]
    page[has_product] = world.page_product + events.product[has_product]
    page[(etype == ADD_TO_CART) | (etype == REMOVE_FROM_CART)] = world.page_cart
    page[etype == CHECKOUT] = world.page_checkout
    page[events.is_purchase] = world.page_confirmation
    events.search, events.page = search, page


def _place_in_time(
    world: World, rng: np.random.Generator, users: _Users, sessions: _Sessions, events: _Events
) -> _Timing:
    """Gaps inside sessions; sessions clamped to the user's active window and pushed apart
    (no overlaps); a session pushed past the window's end is dropped unless it is the user's
    first. Campaigns and prices follow the final start day."""
    ep, pos, ev_s, s_first = events.persona, events.pos, events.session, events.session_first
    s_user = sessions.user
    gap_mean = (_persona_array("gap_mean_s")[ep] - MIN_EVENT_GAP_MS / 1000) * 1000
    gap = MIN_EVENT_GAP_MS + np.minimum(rng.exponential(1.0, len(pos)) * gap_mean, MAX_EVENT_GAP_MS)
    gap = gap.astype(np.int64)
    next_items = events.is_purchase & (pos > events.checkout_end)  # one order: ms apart
    gap[next_items] = rng.integers(1, 50, int(next_items.sum()))
    gap[pos == 0] = 0
    offset = np.cumsum(gap)
    offset -= offset[s_first][ev_s]
    duration = offset[s_first + sessions.total - 1]

    window_start = users.first[s_user] * DAY_MS
    window_end = (users.last[s_user] + 1) * DAY_MS
    start = np.clip(
        sessions.start, window_start, np.maximum(window_start, window_end - duration - 1)
    )
    u_first = _seg_starts(users.n_sessions)
    step = duration + MIN_SESSION_GAP_MS
    c = np.cumsum(step) - step  # exclusive running sum ...
    c = c - c[u_first][s_user]  # ... restarted for every user
    key = start - c
    lift = int(key.max() - key.min() + 1)
    key = key + s_user.astype(np.int64) * lift
    start = np.maximum.accumulate(key) - s_user.astype(np.int64) * lift + c
    end = start + duration
    keep = end < window_end
    keep[u_first] = True
    # a pushed session may have moved to another day: prices and campaigns follow its start
    campaign = world.day_campaign[np.minimum(start // DAY_MS, world.days - 1)]
    sale = campaign >= 0
    base = world.product_cents[np.maximum(events.product, 0)]
    price = np.where(sale[ev_s], np.round(base * SALE_DISCOUNT), base).astype(np.int32)
    price[~(events.product >= 0)] = 0
    return _Timing(offset, start, keep, campaign, sale, price)


def _draw_identity(
    world: World,
    rng: np.random.Generator,
    sessions: _Sessions,
    events: _Events,
    cookies: _Cookies,
    timing: _Timing,
) -> _Identity:
    """The login point, the cookie and the marketing channel of every session."""
    sp = sessions.persona.astype(np.int64)
    n = len(sp)
    n_b, total = sessions.n_browse, sessions.total
    login_kind = world.login_sampler.sample(sp, rng.random(n))
    login_at = np.select(
        [login_kind == 0, (login_kind == 1) & (sessions.n_cart > 0), login_kind == 2],
        [0, n_b, np.floor(rng.random(n) * total).astype(np.int64)],
        default=total,
    )
    co_pos = n_b + sessions.cart_events + sessions.removed
    login_at = np.where(sessions.checkout, np.minimum(login_at, co_pos), login_at)
    logged = events.pos >= login_at[events.session]
    second = (cookies.n_slots[sessions.user] == 2) & (rng.random(n) < 0.35)
    s_anon = cookies.slot_anon[sessions.user, second.astype(np.int64)]
    sale = timing.sale
    channel = world.channel_sampler.sample(sp * 2 + sale, rng.random(n))
    s_utm = world.channel_utm[channel, np.where(sale, timing.campaign, len(SALE_CAMPAIGNS))]
    referrer = np.empty(len(events.pos), dtype=np.int32)
    referrer[1:] = events.page[:-1]
    referrer[events.session_first] = world.channel_referrer[channel]
    return _Identity(logged, s_anon, s_utm, referrer)


# --------------------------------------------------------------------------------------
# one chunk, all chunks


def simulate_chunk(world: World, seed: int, chunk: int, n_users: int) -> dict:
    """Users, anonymous ids and events (in user, time order) of one chunk; indices are local."""
    rng = np.random.default_rng([*seed_words(seed), 1, chunk])
    users = _draw_users(world, rng, n_users)
    cookies = _draw_cookies(world, rng, users)
    sessions = _draw_sessions(world, rng, users)
    events = _draw_event_types(world, rng, sessions)
    category = _draw_products(world, rng, users, sessions, events)
    _draw_pages(world, rng, events, category)
    timing = _place_in_time(world, rng, users, sessions, events)
    identity = _draw_identity(world, rng, sessions, events, cookies, timing)

    ev_s = events.session
    keep = timing.keep[ev_s]
    out_events = {
        "ts": (world.start_ms + timing.start[ev_s] + timing.offset)[keep],
        "type": events.etype[keep],
        "user": sessions.user[ev_s][keep].astype(np.int32),
        "logged": identity.logged[keep],
        "anon": identity.anon[ev_s][keep].astype(np.int32),
        "product": events.product[keep],
        "price": timing.price[keep],
        "qty": events.qty[keep],
        "search": events.search[keep],
        "page": events.page[keep],
        "referrer": identity.referrer[keep],
        "utm": identity.utm[ev_s][keep],
    }
    ev_user = out_events["user"]
    first_ix = np.searchsorted(ev_user, np.arange(n_users))
    last_ix = np.searchsorted(ev_user, np.arange(n_users), side="right") - 1
    out_users = {
        "persona": users.persona,
        "geo": users.geo.astype(np.int8),
        "first_seen": out_events["ts"][first_ix],
        "last_seen": out_events["ts"][last_ix],
        "slot_anon": cookies.slot_anon,
        "shared_anon": cookies.shared_anon,
    }
    anons = {"device": cookies.device.astype(np.int8), "consent": cookies.consent}
    return {"events": out_events, "users": out_users, "anons": anons, "n_anon": cookies.n_anon}


# public API


def simulate_all(settings: GenerateConfig, world: World, progress) -> tuple[dict, dict, dict]:
    n_chunks = math.ceil(settings.users / USERS_PER_CHUNK)
    ev_parts: dict[str, list] = {}
    user_parts: dict[str, list] = {}
    anon_parts: dict[str, list] = {}
    user_offset = anon_offset = 0
    for chunk in range(n_chunks):
        n = min(USERS_PER_CHUNK, settings.users - user_offset)
        part = simulate_chunk(world, settings.seed, chunk, n)
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


@lru_cache(maxsize=1)
def _events_per_user() -> float:
    settings = GenerateConfig(seed=12345, users=USERS_PER_CHUNK)
    world = build_world(settings)
    part = simulate_chunk(world, settings.seed, 0, USERS_PER_CHUNK)
    return len(part["events"]["ts"]) / USERS_PER_CHUNK


def estimate_users_for_events(n_events: int) -> int:
    """Users needed for about `n_events` clean events (default persona mix and 60 days)."""
    return max(1, round(n_events / _events_per_user()))
