"""No password, in any DSN form, reaches a repr, an error, a log record or the CLI's output."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import pytest

import pgbus
from pgbus import server
from pgbus._util import redact_dsn
from tests.test_cli import invoke

if TYPE_CHECKING:
    from collections.abc import Callable

SECRET = "s3cret-pw"  # noqa: S105 - the secret the tests look for
SSL_SECRET = "ssl s3cret"  # noqa: S105 - the same, with a space to quote

#: Every form a DSN can carry a secret in, as (form, DSN template on host/port/user).
FORMS = {
    "url userinfo": "postgresql://{user}:" + SECRET + "@{host}:{port}/pgbus_no_such_db",
    "url query": (
        "postgresql://{user}@{host}:{port}/pgbus_no_such_db?PassWord="
        + quote(SECRET)
        + "&sslmode=disable&SSLPASSWORD="
        + quote(SSL_SECRET)
    ),
    "url both": (
        "postgres://{user}:"
        + SECRET
        + "@{host}:{port}/pgbus_no_such_db?sslpassword="
        + quote(SSL_SECRET, safe="")
    ),
    "keyword": (
        "host={host} port={port} user={user} dbname=pgbus_no_such_db password="
        + SECRET
        + " sslpassword='"
        + SSL_SECRET
        + "'"
    ),
}


def _dsn(pg_dsn: str, form: str) -> str:
    parts = urlsplit(pg_dsn)
    return FORMS[form].format(
        user=parts.username or "postgres", host=parts.hostname, port=parts.port or 5432
    )


def _assert_hidden(*texts: str) -> None:
    for text in texts:
        for secret in (SECRET, SSL_SECRET, quote(SSL_SECRET), quote(SSL_SECRET, safe="")):
            assert secret not in text, text


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:pw@h:1/d", "postgresql://u:***@h:1/d"),
        ("postgresql://u:p@ss@h/d", "postgresql://u:***@h/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        (
            "postgresql://h/d?password=pw&sslmode=require",
            "postgresql://h/d?password=***&sslmode=require",
        ),
        ("postgresql://h/d?SslPassword=a%20b#x", "postgresql://h/d?SslPassword=***#x"),
        ("postgresql://h/d?pass%77ord=pw", "postgresql://h/d?pass%77ord=***"),
        ("host=h password=pw dbname=d", "host=h password=*** dbname=d"),
        ("host=h sslpassword='a \\' b' user=u", "host=h sslpassword=*** user=u"),
        ("host=h password = pw\\ x", "host=h password = ***"),
    ],
)
def test_redact_dsn_hides_every_form(dsn: str, shown: str) -> None:
    """URL userinfo, password/sslpassword parameters and keyword values all become ***."""
    assert redact_dsn(dsn) == shown


@pytest.mark.parametrize("form", sorted(FORMS))
async def test_a_failing_start_never_shows_the_secret(
    make_bus: Callable[..., pgbus.Bus],
    pg_dsn: str,
    channel: str,
    caplog: pytest.LogCaptureFixture,
    form: str,
) -> None:
    """A bus that cannot connect keeps the secret out of its repr, its error and its logs."""
    caplog.set_level(logging.DEBUG)
    bus = make_bus(_dsn(pg_dsn, form), start_timeout=0.5)
    bus.subscribe(channel)(lambda _m: None)
    with pytest.raises(pgbus.ListenerError) as info:
        await asyncio.wait_for(bus.start(), 10)
    _assert_hidden(repr(bus), str(info.value), caplog.text)
    assert "pgbus_no_such_db" in str(info.value)  # the DSN is shown, its secret is not


@pytest.mark.parametrize("form", sorted(FORMS))
async def test_a_failing_publish_never_shows_the_secret(
    make_bus: Callable[..., pgbus.Bus],
    pg_dsn: str,
    channel: str,
    caplog: pytest.LogCaptureFixture,
    form: str,
) -> None:
    """A publish that cannot connect keeps the secret out of its error and its logs."""
    caplog.set_level(logging.DEBUG)
    bus = make_bus(_dsn(pg_dsn, form), publish_timeout=1.0)
    with pytest.raises(pgbus.PublishError) as info:
        await asyncio.wait_for(bus.notify(channel, "x"), 10)
    _assert_hidden(str(info.value), caplog.text)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_local_server_logs_the_dsn_without_its_secret(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, pg_dsn: str, form: str
) -> None:
    """local_server() says which DSN it uses from the environment, secrets hidden."""
    caplog.set_level(logging.DEBUG)
    dsn = _dsn(pg_dsn, form)
    monkeypatch.setenv("PGBUS_SECRET_TEST_DSN", dsn)
    with server.local_server(env_var="PGBUS_SECRET_TEST_DSN") as got:
        assert got == dsn
    assert "pgbus_no_such_db" in caplog.text
    _assert_hidden(caplog.text)


@pytest.mark.parametrize("form", sorted(FORMS))
async def test_server_reachable_logs_no_secret(
    caplog: pytest.LogCaptureFixture, pg_dsn: str, form: str
) -> None:
    """A failed reachability probe logs the DSN without its secret."""
    caplog.set_level(logging.DEBUG)
    assert not await server.server_reachable_async(_dsn(pg_dsn, form), timeout=2.0)
    _assert_hidden(caplog.text)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_cli_never_prints_the_secret(pg_dsn: str, form: str) -> None:
    """`pgbus doctor` on a database it cannot reach names the DSN, secrets hidden."""
    code, out, err = invoke("doctor", dsn=_dsn(pg_dsn, form))
    assert code != 0
    assert "pgbus_no_such_db" in out + err
    _assert_hidden(out, err)
