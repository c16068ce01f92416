-- Publish pgbus events from psql (or any SQL: a trigger, a migration, a cron job).
--
--   psql -v channel=orders -f publish.sql "$DSN"
--
-- The wire format is docs/reference/wire-format.md.

-- An envelope: "v" and "type" make it one. The id must be unique per event
-- (gen_random_uuid() is built in from PostgreSQL 13), ts is in seconds.
SELECT pg_notify(:'channel', json_build_object(
    'v', 1,
    'id', gen_random_uuid()::text,
    'type', 'OrderPlaced',
    'ts', extract(epoch FROM clock_timestamp()),
    'data', json_build_object('order_id', 42, 'total', '9.90')
)::text);

-- A bare object: decoded against the channel's model when it has exactly one.
SELECT pg_notify(:'channel', json_build_object('order_id', 43, 'total', '1.50')::text);
