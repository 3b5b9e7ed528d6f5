-- DuckDB yardstick for `microseg sessionize` (bench/sessionize_bench.py): the sessions of
-- lib/microseg/sessions.py, written as plain DuckDB SQL.
--
-- Needs, before it runs:
--   * a view or table `bronze_events` with the bronze/events columns (the harness makes one
--     over the Delta table's current Parquet files);
--   * the variables inactivity_timeout_s and max_session_length_s (DOUBLE seconds), e.g.
--       SET VARIABLE inactivity_timeout_s = 1800;  SET VARIABLE max_session_length_s = 21600;
--   * SET TimeZone = 'UTC' (session_date and the TIMESTAMPTZ output are in UTC).
-- Defines the temporary views identity_map, session_events and sessions; the harness then
-- streams `SELECT * FROM sessions` into a Delta table.
--
-- Semantics, as in microseg.sessions:
--   * user_key = user_id; else the user the anonymous id is stitched to (among the user ids
--     seen with it, the one seen first by event_time, ties by the smallest user id); else
--     'anon:' || anonymous_id. Events with neither id have no user key and are dropped.
--   * Per user_key, events ordered by (event_time, event_id); a gap strictly longer than the
--     inactivity timeout starts a new visit. Times are compared as microseconds / 1e6 in
--     DOUBLE, exactly as microseg does, so the two agree even on rounding at the boundary.
--   * A visit is cut into pieces of max_session_length measured from its first event:
--     piece = floor((t - visit_start) / max_len). One session per (user_key, visit, piece).
--   * "first X" columns (landing_page, device, ...) take the earliest non-null value; the
--     utm_* columns take the value of the first event even when it is null.

CREATE OR REPLACE TEMP VIEW identity_map AS
WITH pairs AS (
    SELECT anonymous_id, user_id, min(event_time) AS pair_first
    FROM bronze_events
    WHERE anonymous_id IS NOT NULL AND user_id IS NOT NULL
    GROUP BY anonymous_id, user_id
)
SELECT
    anonymous_id,
    arg_min(user_id, (pair_first, user_id)) AS user_key,  -- first seen, then smallest id
    count(*) AS user_ids_seen
FROM pairs
GROUP BY anonymous_id;

-- One row per event that has a user key, with its visit and piece. The join needs no
-- `user_id IS NULL` condition: coalesce() takes an event's own user_id first anyway.
CREATE OR REPLACE TEMP VIEW session_events AS
WITH keyed AS (
    SELECT
        coalesce(e.user_id, m.user_key, 'anon:' || e.anonymous_id) AS user_key,
        e.event_id, e.event_time, e.event_type, e.product_id, e.category, e.price,
        e.quantity, e.page_url, e.device, e.country, e.utm_source, e.utm_medium,
        e.utm_campaign
    FROM bronze_events AS e
    LEFT JOIN identity_map AS m ON e.anonymous_id = m.anonymous_id
),
ordered AS (
    SELECT
        *,
        row_number() OVER by_user AS rn,
        epoch_us(event_time) / 1e6 AS secs,
        lag(epoch_us(event_time) / 1e6) OVER by_user AS prev_secs
    FROM keyed
    WHERE user_key IS NOT NULL
    WINDOW by_user AS (PARTITION BY user_key ORDER BY event_time, event_id)
),
flagged AS (
    SELECT
        *,
        prev_secs IS NULL OR secs - prev_secs > getvariable('inactivity_timeout_s') AS new_visit
    FROM ordered
),
visits AS (
    SELECT
        *,
        sum(new_visit::INTEGER) OVER running AS visit,
        -- times only grow along the order, so the latest visit start so far is its max
        max(CASE WHEN new_visit THEN event_time END) OVER running AS visit_start
    FROM flagged
    WINDOW running AS (
        PARTITION BY user_key ORDER BY rn ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
    )
)
SELECT
    *,
    floor((secs - epoch_us(visit_start) / 1e6) / getvariable('max_session_length_s'))::INTEGER
        AS piece
FROM visits;

CREATE OR REPLACE TEMP VIEW sessions AS
WITH agg AS (
    SELECT
        user_key,
        visit,
        piece,
        arg_min(event_id, rn) AS first_event_id,
        min(event_time) AS session_start,
        max(event_time) AS session_end,
        any_value(visit_start) AS visit_start,
        count(*)::INTEGER AS events,
        count(*) FILTER (WHERE event_type = 'page_view')::INTEGER AS page_views,
        count(*) FILTER (WHERE event_type = 'product_view')::INTEGER AS product_views,
        count(*) FILTER (WHERE event_type = 'search')::INTEGER AS searches,
        count(*) FILTER (WHERE event_type = 'add_to_cart')::INTEGER AS cart_adds,
        count(*) FILTER (WHERE event_type = 'remove_from_cart')::INTEGER AS cart_removes,
        count(*) FILTER (WHERE event_type = 'add_to_wishlist')::INTEGER AS wishlist_adds,
        count(*) FILTER (WHERE event_type = 'checkout_started')::INTEGER AS checkouts,
        count(*) FILTER (WHERE event_type = 'purchase')::INTEGER AS purchase_events,
        count(DISTINCT product_id)::INTEGER AS distinct_products,
        count(DISTINCT category)::INTEGER AS distinct_categories,
        arg_min(page_url, rn) FILTER (WHERE page_url IS NOT NULL) AS landing_page,
        arg_max(page_url, rn) FILTER (WHERE page_url IS NOT NULL) AS exit_page,
        arg_min(product_id, rn) FILTER (WHERE product_id IS NOT NULL) AS landing_product,
        arg_max(product_id, rn) FILTER (WHERE product_id IS NOT NULL) AS exit_product,
        coalesce(
            sum(price * coalesce(quantity, 1)) FILTER (WHERE event_type = 'purchase'), 0.0
        ) AS revenue,
        coalesce(
            sum(coalesce(quantity, 1)) FILTER (WHERE event_type = 'purchase'), 0
        )::INTEGER AS items,
        arg_min(device, rn) FILTER (WHERE device IS NOT NULL) AS device,
        arg_min(country, rn) FILTER (WHERE country IS NOT NULL) AS country,
        arg_min_null(utm_source, rn) AS utm_source,
        arg_min_null(utm_medium, rn) AS utm_medium,
        arg_min_null(utm_campaign, rn) AS utm_campaign
    FROM session_events
    GROUP BY user_key, visit, piece
)
SELECT
    substr(sha256(user_key || chr(31) || first_event_id), 1, 32) AS session_id,
    user_key,
    session_start::TIMESTAMPTZ AS session_start,
    session_end::TIMESTAMPTZ AS session_end,
    (epoch_us(session_end) - epoch_us(session_start)) / 1e6 AS duration_seconds,
    events,
    page_views,
    product_views,
    searches,
    cart_adds,
    cart_removes,
    wishlist_adds,
    checkouts,
    purchase_events,
    distinct_products,
    distinct_categories,
    landing_page,
    exit_page,
    landing_product,
    exit_product,
    cart_adds > 0 AS has_cart_add,
    checkouts > 0 AS has_checkout,
    purchase_events > 0 AS has_purchase,
    cart_adds > 0 AND purchase_events = 0 AS is_cart_abandoned,
    revenue,
    items,
    device,
    country,
    utm_source,
    utm_medium,
    utm_campaign,
    events = 1 AS is_bounce,
    piece AS visit_part,
    visit_start::TIMESTAMPTZ AS visit_start,
    first_event_id,
    session_start::DATE AS session_date
FROM agg;
