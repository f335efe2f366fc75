"""The hiredis packing in bridge/bus.py against its reference, redis-py's own ``pack_command``.

It overrides a private redis-py method: these tests fail loudly when redis-py changes under it.
"""

from __future__ import annotations

import inspect
from typing import Any

import redis.asyncio.connection as rc
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.bus import Field, _hiredis_packing, connect, hiredis_pack

REFERENCE = rc.Connection()  # never connected: only packs


def reference(*args: Any) -> bytes:
    return b"".join(rc.Connection.pack_command(REFERENCE, *args))


def ours(*args: Any) -> bytes:
    return b"".join(hiredis_pack(REFERENCE, *args))


def test_redis_py_still_has_the_method_we_override_and_packs_pipelines_through_it() -> None:
    assert "pack_command" in vars(rc.AbstractConnection), (
        "redis-py moved pack_command: revisit bus.hiredis_pack"
    )
    params = list(inspect.signature(rc.AbstractConnection.pack_command).parameters.values())
    assert [p.kind for p in params] == [
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    ]
    assert "self.pack_command(" in inspect.getsource(rc.AbstractConnection.pack_commands)


def test_the_bus_client_packs_with_hiredis() -> None:
    client = connect("redis://127.0.0.1:6379/9")
    cls = client.connection_pool.connection_class
    assert issubclass(cls, rc.Connection) and cls.pack_command is hiredis_pack
    assert _hiredis_packing(rc.Connection) is cls  # one subclass per connection class


arg = st.one_of(
    st.text(),
    st.binary(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(list(Field)),
)
head = st.one_of(
    st.sampled_from(["EVALSHA", "XADD", "CONFIG GET", b"CLIENT SETNAME", "SET"]), st.text(min_size=1)
)


@settings(max_examples=500, deadline=None)
@given(head, st.lists(arg, max_size=40))
def test_hiredis_packs_the_same_bytes_as_redis_py(cmd: Any, args: list[Any]) -> None:
    assert ours(cmd, *args) == reference(cmd, *args)


def test_a_large_lua_call_packs_the_same() -> None:
    args = ["EVALSHA", "0" * 40, 2, "k1", "k2", *(f"v{i}".encode() * 50 for i in range(500)), 1.5, -7]
    assert ours(*args) == reference(*args)
