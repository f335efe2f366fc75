from __future__ import annotations

from tests.conftest import CollectSink, wait_for


async def test_inject_route_collect(write_config, start_daemon) -> None:  # type: ignore[no-untyped-def]
    cfg = write_config(
        """
        [[inbound]]
        name = "in"
        type = "manual"
        [[outbound]]
        name = "c"
        type = "collect"
        [[routes]]
        from = "in"
        to = "c"
        """
    )
    d = await start_daemon(cfg)
    from bridge.envelope import Conversation, make_envelope

    assert d.bus is not None
    await d.bus.publish(make_envelope("in", Conversation("g1"), "hi"))
    sink = CollectSink.instances["c"]
    await wait_for(lambda: len(sink.sent) == 1)
    assert sink.sent[0].envelope.text == "hi"
