"""The durable schema: versioned migrations, the check at start, and every SQL statement.

Everything lives in one PostgreSQL schema of pgbus's own (``pgbus`` unless configured).
:func:`migrate` creates and upgrades it; nothing else ever creates it, so a database
the user did not ask to change is never changed. Migrations run in one transaction under
an advisory lock, so several processes may run them at once: the first applies what is
missing, the others find it done.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pgbus._drivers import sqlstate
from pgbus._identifiers import check_identifier, quote_ident
from pgbus.errors import ConfigError, DuplicateEventId, PgbusError, PublishError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._events import Outgoing
    from pgbus._publish import Connection

logger = logging.getLogger(__name__)

#: The schema name used unless ``DurablePlugin(schema=...)`` says otherwise.
DEFAULT_SCHEMA = "pgbus"

#: Starts the text of the error a publish fails with when an event id is taken.
TAKEN_IDS_MARKER = "pgbus: event ids taken: "
# The SQLSTATEs a failed publish is told by (any driver's error carries them).
UNDEFINED_TABLE, INVALID_SCHEMA_NAME, INVALID_TEXT_REPRESENTATION = "42P01", "3F000", "22P02"
#: The SQLSTATE of an event id the journal holds already (see :attr:`Sql.publish_new`).
UNIQUE_VIOLATION = "23505"

#: NOTIFY refuses payloads of this many bytes or more; bigger events travel by reference.
NOTIFY_LIMIT = 8000


def _claim_sql(s: str, *, ordered: bool, lookup: bool = False) -> str:
    """The claim of a subscription's next batch, in SQL.

    The body of the functions ``claim`` and ``claim_ordered`` of migration 4 and, with
    ``lookup``, of migration 5: never change what either returns, write a new
    migration. ``$1`` the subscription, ``$2`` the member, ``$3`` the lease in seconds.
    With ``lookup`` the batch's events are looked up one by one on the journal's
    primary key: a plain join's plan, kept for a session, stays a scan of the whole
    journal when it was made while the journal was small.
    """
    free = "(b.claimed_until IS NULL OR b.claimed_until < now() OR b.claimed_by = $2)"
    # unordered: the first free batch, skipping those other members hold or lock now;
    # ordered: the first batch, waiting for a member claiming it now, taken if free
    pick, take = ("", f"AND {free}") if ordered else (f"AND {free}", "")
    lock = "FOR UPDATE" if ordered else "FOR UPDATE SKIP LOCKED"
    join = (
        f"LEFT JOIN LATERAL (SELECT * FROM {s}.journal WHERE id = x.journal_id OFFSET 0) j"  # noqa: S608 - quoted identifier
        " ON true"
        if lookup
        else f"LEFT JOIN {s}.journal j ON j.id = x.journal_id"
    )
    return f"""
            WITH c AS (
                SELECT id, journal_ids FROM {s}.batches b
                WHERE subscription = $1
                  {pick}
                  AND (not_before IS NULL OR not_before <= now())
                ORDER BY seq, journal_ids[1] LIMIT 1
                {lock}
            ), u AS (
                UPDATE {s}.batches b
                SET claimed_by = $2, claimed_until = now() + make_interval(secs => $3),
                    deliveries = b.deliveries + 1,
                    journal_ids = CASE WHEN b.deliveries > 0 THEN b.journal_ids[1:1]
                                  ELSE b.journal_ids END
                FROM c WHERE b.id = c.id {take}
                RETURNING b.seq, b.journal_ids, b.deliveries, b.attempt,
                          c.journal_ids AS whole
            ), rest AS (
                INSERT INTO {s}.batches (subscription, seq, journal_ids)
                SELECT $1, seq, whole[2:] FROM u
                WHERE cardinality(u.journal_ids) < cardinality(whole)
            )
            SELECT x.journal_id, u.deliveries, u.attempt, j.channel, j.event_id, j.payload, j.pid,
                   extract(epoch FROM j.created_at)::float8 AS stored_at
            FROM u CROSS JOIN unnest(u.journal_ids) WITH ORDINALITY AS x(journal_id, ord)
            {join}
            ORDER BY x.ord"""  # noqa: S608 - quoted identifier


def _pump_sql(*, replace: bool) -> str:
    """The function ``pump``: of migration 2, or (``replace``) of migration 5.

    Migration 5's bounds the journal's transaction ids on both sides: ``high`` is
    ``low`` plus 2^62, beyond any transaction id PostgreSQL will hand out, so no row is
    left out. The bound changes nothing in a plan made for ``low``'s value, and it shows
    a generic plan a narrow range of the ``xid`` index instead of a third of the journal
    (which made it scan the whole journal once that had grown since it was analyzed):
    the pump can be planned once a session, like the claim.
    Never change what either returns: write a new migration.
    """
    sql = """CREATE FUNCTION {{s}}.pump(
                p_name text, p_channels text[], p_types text[], p_limit integer,
                p_batch integer)
            RETURNS TABLE (n bigint, resumed boolean) LANGUAGE plpgsql AS $pump$
            #variable_conflict use_column
            DECLARE
                low xid8;
            BEGIN
                SELECT pg_snapshot_xmin(snap) INTO low FROM {{s}}.subscriptions
                WHERE name = p_name FOR UPDATE SKIP LOCKED;
                IF NOT FOUND THEN
                    RETURN;
                END IF;
                RETURN QUERY
            WITH s AS (
                SELECT snap, coalesce(batch_snap, pg_current_snapshot()) AS target,
                       batch_cursor, batch_snap IS NOT NULL AS resumed
                FROM {{s}}.subscriptions WHERE name = p_name
            ), picked AS (
                SELECT j.id FROM s, {{s}}.journal j
                WHERE j.xid >= low
                  AND NOT pg_visible_in_snapshot(j.xid, s.snap)
                  AND pg_visible_in_snapshot(j.xid, s.target)
                  AND j.id > s.batch_cursor
                  AND j.channel = ANY(p_channels)
                  AND (p_types IS NULL OR j.type = ANY(p_types))
                ORDER BY j.id LIMIT p_limit
            ), ins AS (
                INSERT INTO {{s}}.batches (subscription, journal_ids)
                SELECT p_name, array_agg(id ORDER BY id) FROM (
                    SELECT id, (row_number() OVER (ORDER BY id) - 1) / p_batch AS chunk FROM picked
                ) AS p GROUP BY chunk ORDER BY chunk
            ), agg AS (
                SELECT count(*) AS n, max(id) AS last FROM picked
            )
            UPDATE {{s}}.subscriptions u SET
                snap = CASE WHEN agg.n < p_limit THEN s.target ELSE u.snap END,
                batch_snap = CASE WHEN agg.n < p_limit THEN NULL ELSE s.target END,
                batch_cursor = CASE WHEN agg.n < p_limit THEN 0 ELSE agg.last END,
                pumped_at = now()
            FROM s, agg WHERE u.name = p_name
            RETURNING agg.n, s.resumed;
            END
            $pump$"""
    if not replace:
        return sql.format(s="{s}")
    sql = sql.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
    sql = sql.replace("low xid8;", "low xid8;\n                high xid8;", 1)
    sql = sql.replace(
        "SELECT pg_snapshot_xmin(snap) INTO low FROM",
        "SELECT pg_snapshot_xmin(snap),\n                    (pg_snapshot_xmin(snap)::text::numeric"
        " + 4611686018427387904)::text::xid8\n                INTO low, high FROM",
        1,
    )
    sql = sql.replace("WHERE j.xid >= low\n", "WHERE j.xid >= low AND j.xid < high\n", 1)
    return sql.format(s="{s}")


#: Handled (or dead-lettered) events leave the batches this member ($6) claimed; an
#: empty batch goes. Only its own claims: a batch of the same events made since (a dead
#: letter redelivered meanwhile) is new work, not this ack's. Those to retry ($2 also
#: holds them) go into batches of their own, one per value of ``$7`` (a batch
#: handler's batch stays one), due ``$4`` seconds from now, on handler attempt ``$5``.
#: The body of the function ``ack`` of migration 4 (never change it).
ACK_SQL = """
            WITH gone AS (
                DELETE FROM {s}.batches
                WHERE subscription = $1 AND claimed_by = $6 AND journal_ids <@ $2::bigint[]
            ), retried AS (
                INSERT INTO {s}.batches (subscription, journal_ids, not_before, attempt)
                SELECT $1, array_agg(r.journal_id ORDER BY r.ord),
                       now() + make_interval(secs => min(r.delay)), min(r.attempt)
                FROM unnest($3::bigint[], $4::float8[], $5::integer[], $7::bigint[])
                    WITH ORDINALITY AS r(journal_id, delay, attempt, together, ord)
                GROUP BY r.together ORDER BY min(r.ord)
            )
            UPDATE {s}.batches SET journal_ids = array(
                SELECT x FROM unnest(journal_ids) WITH ORDINALITY AS t(x, o)
                WHERE x <> ALL($2::bigint[]) ORDER BY o)
            WHERE subscription = $1 AND claimed_by = $6 AND journal_ids && $2::bigint[]
              AND NOT journal_ids <@ $2::bigint[]"""

#: The columns of a claimed event (``claim``, ``claim_ordered`` and ``step``).
CLAIMED = """journal_id bigint, deliveries integer, attempt integer, channel text,
                event_id text, payload text, pid integer, stored_at float8"""


# Each migration is (version, statements); ``{s}`` is the quoted schema name. Never edit
# a released migration: append a new one.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            # The journal: every durably published event, in the publishing transaction.
            # ``xid`` is the publishing transaction's id: consumers compare it with
            # snapshots, never trust the id order alone (see docs/durable.md).
            """CREATE TABLE {s}.journal (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
                channel text NOT NULL,
                event_id text NOT NULL,
                type text NOT NULL,
                payload text NOT NULL,
                pid integer NOT NULL DEFAULT pg_backend_pid(),
                created_at timestamptz NOT NULL DEFAULT now()
            )""",
            "CREATE UNIQUE INDEX journal_event_id ON {s}.journal (event_id)",
            "CREATE INDEX journal_xid ON {s}.journal (xid)",
            # One row per durable subscription (a consumer group): what it has taken in.
            # Every journal row visible in ``snap`` has been moved to its inbox (or did
            # not match); ``batch_snap``/``batch_cursor`` page through the next batch.
            """CREATE TABLE {s}.subscriptions (
                name text PRIMARY KEY,
                channels text[] NOT NULL,
                types text[],
                snap pg_snapshot NOT NULL,
                batch_snap pg_snapshot,
                batch_cursor bigint NOT NULL DEFAULT 0,
                created_at timestamptz NOT NULL DEFAULT now(),
                pumped_at timestamptz
            )""",
            # Events taken in by a subscription and not yet handled, in delivery order
            # (``seq``). Members claim rows with a lease; a handled row is deleted.
            """CREATE TABLE {s}.inbox (
                subscription text NOT NULL,
                journal_id bigint NOT NULL,
                seq bigint GENERATED ALWAYS AS IDENTITY,
                claimed_by text,
                claimed_until timestamptz,
                deliveries integer NOT NULL DEFAULT 0,
                PRIMARY KEY (subscription, journal_id)
            ) WITH (fillfactor = 50)""",  # room for HOT updates of claims
            "CREATE INDEX inbox_order ON {s}.inbox (subscription, seq)",
            "CREATE INDEX inbox_journal ON {s}.inbox (journal_id)",
            # Events given up on, with the raw payload, for `pgbus dead-letters`.
            """CREATE TABLE {s}.dead_letters (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                subscription text,
                channel text NOT NULL,
                event_id text,
                journal_id bigint,
                payload text NOT NULL,
                error text NOT NULL,
                attempts integer NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                redelivered_at timestamptz
            )""",
            "CREATE INDEX dead_letters_subscription ON {s}.dead_letters (subscription, id)",
        ),
    ),
    (
        2,
        (
            # A shared log with cursors: a subscription's batches replace its inbox, so
            # the success path writes one row per batch, not one per event. A batch is
            # the journal ids one pump took in for the subscription (in journal order),
            # claimed by one member at a time with a lease, deleted once handled. Only
            # failures leave rows behind (a batch redelivered is split: its first event
            # alone, so a poison event is found and dead-lettered, the rest after it).
            "CREATE SEQUENCE {s}.batch_seq",
            """CREATE TABLE {s}.batches (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                subscription text NOT NULL,
                seq bigint NOT NULL DEFAULT nextval('{s}.batch_seq'),
                journal_ids bigint[] NOT NULL,
                claimed_by text,
                claimed_until timestamptz,
                deliveries integer NOT NULL DEFAULT 0
            ) WITH (fillfactor = 50)""",  # room for HOT updates of claims
            "CREATE INDEX batches_order ON {s}.batches (subscription, seq, (journal_ids[1]))",
            # The inbox of v1, undelivered events and their delivery counts, moves over
            # row by row, in its order; its claims are dropped (stop v1 consumers first).
            """INSERT INTO {s}.batches (subscription, seq, journal_ids, deliveries)
                SELECT subscription, seq, ARRAY[journal_id], deliveries
                FROM {s}.inbox ORDER BY subscription, seq""",
            """SELECT setval('{s}.batch_seq',
                greatest((SELECT max(seq) FROM {s}.inbox), 1))""",
            "DROP TABLE {s}.inbox",
            # The pump in one round trip: lock the subscription row (or find another
            # member pumping: no row), then cut the batches in a statement of its own,
            # whose snapshot is newer than the lock (READ COMMITTED takes one per
            # statement), so ``snap`` only ever moves forward.
            _pump_sql(replace=False),
        ),
    ),
    (
        3,
        (
            # Persisted retries: a nacked event leaves its batch for a batch of its own,
            # claimable from ``not_before`` on, whose handler attempt is ``attempt``. The
            # claim skips batches not yet due, so a retry never holds up those behind it.
            (
                "ALTER TABLE {s}.batches ADD COLUMN not_before timestamptz,"
                " ADD COLUMN attempt integer NOT NULL DEFAULT 1"
            ),
            # Delayed delivery: events published for later wait here, and move into the
            # journal once due (so the subscriptions that exist then get them).
            """CREATE TABLE {s}.scheduled (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                due_at timestamptz NOT NULL,
                channel text NOT NULL,
                event_id text NOT NULL UNIQUE,
                type text NOT NULL,
                payload text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now()
            )""",
            "CREATE INDEX scheduled_due ON {s}.scheduled (due_at, id)",
        ),
    ),
    (
        4,
        (
            # One round trip from a wake-up to a claimed batch: ``step`` acks what the
            # member handled, pumps (when asked; no row from pump: another member is),
            # and claims the next batch, in one statement. Every row carries the pump's
            # result; no batch claimed: one row with a NULL journal_id.
            f"""CREATE FUNCTION {{s}}.claim(p_name text, p_member text, p_lease float8)
            RETURNS TABLE ({CLAIMED}) LANGUAGE sql AS $claim$
            {_claim_sql("{s}", ordered=False)}
            $claim$""",
            f"""CREATE FUNCTION {{s}}.claim_ordered(p_name text, p_member text, p_lease float8)
            RETURNS TABLE ({CLAIMED}) LANGUAGE sql AS $claim$
            {_claim_sql("{s}", ordered=True)}
            $claim$""",
            f"""CREATE FUNCTION {{s}}.ack(
                p_name text, p_ids bigint[], p_retry_ids bigint[], p_delays float8[],
                p_attempts integer[], p_member text, p_together bigint[])
            RETURNS void LANGUAGE sql AS $ack$
            {ACK_SQL}
            $ack$""",
            f"""CREATE FUNCTION {{s}}.step(
                p_name text, p_member text, p_lease float8, p_ordered boolean,
                p_pump boolean, p_channels text[], p_types text[], p_limit integer,
                p_batch integer, p_acks bigint[], p_retry_ids bigint[], p_delays float8[],
                p_attempts integer[], p_together bigint[])
            RETURNS TABLE (pumped bigint, resumed boolean, {CLAIMED})
            LANGUAGE plpgsql AS $step$
            #variable_conflict use_column
            DECLARE
                v_n bigint := 0;
                v_resumed boolean := false;
            BEGIN
                IF cardinality(p_acks) > 0 THEN
                    PERFORM {{s}}.ack(p_name, p_acks, p_retry_ids, p_delays, p_attempts,
                                     p_member, p_together);
                END IF;
                IF p_pump THEN
                    SELECT p.n, p.resumed INTO v_n, v_resumed
                    FROM {{s}}.pump(p_name, p_channels, p_types, p_limit, p_batch) AS p;
                    IF NOT FOUND THEN
                        v_n := NULL;
                    END IF;
                END IF;
                IF p_ordered THEN
                    RETURN QUERY SELECT v_n, v_resumed, c.*
                    FROM {{s}}.claim_ordered(p_name, p_member, p_lease) AS c;
                ELSE
                    RETURN QUERY SELECT v_n, v_resumed, c.*
                    FROM {{s}}.claim(p_name, p_member, p_lease) AS c;
                END IF;
                IF NOT FOUND THEN
                    RETURN QUERY SELECT v_n, v_resumed, NULL::bigint, NULL::integer,
                        NULL::integer, NULL::text, NULL::text, NULL::text, NULL::integer,
                        NULL::float8;
                END IF;
            END
            $step$""",  # noqa: S608 - quoted identifier
        ),
    ),
    (
        5,
        (
            # The same claim and ack in PL/pgSQL: a SQL function that is not inlined
            # (these modify rows) is parsed and planned again at every call, which made
            # up half of a step's time on the server; PL/pgSQL keeps its statements
            # parsed for the session. Same bodies, same results. And a pump whose plan
            # may be kept for the session (see _pump_sql), so the consumers' sessions
            # no longer force a new plan of every statement at every call.
            _pump_sql(replace=True),
            *(
                f"""CREATE OR REPLACE FUNCTION {{s}}.{name}(
                    p_name text, p_member text, p_lease float8)
                RETURNS TABLE ({CLAIMED}) LANGUAGE plpgsql AS $claim$
                #variable_conflict use_column
                BEGIN
                    RETURN QUERY {_claim_sql("{s}", ordered=ordered, lookup=True)};
                END
                $claim$"""
                for name, ordered in (("claim", False), ("claim_ordered", True))
            ),
            f"""CREATE OR REPLACE FUNCTION {{s}}.ack(
                p_name text, p_ids bigint[], p_retry_ids bigint[], p_delays float8[],
                p_attempts integer[], p_member text, p_together bigint[])
            RETURNS void LANGUAGE plpgsql AS $ack$
            BEGIN
                {ACK_SQL};
            END
            $ack$""",
        ),
    ),
)

#: The schema version this pgbus works with.
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaError(ConfigError):
    """The durable schema is missing, older or newer than this pgbus.

    The message names the command that fixes it (``pgbus migrate``).

    .. versionadded:: 0.1.0
    """


def _missing(schema: str) -> SchemaError:
    return SchemaError(
        f"the pgbus durable schema {schema!r} does not exist in this database; create it"
        f" with `pgbus migrate --schema {schema}` (or `await bus.migrate()`)"
    )


async def schema_version(conn: Connection, schema: str) -> int | None:
    """Return the version of the durable schema, or ``None`` when it does not exist.

    :param conn: an asyncpg connection.
    :param schema: the schema name.
    :returns: the applied version, or ``None``.
    :raises InvalidIdentifier: for a schema name PostgreSQL would reject (before any SQL).
    """
    s = quote_ident(check_identifier(schema, "schema name"))
    exists = await conn.fetchval(
        "SELECT to_regclass(quote_ident($1) || '.schema_version') IS NOT NULL", schema
    )
    if not exists:
        return None
    version: int | None = await conn.fetchval(
        f"SELECT max(version) FROM {s}.schema_version"  # noqa: S608 - quoted identifier
    )
    return version or 0


async def check_schema(conn: Connection, schema: str) -> None:
    """Raise :class:`SchemaError` unless the durable schema is at :data:`SCHEMA_VERSION`.

    :param conn: an asyncpg connection.
    :param schema: the schema name.
    :raises SchemaError: when it is missing, older (run ``pgbus migrate``) or newer.
    :raises InvalidIdentifier: for a schema name PostgreSQL would reject (before any SQL).
    """
    version = await schema_version(conn, schema)
    if version is None:
        raise _missing(schema)
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"the pgbus durable schema {schema!r} is at version {version}; this pgbus needs"
            f" {SCHEMA_VERSION}: upgrade it with `pgbus migrate --schema {schema}`"
            " (or `await bus.migrate()`)"
        )
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the pgbus durable schema {schema!r} is at version {version}, newer than this"
            f" pgbus understands ({SCHEMA_VERSION}): upgrade pgbus"
        )


async def migrate(conn: Connection, schema: str = DEFAULT_SCHEMA) -> tuple[int, int]:
    """Create or upgrade the durable schema; safe to run from many processes at once.

    Runs in one transaction under an advisory lock (keyed by the schema name), so
    concurrent callers wait for each other and each migration is applied once.

    :param conn: an asyncpg connection (not inside a transaction of yours: it commits).
    :param schema: the schema name.
    :returns: ``(version before, version after)``; equal when there was nothing to do.
    :raises SchemaError: when the schema is newer than this pgbus.
    :raises InvalidIdentifier: for a schema name PostgreSQL would reject (before any SQL).

    .. versionadded:: 0.1.0
    """
    s = quote_ident(check_identifier(schema, "schema name"))
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('pgbus.durable.migrate:' || $1))", schema
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {s}.schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        before: int = await conn.fetchval(
            f"SELECT coalesce(max(version), 0) FROM {s}.schema_version"  # noqa: S608 - quoted identifier
        )
        if before > SCHEMA_VERSION:
            raise SchemaError(
                f"the pgbus durable schema {schema!r} is at version {before}, newer than"
                f" this pgbus understands ({SCHEMA_VERSION}): upgrade pgbus"
            )
        for version, statements in MIGRATIONS:
            if version <= before:
                continue
            for statement in statements:
                await conn.execute(statement.format(s=s))
            await conn.execute(
                f"INSERT INTO {s}.schema_version (version) VALUES ($1)",  # noqa: S608 - quoted identifier
                version,
            )
            logger.info("durable schema %s: applied migration %d", schema, version)
    return before, SCHEMA_VERSION


def is_missing_relation(exc: BaseException) -> bool:
    """Whether ``exc`` says a table or schema of the durable schema does not exist."""
    return sqlstate(exc) in {UNDEFINED_TABLE, INVALID_SCHEMA_NAME}


def taken_ids(exc: BaseException) -> list[str]:
    """The event ids a failed publish statement found taken (empty for another error)."""
    if sqlstate(exc) != INVALID_TEXT_REPRESENTATION:
        return []
    _, marker, rest = str(exc).partition(TAKEN_IDS_MARKER)
    return rest.rstrip('"').split(",") if marker else []


def journal_args(outgoing: Sequence[Outgoing]) -> tuple[list[str], ...]:
    """The arguments of :attr:`Sql.publish` for encoded events: channels, ids, types, payloads."""
    return (
        [o.channel for o in outgoing],
        [o.id for o in outgoing],
        [o.event.pgbus_type if o.event is not None else "" for o in outgoing],
        [o.payload for o in outgoing],
    )


def journal_statement(sql: Sql, outgoing: Sequence[Outgoing]) -> tuple[str, tuple[object, ...]]:
    """The usual publish statement of ``outgoing`` (one event or many) and its arguments."""
    if len(outgoing) == 1:
        return sql.publish_one, tuple(column[0] for column in journal_args(outgoing))
    return sql.publish_new, journal_args(outgoing)


def wakeup_notifications(
    outgoing: Sequence[Outgoing], ids: Sequence[str], refs: Sequence[str | None]
) -> tuple[list[str], list[str]]:
    """The channels and payloads that wake consumers for the journaled ``ids``, in order.

    ``refs`` is what :attr:`Sql.publish` returned beside ``ids``: the reference envelope
    of an event too large for NOTIFY, else ``None`` (the event's own envelope goes).
    """
    by_id = {o.id: o for o in outgoing}
    channels, payloads = [], []
    for event_id, ref in zip(ids, refs, strict=True):
        out = by_id[event_id]
        channels.append(out.channel)
        payloads.append(out.payload if ref is None else ref)
    return channels, payloads


def publish_error(exc: BaseException, schema: str) -> PgbusError:
    """What a failed journal insert into ``schema`` raises, for any driver's ``exc``."""
    if is_missing_relation(exc):
        return missing_schema_error(schema)
    taken = taken_ids(exc)
    if taken:
        return DuplicateEventId(taken)
    return PublishError(f"durable publish failed: {exc}")


def missing_schema_error(schema: str) -> SchemaError:
    """The error raised when a statement found the durable schema missing."""
    return _missing(schema)


#: The wake-up payload of a journal row (columns ``id``, ``event_id``, ``type`` and
#: ``payload``): NULL when the event itself fits in NOTIFY, else its reference envelope.
REFERENCE_SQL = f"""CASE WHEN octet_length(payload) < {NOTIFY_LIMIT} THEN NULL
    ELSE json_build_object(
        'v', 1, 'id', event_id, 'type', 'pgbus.ref',
        'ts', extract(epoch FROM clock_timestamp()),
        'data', json_build_object(
            'journal_id', id, 'type', type, 'bytes', octet_length(payload))
    )::text END"""


def position_sql(s: str, mode: str, at: str) -> str:
    """The snapshot of a durable position, in SQL, from the parameters ``mode`` and ``at``.

    ``mode`` ``'latest'``: now; else every journal row from ``at`` on (``NULL``: the
    whole journal). Not a snapshot of that time (there is none): one that sees every transaction
    below the smallest xid of those rows, and none still in progress, so no row
    journaled from ``at`` on is skipped (a few journaled just before may come too).
    """
    return f"""CASE WHEN {mode}::text = 'latest' THEN pg_current_snapshot() ELSE (
        SELECT (x::text || ':' || x::text || ':')::pg_snapshot FROM (
            SELECT least(min(j.xid), pg_snapshot_xmin(pg_current_snapshot())) AS x
            FROM {s}.journal j
            WHERE {at}::timestamptz IS NULL OR j.created_at >= {at}::timestamptz
        ) AS q) END"""  # noqa: S608 - quoted identifier


class Sql:
    """Every statement of the durable machinery, for one schema."""

    def __init__(self, schema: str) -> None:
        s = quote_ident(check_identifier(schema, "schema name"))
        self.schema = schema
        # Only inserts: no NOTIFY in the writer's transaction (it would serialize every
        # notifying commit of the cluster); the wake-ups go after the commit (see
        # _wakeups.py). Returns one row: the ids of the events inserted, in journal
        # order, with the reference envelope of each one NOTIFY would refuse (NULL for
        # the others, notified as they are), and the transaction's id.
        # An event the journal already holds (a retry of a publish that committed) is
        # skipped. An id it holds for another event (a forged row that took the id
        # first), or that a concurrent transaction took, fails the whole statement with
        # an error naming the ids (TAKEN_IDS_MARKER): nothing is journaled.
        # Only the skipped rows are looked up again. This is the fallback of
        # ``publish_new``: ON CONFLICT makes every row a speculative insertion (a look-up
        # of the id first, one more WAL record after), which doubled the statement's time.
        self.publish = f"""
            WITH input AS (
                SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                    WITH ORDINALITY AS t(channel, event_id, type, payload, ord)
            ), ins AS (
                INSERT INTO {s}.journal (channel, event_id, type, payload)
                SELECT channel, event_id, type, payload FROM input ORDER BY ord
                ON CONFLICT (event_id) DO NOTHING
                RETURNING id, channel, event_id, type, payload
            ), skipped AS MATERIALIZED (
                SELECT * FROM input WHERE event_id NOT IN (SELECT event_id FROM ins)
            ), taken AS (
                SELECT string_agg(s.event_id, ',' ORDER BY s.ord) AS ids
                FROM skipped s LEFT JOIN {s}.journal j USING (event_id)
                WHERE (j.channel, j.type, j.payload) IS DISTINCT FROM (s.channel, s.type, s.payload)
            )
            SELECT array_agg(event_id ORDER BY id) AS ids,
                array_agg({REFERENCE_SQL} ORDER BY id) AS refs,
                pg_current_xact_id()::text::bigint AS xid,
                (SELECT CASE WHEN ids IS NULL THEN 0
                        ELSE ('{TAKEN_IDS_MARKER}' || ids)::int END FROM taken) AS taken
            FROM ins"""  # noqa: S608 - quoted identifier
        # The usual publish: ids are 128 random bits, so every one is new and the rows
        # go in with a plain INSERT, returning what ``publish`` returns (``taken`` left
        # out). A unique violation (an id journaled already) fails the statement; a
        # publish through the pool runs ``publish`` then (the same event is skipped, an
        # id held for another event named).
        self.publish_new = f"""
            WITH ins AS (
                INSERT INTO {s}.journal (channel, event_id, type, payload)
                SELECT channel, event_id, type, payload
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                    WITH ORDINALITY AS t(channel, event_id, type, payload, ord)
                ORDER BY ord
                RETURNING id, channel, event_id, type, payload
            )
            SELECT array_agg(event_id ORDER BY id) AS ids,
                array_agg({REFERENCE_SQL} ORDER BY id) AS refs,
                pg_current_xact_id()::text::bigint AS xid
            FROM ins"""  # noqa: S608 - quoted identifier
        # The same for one event, without the arrays (most transactions publish one).
        self.publish_one = f"""
            INSERT INTO {s}.journal (channel, event_id, type, payload)
            VALUES ($1, $2, $3, $4)
            RETURNING ARRAY[event_id] AS ids, ARRAY[{REFERENCE_SQL}] AS refs,
                pg_current_xact_id()::text::bigint AS xid"""  # noqa: S608 - quoted identifier
        # The event ids of $1 the journal holds (committed), in $1's order.
        self.journaled = f"""
            SELECT t.event_id FROM unnest($1::text[]) WITH ORDINALITY AS t(event_id, ord)
            WHERE EXISTS (SELECT 1 FROM {s}.journal j WHERE j.event_id = t.event_id)
            ORDER BY t.ord"""  # noqa: S608 - quoted identifier
        # The wake-ups of publishes in callers' transactions (see _wakeups.py). The
        # transactions of $1 that every new snapshot sees (committed), and those
        # aborted; in the same statement, the notifications $2/$3 whose transaction $4
        # is NULL (committed already), or one of those committed ones and their event
        # $5 in the journal, go out in their order. An aborted one's must not (a plain
        # subscriber would get an event that never was), nor one whose savepoint was
        # rolled back in a transaction that committed (OFFSET 0: the look-up stays one
        # per event on the id's index, never a hash of the whole journal, whatever the
        # journal's size when the session planned it). One row per decided
        # transaction, or a single row with a NULL xid when none is.
        self.send_committed = f"""
            WITH s AS MATERIALIZED (
                SELECT x::text::bigint AS xid, pg_xact_status(x) = 'aborted' AS aborted
                FROM unnest($1::text[]::xid8[]) AS t(x)
                WHERE pg_xact_status(x) IS DISTINCT FROM 'in progress'
                  AND (pg_xact_status(x) = 'aborted'
                       OR pg_visible_in_snapshot(x, pg_current_snapshot()))
            ), sent AS MATERIALIZED (
                SELECT pg_notify(t.c, t.p)
                FROM unnest($2::text[], $3::text[], $4::bigint[], $5::text[]) AS t(c, p, x, e)
                WHERE t.x IS NULL
                   OR (t.x IN (SELECT xid FROM s WHERE aborted IS NOT TRUE)
                       AND EXISTS (SELECT FROM {s}.journal j WHERE j.event_id = t.e OFFSET 0))
            )
            SELECT s.xid, s.aborted FROM (SELECT count(*) FROM sent) AS n LEFT JOIN s ON true"""  # noqa: S608 - quoted identifier
        # Events published for later (an id taken already is skipped, as in publish).
        self.schedule = f"""
            INSERT INTO {s}.scheduled (due_at, channel, event_id, type, payload)
            SELECT to_timestamp($5), channel, event_id, type, payload
            FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                WITH ORDINALITY AS t(channel, event_id, type, payload, ord)
            ORDER BY ord
            ON CONFLICT (event_id) DO NOTHING"""  # noqa: S608 - quoted identifier
        self.cancel = f"DELETE FROM {s}.scheduled WHERE event_id = $1"  # noqa: S608 - quoted identifier
        # Up to $1 events that fell due move into the journal, in due order, with the
        # wake-ups to send once committed (the event's own payload, or a reference).
        self.release_due = f"""
            WITH due AS (
                DELETE FROM {s}.scheduled WHERE id IN (
                    SELECT id FROM {s}.scheduled WHERE due_at <= now()
                    ORDER BY due_at, id LIMIT $1 FOR UPDATE SKIP LOCKED)
                RETURNING due_at, id, channel, event_id, type, payload
            ), ins AS (
                INSERT INTO {s}.journal (channel, event_id, type, payload)
                SELECT channel, event_id, type, payload FROM due ORDER BY due_at, id
                ON CONFLICT (event_id) DO NOTHING
                RETURNING id, channel, event_id, type, payload
            )
            SELECT channel, coalesce({REFERENCE_SQL}, payload) AS wakeup
            FROM ins ORDER BY id"""  # noqa: S608 - quoted identifier
        # Seconds until the next event published for later is due, and how many wait.
        self.scheduled = f"""
            SELECT extract(epoch FROM min(due_at) - now())::float8, count(*)
            FROM {s}.scheduled"""  # noqa: S608 - quoted identifier
        # A new subscription starts at its position ($4, $5: see position_sql).
        self.ensure_subscription = f"""
            INSERT INTO {s}.subscriptions (name, channels, types, snap)
            VALUES ($1, $2::text[], $3::text[], {position_sql(s, "$4", "$5")})
            ON CONFLICT (name) DO UPDATE SET channels = excluded.channels, types = excluded.types
        """  # noqa: S608 - quoted identifier
        # Acks what the member ($2) handled ($10..$14: see ``ack``), cuts what the
        # subscription's snapshot newly sees into batches when ``$5`` (pumped NULL:
        # another member is pumping), and claims the next batch not claimed by another
        # member (or whose lease ran out), with its events; a batch delivered before
        # (its member died, or handed it back) is split: its first event alone, the
        # rest as a batch after it. For a key-ordered subscription (``$4``): only its
        # first batch, and only when no other member holds it, so batches are handled
        # one after another across the group (the function ``step`` of migration 4).
        self.step = f"""
            SELECT * FROM {s}.step($1, $2, $3, $4, $5, $6::text[], $7::text[], $8, $9,
                $10::bigint[], $11::bigint[], $12::float8[], $13::integer[], $14::bigint[])
        """  # noqa: S608 - quoted identifier
        # The event a reference notification points to (for plain subscriptions).
        self.stored_event = f"""
            SELECT channel, event_id, payload, pid,
                   extract(epoch FROM created_at)::float8 AS stored_at
            FROM {s}.journal WHERE id = $1"""  # noqa: S608 - quoted identifier
        # Handled (or dead-lettered) events leave the batches this member claimed, those
        # to retry go into batches of their own (the function ``ack``: see ACK_SQL).
        self.ack = f"""
            SELECT {s}.ack($1, $2::bigint[], $3::bigint[], $4::float8[], $5::integer[],
                $6, $7::bigint[])"""
        # Move a subscription to a position: what it had taken in and not handled (its
        # batches, retries too) is dropped, and it takes in again from there.
        self.seek = f"""
            WITH gone AS (DELETE FROM {s}.batches WHERE subscription = $1)
            UPDATE {s}.subscriptions
            SET snap = {position_sql(s, "$2", "$3")}, batch_snap = NULL, batch_cursor = 0
            WHERE name = $1"""  # noqa: S608 - quoted identifier
        self.drop_subscription = f"""
            WITH gone AS (DELETE FROM {s}.batches WHERE subscription = $1)
            DELETE FROM {s}.subscriptions WHERE name = $1"""  # noqa: S608 - quoted identifier
        # The backlog: the due events of the subscription's batches, and the journal rows
        # on its channels committed after its snapshot that no pump took in yet (but for
        # those a pump cut short took already: up to ``batch_cursor`` of ``batch_snap``),
        # so events published while no consumer runs count too.
        self.list_subscriptions = f"""
            SELECT s.name, s.channels, s.types, s.created_at, s.pumped_at,
                coalesce(b.backlog, 0) + u.backlog AS backlog, coalesce(b.retries, 0) AS retries,
                least(b.oldest, u.oldest) AS oldest
            FROM {s}.subscriptions s
            LEFT JOIN LATERAL (
                SELECT sum(cardinality(b.journal_ids))
                        FILTER (WHERE b.not_before IS NULL OR b.not_before <= now())::bigint
                        AS backlog,
                    count(*) FILTER (WHERE b.not_before > now()) AS retries,
                    min(j.created_at) FILTER (WHERE b.not_before IS NULL OR b.not_before <= now())
                        AS oldest
                FROM {s}.batches b LEFT JOIN {s}.journal j ON j.id = b.journal_ids[1]
                WHERE b.subscription = s.name
            ) b ON true
            CROSS JOIN LATERAL (
                SELECT count(*)::bigint AS backlog, min(j.created_at) AS oldest
                FROM {s}.journal j
                WHERE j.xid >= pg_snapshot_xmin(s.snap)
                  AND NOT pg_visible_in_snapshot(j.xid, s.snap)
                  AND j.channel = ANY(s.channels)
                  AND (s.types IS NULL OR j.type = ANY(s.types))
                  AND NOT (s.batch_snap IS NOT NULL AND j.id <= s.batch_cursor
                           AND pg_visible_in_snapshot(j.xid, s.batch_snap))
            ) u
            ORDER BY s.name"""  # noqa: S608 - quoted identifier
        # Seconds until the subscription's next retry is due (NULL: none waits), and how
        # many events wait for a retry.
        self.next_due = f"""
            SELECT extract(epoch FROM min(not_before) - now())::float8,
                   coalesce(sum(cardinality(journal_ids)), 0)::bigint
            FROM {s}.batches
            WHERE subscription = $1 AND not_before > now()"""  # noqa: S608 - quoted identifier
        self.release = f"""
            UPDATE {s}.batches SET claimed_by = NULL, claimed_until = NULL
            WHERE subscription = $1 AND claimed_by = $2 AND journal_ids && $3::bigint[]
        """  # noqa: S608 - quoted identifier
        self.renew = f"""
            UPDATE {s}.batches SET claimed_until = now() + make_interval(secs => $3)
            WHERE subscription = $1 AND claimed_by = $2 AND journal_ids && $4::bigint[]
        """  # noqa: S608 - quoted identifier
        self.dead_letter = f"""
            INSERT INTO {s}.dead_letters
                (subscription, channel, event_id, journal_id, payload, error, attempts)
            VALUES ($1, $2, $3, $4, $5, $6, $7)"""  # noqa: S608 - quoted identifier
        # Retention: rows every subscription has taken in and handled, in bounded batches.
        # A row is done for a subscription once it is visible in its ``snap`` (taken in)
        # and in no batch (handled). Nothing at or above the smallest ``xmax`` of
        # those snapshots can be visible in all of them: that bounds the index scan.
        self.prune_horizon = f"""
            SELECT coalesce(min(pg_snapshot_xmax(snap)),
                            pg_snapshot_xmin(pg_current_snapshot()))
            FROM {s}.subscriptions"""  # noqa: S608 - quoted identifier
        self.prune_done = f"""
            WITH doomed AS (
                SELECT j.id FROM {s}.journal j
                WHERE j.xid < $2::xid8
                  AND NOT EXISTS (
                      SELECT 1 FROM {s}.subscriptions s
                      WHERE NOT pg_visible_in_snapshot(j.xid, s.snap))
                  AND j.id NOT IN (SELECT unnest(journal_ids) FROM {s}.batches)
                ORDER BY j.xid LIMIT $1
            )
            DELETE FROM {s}.journal WHERE id IN (SELECT id FROM doomed)"""  # noqa: S608 - quoted identifier
        # ... and, whatever the subscriptions, rows older than the retention age. Only
        # the head of the journal is looked at, so the scan stays bounded.
        self.prune_old = f"""
            WITH doomed AS (
                SELECT id FROM (
                    SELECT id, created_at FROM {s}.journal ORDER BY id LIMIT $1
                ) AS head
                WHERE created_at < now() - make_interval(secs => $2)
            ), d AS (
                DELETE FROM {s}.journal WHERE id IN (SELECT id FROM doomed) RETURNING id
            )
            SELECT count(*) FROM d"""  # noqa: S608 - quoted identifier
        self.prune_lock = "SELECT pg_try_advisory_xact_lock(hashtext('pgbus.durable.prune:' || $1))"
