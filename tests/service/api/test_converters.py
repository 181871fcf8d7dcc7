"""The edge's contracts that only a wrong answer would show (each was untested until a mutation review): unset
CompleteRequest fields take their documented defaults, a forecast keeps each quantile level's rows on the wire,
size limits are inclusive and large requests hold the byte budget, Classify's limit follows the text limits, and
a session signing key needs 32 characters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from pydantic import ValidationError

from service.api import converters
from service.api.decoding import CLASSIFY, Decoding, MethodDecoder, Undecoded, method_limit
from service.api.gen.seqserve.v1 import autocomplete_pb2
from service.core.types import ForecastResult
from service.errors import TooLarge
from service.settings import Settings


# unset proto3 fields take the documented defaults
def test_unset_sampling_fields_take_their_defaults() -> None:
    p = converters.sampling_params(autocomplete_pb2.CompleteRequest(prompt="x"))
    assert (p.max_chars, p.temperature, p.seed) == (200, 1.0, None)


# every quantile level carries its own rows
def test_forecast_response_keeps_each_levels_rows() -> None:
    q = np.arange(3 * 2 * 1, dtype=np.float32).reshape(3, 2, 1)
    r = ForecastResult(["OT"], np.zeros((2, 1), np.float32), [0.1, 0.5, 0.9], q, 30)
    back = converters.forecast_from_pb(converters.forecast_to_pb(r))
    np.testing.assert_array_equal(back.quantiles, q)


# the size limit is inclusive
def test_a_request_one_byte_over_the_limit_is_refused() -> None:
    s = Settings(max_small_message_bytes=1024)
    dec = MethodDecoder(Decoding(s), "/seqserve.v1.Sessions/Get", SimpleNamespace(request_deserializer=bytes))
    assert dec.size(Undecoded(b"x" * 1024)) == 1024
    with pytest.raises(TooLarge):
        dec.size(Undecoded(b"x" * 1025))


# Classify's limit follows max_texts_per_request x max_chars_per_text
def test_classify_limit_follows_the_text_limits() -> None:
    s = Settings(max_texts_per_request=2, max_chars_per_text=10)
    assert method_limit(CLASSIFY, s) == (
        2 * (40 + 16) + s.max_small_message_bytes,
        "max_texts_per_request x max_chars_per_text",
    )


# a large unary request holds its bytes of the budget while it runs
async def test_a_large_unary_request_holds_the_byte_budget() -> None:
    edge = Decoding(Settings(large_request_bytes=1024, max_large_bytes_in_flight=4096))
    async with edge.admit(2000):
        assert edge.budget.used == 2000
    async with edge.admit(1000):
        assert edge.budget.used == 0


# a large message of a client stream holds its bytes until the next read
async def test_a_large_stream_message_holds_the_byte_budget() -> None:
    edge = Decoding(Settings(large_request_bytes=1024, max_large_bytes_in_flight=8192))
    dec = MethodDecoder(edge, "/seqserve.v1.Autocomplete/Suggest", SimpleNamespace(request_deserializer=len))
    dec.limit = 10_000

    async def requests() -> AsyncIterator[Undecoded]:
        yield Undecoded(b"x" * 3000)

    async for _ in dec.messages(requests()):
        assert edge.budget.used == 3000


# the signing key needs 32 characters
def test_a_31_character_signing_key_is_refused() -> None:
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(session_signing_key=cast(Any, "k" * 31))
    Settings(session_signing_key=cast(Any, "k" * 32))
