"""A session store URL its store cannot read is refused at start naming the setting and the URL (its password
hidden), not with the client library's bare message ("Port out of range 0-65535") or its traceback."""

from __future__ import annotations

import pytest

from service.core.sessions import open_store
from service.settings import Settings


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("foo://x", "session_store 'foo://x': unknown scheme 'foo'; known: ["),
        ("redis://h:99999/0", "session_store 'redis://h:99999/0': Port out of range 0-65535"),
        ("rediss://h:abc", "session_store 'rediss://h:abc': Port could not be cast to integer value as 'abc'"),
        ("redis+cluster://", "session_store 'redis+cluster://': RedisCluster requires at least one node to discover"),
        ("redis://:s3cret@h:99999/0", "session_store 'redis://:***@h:99999/0': Port out of range 0-65535"),
        # redis-py read a database that is not a number as database 0, without a word
        (
            "redis://h:6379/x",
            "session_store 'redis://h:6379/x': the database after the host must be a number (redis://HOST:PORT/DB, "
            "0 if left out), got 'x'",
        ),
        # a '/' in the password: redis-py said "Port could not be cast to integer value as 's3c'", a piece of it
        (
            "redis://:s3c/ret@h:6379/0",
            "session_store 'redis://:***@h:6379/0': the port after the host is not a number, or the password is not "
            "encoded: write '/' as %2F, '?' as %3F, '#' as %23 and '@' as %40 in the password",
        ),
        (
            "redis://:s3cret/1@h:6379/0",
            "session_store 'redis://:***@h:6379/0': the port after the host is not a number, or the password is not "
            "encoded",
        ),
    ],
)
def test_a_url_the_store_cannot_read_names_the_setting(url: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        open_store(url, Settings(session_store=url))
    assert str(err.value).startswith(message) and "s3c" not in str(err.value)
    assert "\n" not in str(err.value)  # (one line: redis-py's cluster message goes on for five)
