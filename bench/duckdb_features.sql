-- DuckDB yardstick for `microseg features` (bench/sessionize_bench.py, stage "features"):
-- ten of the features of lib/microseg/features.py, written as plain DuckDB SQL.
--
-- Needs, before it runs:
--   * the views of bench/duckdb_sessions.sql (identity_map, sessions), built over a view
--     `bronze_events` that holds only the events strictly before the as-of time T (the
--     harness filters it). So, as in microseg, the identity map is learned from the events
--     before T alone and the sessions are rebuilt from them: a session running across T is
--     cut at T, and nothing at or after T can change a feature;
--   * the variable as_of_us (BIGINT): T as epoch microseconds, e.g.
--       SET VARIABLE as_of_us = 1793318400000000;
--   * SET TimeZone = 'UTC'.
-- Defines the temporary views keyed_events and user_features; the harness then streams
-- `SELECT * FROM user_features` into a Delta table.
--
-- Definitions, as in microseg.features:
--   * one row per user key with an event before T;
--   * a window "n d" is [T - n days, T); session counts and sums go by session_start;
--   * days_since_last_event = (T - last event) in microseconds / 86400e6 (DOUBLE);
--   * orders = sessions with a purchase; revenue = sum of the sessions' revenue (0 without);
--   * bounce_rate_30d = one-event sessions / sessions in 30 days; NULL without sessions;
--   * max_views_one_product_unbought_7d: over the events of the last 7 days with a product,
--     per product the product_view events if the product has no purchase event in those 7
--     days; the largest, or 0;
--   * top_category: the category with the most events (events without a category are not
--     counted); ties go to the smallest category; NULL when no event has a category.

CREATE OR REPLACE TEMP VIEW keyed_events AS
SELECT
    coalesce(e.user_id, m.user_key, 'anon:' || e.anonymous_id) AS user_key,
    epoch_us(e.event_time) AS t_us,
    e.event_type,
    e.product_id,
    e.category
FROM bronze_events AS e
LEFT JOIN identity_map AS m ON e.anonymous_id = m.anonymous_id
WHERE coalesce(e.user_id, m.user_key, e.anonymous_id) IS NOT NULL;

CREATE OR REPLACE TEMP VIEW user_features AS
WITH
event_aggs AS (
    SELECT
        user_key,
        max(t_us) AS last_us,
        count(DISTINCT category)::INTEGER AS distinct_categories
    FROM keyed_events
    GROUP BY user_key
),
session_aggs AS (
    SELECT
        user_key,
        count(*) FILTER (WHERE has_purchase)::INTEGER AS orders_lifetime,
        coalesce(sum(revenue), 0.0)::DOUBLE AS revenue_lifetime,
        count(*) FILTER (WHERE start_us >= getvariable('as_of_us') - 30 * 86400000000)::INTEGER
            AS sessions_30d,
        count(*) FILTER (
            WHERE start_us >= getvariable('as_of_us') - 30 * 86400000000 AND is_bounce
        )::INTEGER AS bounces_30d,
        coalesce(
            sum(cart_adds) FILTER (WHERE start_us >= getvariable('as_of_us') - 90 * 86400000000),
            0
        )::INTEGER AS cart_adds_90d,
        count(*) FILTER (
            WHERE start_us >= getvariable('as_of_us') - 7 * 86400000000 AND is_cart_abandoned
        )::INTEGER AS cart_abandoned_sessions_7d
    FROM (SELECT *, epoch_us(session_start) AS start_us FROM sessions)
    GROUP BY user_key
),
category_counts AS (
    SELECT user_key, category, count(*) AS n
    FROM keyed_events
    WHERE category IS NOT NULL
    GROUP BY user_key, category
),
top_categories AS (
    SELECT user_key, arg_min(category, (-n, category)) AS top_category
    FROM category_counts
    GROUP BY user_key
),
recent_products AS (
    SELECT
        user_key,
        product_id,
        count(*) FILTER (WHERE event_type = 'product_view') AS views,
        count(*) FILTER (WHERE event_type = 'purchase') AS purchases
    FROM keyed_events
    WHERE product_id IS NOT NULL AND t_us >= getvariable('as_of_us') - 7 * 86400000000
    GROUP BY user_key, product_id
),
unbought AS (
    SELECT user_key, max(views)::INTEGER AS max_views
    FROM recent_products
    WHERE purchases = 0
    GROUP BY user_key
)
SELECT
    e.user_key,
    make_timestamp(getvariable('as_of_us'))::TIMESTAMPTZ AS as_of,
    (getvariable('as_of_us') - e.last_us) / 86400e6 AS days_since_last_event,
    s.orders_lifetime,
    s.revenue_lifetime,
    s.sessions_30d,
    CASE WHEN s.sessions_30d > 0 THEN s.bounces_30d / s.sessions_30d END AS bounce_rate_30d,
    s.cart_adds_90d,
    s.cart_abandoned_sessions_7d,
    e.distinct_categories,
    coalesce(u.max_views, 0)::INTEGER AS max_views_one_product_unbought_7d,
    c.top_category
FROM event_aggs AS e
LEFT JOIN session_aggs AS s USING (user_key)
LEFT JOIN top_categories AS c USING (user_key)
LEFT JOIN unbought AS u USING (user_key);
