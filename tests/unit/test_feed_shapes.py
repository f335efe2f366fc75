"""oa_articles reads the bodies it accepts, and names the keys of one it does not."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.feeds.oa_articles import ShapeError, parse_body, parse_time

A1 = {
    "id": "a1",
    "title": "One",
    "url": "https://mp.weixin.qq.com/s/a1",
    "accountName": "Tech",
    "publishTime": 1700000100,
}
A2 = {
    "articleId": 7,
    "title": "Two",
    "link": "https://x/2",
    "nickname": "Tech",
    "createdAt": "2023-11-14T22:13:20Z",
}
A3 = {
    "msgId": "m3",
    "title": "Three",
    "contentUrl": "https://x/3",
    "account": {"name": "Ops"},
    "create_time": 1700000000123,
}


@pytest.mark.parametrize(
    "body",
    [
        [A1, A2, A3],
        {"data": [A1, A2, A3]},
        {"items": [A1, A2, A3]},
        {"list": [A1, A2, A3]},
        {"messages": [A1, A2, A3]},
        {"code": 0, "data": {"list": [A1, A2, A3], "total": 3}},
        {"data": {"items": [A1, A2, A3]}},
        {"result": "ok", "data": {"messages": [A1, A2, A3], "hasMore": False}},
    ],
)
def test_accepted_shapes(body: Any) -> None:
    items, more = parse_body(body, "feed", page_size=20, page=1)
    assert [i.id for i in items] == ["7", "m3", "a1"]  # oldest first
    assert not more
    by_id = {i.id: i for i in items}
    assert by_id["a1"].text == "One\nhttps://mp.weixin.qq.com/s/a1"
    assert by_id["a1"].conversation.id == "Tech"
    assert by_id["m3"].conversation.title == "Ops"
    assert by_id["7"].created_at == 1700000000.0
    assert by_id["m3"].created_at == pytest.approx(1700000000.123)


def test_end_of_pages() -> None:
    full = [dict(A1, id=f"x{i}") for i in range(5)]
    assert parse_body(full, "f", 5, 1)[1] is True  # a full page, no flags: maybe more
    assert parse_body(full[:4], "f", 5, 1)[1] is False  # a short page ends it
    assert parse_body([], "f", 5, 3)[1] is False
    assert parse_body({"data": full, "total": 10}, "f", 5, 2)[1] is False
    assert parse_body({"data": full, "total": 11}, "f", 5, 2)[1] is True
    assert parse_body({"data": {"list": full[:2], "has_more": True}}, "f", 5, 1)[1] is True
    assert parse_body({"data": {"list": full, "hasMore": False}}, "f", 5, 1)[1] is False


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"code": 0, "result": {"rows": []}}, "top-level keys found: code, result"),
        ({"data": {"entries": [A1]}}, "top-level keys found: data"),
        ({}, "an empty object"),
        ("ok", "the body is a JSON str"),
        ([{"title": "no id", "url": "u"}], "its keys: title, url"),
        ([1, 2], "an article is a JSON int"),
    ],
)
def test_unknown_shapes_name_the_keys(body: Any, named: str) -> None:
    with pytest.raises(ShapeError) as e:
        parse_body(body, "f", 20, 1)
    assert named in str(e.value)


def test_times() -> None:
    assert parse_time(1700000000) == 1700000000.0
    assert parse_time(1700000000000) == 1700000000.0
    assert parse_time("1700000000") == 1700000000.0
    assert parse_time("2023-11-14T22:13:20Z") == 1700000000.0
    assert parse_time("2023-11-14T22:13:20+00:00") == 1700000000.0
    assert parse_time("2023-11-14 22:13:20") == 1700000000.0  # no zone: UTC
    assert parse_time("yesterday") is None
    assert parse_time(True) is None
