"""Publish from synchronous code (Django, Flask, scripts, Celery tasks): no event loop.

:func:`publish` and :func:`publish_many` run one statement on *your* connection, inside
your transaction: a psycopg 3 ``Connection``, a SQLAlchemy ``Connection`` or ``Session``,
or a Django database connection (``django.db.connection``). The events are delivered to
the async subscribers of any :class:`pgbus.Bus` if and only if that transaction commits;
pgbus never begins, commits or rolls it back.

The envelope, the ids and the size check are the async path's own: the events are
encoded by the same plugins (the built-ins and those installed under the ``pgbus``
entry-point group, loaded once per process). With ``durable=True`` the events go into
the durable journal of ``schema`` (what ``Bus(durable=True)`` reads), like a durable
``bus.publish``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pgbus._drivers import DriverError, sync_executor
from pgbus._plugins import PluginManager
from pgbus._publish import Encoding, check_size, notify
from pgbus.durable._schema import (
    DEFAULT_SCHEMA,
    Sql,
    journal_args,
    publish_error,
    wakeup_notifications,
)
from pgbus.errors import PublishError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from pgbus._drivers import SyncConnection
    from pgbus._events import Event

__all__ = ["publish", "publish_many"]


@functools.cache
def _encoding() -> Encoding:
    """The encoders of this process's plugins (a bus's defaults), found once."""
    return Encoding(PluginManager())


@functools.lru_cache(maxsize=16)
def _journal(schema: str) -> Sql:
    return Sql(schema)


def publish(
    event: Event,
    *,
    connection: SyncConnection,
    durable: bool = False,
    schema: str = DEFAULT_SCHEMA,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Publish ``event`` in ``connection``'s transaction; delivered if it commits.

    :param event: the event; its class names the channel.
    :param connection: your psycopg ``Connection``, SQLAlchemy ``Connection``/``Session``
        or Django connection.
    :param durable: journal the event in the durable ``schema`` instead of a plain NOTIFY.
    :param schema: the durable schema (with ``durable=True``).
    :param headers: string headers carried in the envelope.
    :returns: the event's id.
    :raises PayloadTooLarge: (plain mode) when the encoded event is 8000 bytes or more.
    :raises PublishError: when the statement failed (your transaction is then yours to
        roll back).
    :raises ConfigError: for a connection of another kind, or an event no plugin encodes.
    """
    return publish_many(
        (event,), connection=connection, durable=durable, schema=schema, headers=headers
    )[0]


def publish_many(
    events: Iterable[Event],
    *,
    connection: SyncConnection,
    durable: bool = False,
    schema: str = DEFAULT_SCHEMA,
    headers: Mapping[str, str] | None = None,
) -> list[str]:
    """Publish many events in one statement in ``connection``'s transaction (all or nothing).

    Takes the arguments of :func:`publish`.

    :returns: the events' ids, in order.
    """
    run = sync_executor(connection)
    outs = _encoding().encode(events, headers)
    if not outs:
        return []
    if durable:
        try:
            rows = run.fetch(_journal(schema).publish, *journal_args(outs))
            if rows and rows[0][0]:
                # no loop here to watch for the commit (as the async path does): the
                # wake-ups go in the caller's transaction, delivered when it commits
                query, args = notify(*wakeup_notifications(outs, rows[0][0], rows[0][1]))
                run.execute(query, *args)
        except DriverError as exc:
            raise publish_error(exc, schema) from exc
    else:
        for out in outs:
            check_size(out.channel, out.payload)
        query, args = notify([o.channel for o in outs], [o.payload for o in outs])
        try:
            run.execute(query, *args)
        except DriverError as exc:
            raise PublishError(f"NOTIFY failed: {exc}") from exc
    return [o.id for o in outs]
