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

Modules: `world` (catalogue, calendar, personas, samplers), `simulate` (users, cookies,
sessions and events of one chunk), `faults`, `render` (JSON lines and Parquet) and `write`
(`generate`: the day files, users.csv and manifest.json).
"""

from microseg.ingest.generate.faults import INVALID_KINDS
from microseg.ingest.generate.simulate import estimate_users_for_events
from microseg.ingest.generate.world import EVENT_TYPES, PERSONAS
from microseg.ingest.generate.write import generate

__all__ = [
    "EVENT_TYPES",
    "INVALID_KINDS",
    "PERSONAS",
    "estimate_users_for_events",
    "generate",
]
