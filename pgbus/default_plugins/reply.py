"""The built-in reply plugin: request/reply over the bus's own LISTEN connection.

:meth:`Bus.request <pgbus.Bus.request>` publishes an event with two headers, a reply
address (:data:`REPLY_TO`, a channel of the requesting bus) and a correlation token
(:data:`REPLY_ID`), and waits for the answer. Its bus LISTENs on that reply channel
through its one listener, subscribed on the first request (the subscription is named
:data:`REPLIES`), so a bus still holds one LISTEN connection.

On the answering side this plugin's middleware, innermost (``trylast``, registered after
``timeouts``), sees what the handler returned: a value other than ``None``, for a
delivery that carries a reply address, is sent back with a plain ``NOTIFY`` on that
address. A handler that returns a value for an event that was only published answers
nobody: the value is ignored. The reply is decoded into the handler's return
annotation when that is a pydantic model (a :class:`pgbus.Event` included) that the
requesting process has imported; otherwise the requester gets the JSON value (``dict``,
``list``, ``str``, number, ``bool``).

* Several responders: the first reply wins; later ones are ignored.
* A handler that fails for good (its last attempt raised, a :class:`~pgbus.Reject`, a
  timeout) answers with its error: the requester gets :class:`~pgbus.RequestFailed`
  carrying the error as text. A retried attempt does not answer; the retry may.
* A reply must fit in one NOTIFY (under 8000 bytes, with about 150 bytes of framing);
  one that does not, or is not JSON-serializable, is answered as a
  :class:`~pgbus.RequestFailed` saying so.
* Batch handlers (``batch=``) never answer.

Block it by name (``Bus(disable_plugins=["reply"])``): handlers' return values are
ignored and ``bus.request`` raises :class:`~pgbus.ConfigError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import typing
import uuid
import weakref
from typing import TYPE_CHECKING, Any

import pydantic
import pydantic_core

from pgbus._markers import hookimpl
from pgbus._status import BusState
from pgbus.errors import (
    BusClosed,
    ConfigError,
    PayloadTooLarge,
    PgbusError,
    RequestFailed,
    RequestTimeout,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pgbus._bus import Bus
    from pgbus._events import Delivery, Event, Message
    from pgbus._subscription import Subscription
    from pgbus.types import CallNext, Middleware

__all__ = ["DEFAULT_TIMEOUT", "REPLIES", "REPLY_ID", "REPLY_TO", "Replies"]

logger = logging.getLogger(__name__)

#: The return models of this process's answering handlers, by tag: a reply between two
#: buses of one process decodes even when the model's module is not in ``sys.modules``
#: under its name (a script run as ``__main__`` by a runner).
_ANSWERING: weakref.WeakValueDictionary[str, type[pydantic.BaseModel]] = (
    weakref.WeakValueDictionary()
)

#: The header naming the channel a reply goes to.
REPLY_TO = "pgbus-reply-to"
#: The header carrying the token that matches a reply to its request.
REPLY_ID = "pgbus-reply-id"
#: The name of the subscription that receives a bus's replies.
REPLIES = "pgbus-replies"
#: Seconds :meth:`Bus.request <pgbus.Bus.request>` waits by default.
DEFAULT_TIMEOUT = 30.0


class Replies:
    """The plugin registered as ``"reply"``: requests sent, and answers to requests.

    .. versionadded:: 0.3.0
    """

    def __init__(self) -> None:
        self._bus: Bus | None = None
        self._channel = f"pgbus_reply_{uuid.uuid4().hex}"
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._listening: asyncio.Task[object] | None = None
        #: Replies that matched no waiting request (late, or not the first).
        self.unmatched = 0

    @property
    def channel(self) -> str:
        """The channel this bus's replies arrive on."""
        return self._channel

    @hookimpl
    def pgbus_configure(self, bus: Bus) -> None:
        """Remember the bus: requests are published and answers sent through it."""
        self._bus = bus

    # -- the requesting side --------------------------------------------------------------

    async def request(
        self,
        event: Event,
        *,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - the wait for the reply
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Publish ``event`` with a reply address and return the first reply.

        See :meth:`Bus.request <pgbus.Bus.request>`.
        """
        bus = self._bus
        if bus is None:  # pragma: no cover - every Bus configures its plugins
            raise ConfigError("the reply plugin is not registered on a bus")
        if not (isinstance(timeout, int | float) and timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        if bus.state is not BusState.RUNNING:  # a reply would come before it LISTENs
            raise ConfigError("request() needs a running bus: await bus.start() first")
        await self._listen(bus)
        token = uuid.uuid4().hex
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[token] = waiter
        try:
            event_id = await bus.publish(
                event, headers={**(headers or {}), REPLY_TO: self._channel, REPLY_ID: token}
            )
            try:
                async with asyncio.timeout(timeout):
                    reply = await waiter
            except TimeoutError:
                raise RequestTimeout(event_id, timeout) from None
        finally:
            del self._waiting[token]
        return _decode(event_id, reply)

    async def _listen(self, bus: Bus) -> None:
        """Subscribe to this bus's reply channel, once (LISTEN before the first publish)."""
        task = self._listening
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = self._listening = asyncio.ensure_future(  # one LISTEN, for every request
                bus.listen(self._channel, self._received, name=REPLIES)
            )
        await asyncio.shield(task)

    async def _received(self, message: Message) -> None:
        try:
            reply = json.loads(message.payload)
            waiter = self._waiting.get(reply["re"])
        except (ValueError, KeyError, TypeError):
            logger.warning("not a reply on %s: %.200r", message.channel, message.payload)
            return
        if waiter is None or waiter.done():
            self.unmatched += 1
            logger.debug("reply to %s: no request waits for it (late, or not the first)", reply)
            return
        waiter.set_result(reply)

    @hookimpl
    def pgbus_on_stop(self) -> None:
        """Requests still waiting fail: no reply can arrive once the bus stops."""
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(BusClosed("the bus stopped while a request waited"))

    # -- the answering side ---------------------------------------------------------------

    @hookimpl(trylast=True)  # innermost, inside timeouts: it sees the handler's return value
    def pgbus_handler_middleware(self, subscription: Subscription) -> Middleware | None:
        """Send a handler's return value back when the delivery carries a reply address."""
        if subscription.batch is not None:
            return None
        model = _return_model(subscription.handler)
        tag = None
        if model is not None:
            tag = f"{model.__module__}:{model.__qualname__}"
            _ANSWERING[tag] = model

        async def reply(delivery: Delivery, call_next: CallNext) -> Any:
            result = await call_next(delivery)
            if result is not None and REPLY_TO in delivery.headers:
                try:
                    value = json.loads(pydantic_core.to_json(result))
                except (pydantic_core.PydanticSerializationError, ValueError) as exc:
                    await self._answer(delivery, error=f"reply is not JSON-serializable: {exc}")
                else:
                    await self._answer(delivery, value=value, tag=tag)
            return result

        return reply

    @hookimpl
    async def pgbus_on_handler_error(
        self, subscription: Subscription, delivery: Delivery, error: BaseException
    ) -> None:
        """A request whose handler failed for good is answered with the error."""
        if subscription.batch is None and REPLY_TO in delivery.headers:
            await self._answer(delivery, error=f"{type(error).__name__}: {error}")

    async def _answer(
        self, delivery: Delivery, *, value: Any = None, tag: str | None = None, error: str = ""
    ) -> None:
        bus = self._bus
        headers = delivery.headers
        if bus is None:  # pragma: no cover - every Bus configures its plugins
            return
        token = headers.get(REPLY_ID, "")
        if error:
            payload = json.dumps({"re": token, "ok": False, "error": error[:4000]})
        else:
            payload = json.dumps({"re": token, "ok": True, "type": tag, "value": value})
        try:
            try:
                await bus.notify(headers[REPLY_TO], payload)
            except PayloadTooLarge as exc:
                payload = json.dumps({"re": token, "ok": False, "error": str(exc)})
                await bus.notify(headers[REPLY_TO], payload)
        except PgbusError as exc:  # never fail (and re-run) a handler that has done its work
            logger.warning("could not reply to %s on %s: %s", delivery.id, headers[REPLY_TO], exc)


def _return_model(handler: object) -> type[pydantic.BaseModel] | None:
    """The handler's return annotation when it is a pydantic model class, else ``None``."""
    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # an unresolvable annotation: answer untyped
        return None
    annotation = hints.get("return")
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    return None


def _decode(event_id: str, reply: dict[str, Any]) -> Any:
    """The reply's value, validated into its model when this process has imported it."""
    if not reply.get("ok"):
        raise RequestFailed(event_id, str(reply.get("error", "")))
    value = reply.get("value")
    model = _imported(reply.get("type"))
    if model is None:
        return value
    try:
        return model.model_validate(value)
    except pydantic.ValidationError as exc:
        raise RequestFailed(event_id, f"reply is not a valid {model.__qualname__}: {exc}") from exc


def _imported(tag: object) -> type[pydantic.BaseModel] | None:
    """The model ``"module:qualname"`` names: an answering handler's, or from an imported module.

    It never imports a module a reply names.
    """
    if not isinstance(tag, str) or ":" not in tag:
        return None
    if (answering := _ANSWERING.get(tag)) is not None:
        return answering
    module_name, _, qualname = tag.partition(":")
    found: object = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if isinstance(found, type) and issubclass(found, pydantic.BaseModel):
        return found
    return None
