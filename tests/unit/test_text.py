from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.text import MIN_LIMIT_BYTES, split_chunks, split_text

NUMBER = re.compile(r"\((\d+)/(\d+)\)[ \n]")


def nbytes(s: str) -> int:
    return len(s.encode("utf-8"))


def check(text: str, limit: int, *, number_parts: bool = True, markdown: bool = False) -> list[str]:
    """Split, then check every invariant that must always hold; returns the parts."""
    parts = split_text(text, limit, number_parts=number_parts, markdown=markdown)
    chunks = split_chunks(text, limit, number_parts=number_parts, markdown=markdown)
    assert "".join(chunks) == text
    assert len(parts) == len(chunks)
    for part in parts:
        assert nbytes(part) <= limit
        part.encode("utf-8")  # valid UTF-8: no lone surrogates
    if len(parts) == 1:
        assert parts == [text]
        return parts
    for i, (part, chunk) in enumerate(zip(parts, chunks, strict=True), 1):
        rest = part
        if number_parts:
            m = NUMBER.match(part)
            assert m is not None, part
            assert (int(m.group(1)), int(m.group(2))) == (i, len(parts))
            rest = part[m.end() :]
        # What is left is [reopened fence line] + chunk + [closing fence]: added text only.
        assert chunk in rest
        if not markdown:
            assert rest == chunk
    return parts


def test_fits_unchanged() -> None:
    assert split_text("hello", 16) == ["hello"]
    assert split_text("", 16) == [""]
    assert split_chunks("", 16) == [""]
    assert split_text("```\ncode\n```", 100, markdown=True) == ["```\ncode\n```"]


def test_too_small_limit() -> None:
    with pytest.raises(ValueError):
        split_text("x" * 100, MIN_LIMIT_BYTES - 1)
    with pytest.raises(ValueError):
        split_text("x", 0)


def test_exact_boundary() -> None:
    limit = 100
    assert check("a" * limit, limit) == ["a" * limit]
    parts = check("a" * (limit + 1), limit)
    assert len(parts) == 2
    assert parts[0].startswith("(1/2) ")
    parts = check("a" * (limit + 1), limit, number_parts=False)
    assert [nbytes(p) for p in parts] == [limit, 1]


def test_ascii_prefers_whitespace() -> None:
    text = " ".join(f"word{i:03d}" for i in range(200))
    for part in check(text, 120, number_parts=False)[:-1]:
        assert part.endswith(" ")  # never cut inside a word


def test_cjk_three_byte() -> None:
    text = "汉" * 1000
    parts = check(text, 100, number_parts=False)
    assert all(nbytes(p) == 99 for p in parts[:-1])  # 33 characters of 3 bytes
    assert "".join(parts) == text


def test_cjk_sentence_end() -> None:
    text = "这是一个句子。" * 40
    for part in check(text, 200)[:-1]:
        assert part.endswith("。")


def test_emoji_four_byte() -> None:
    text = "😀" * 100
    parts = check(text, 50, number_parts=False)
    assert all(nbytes(p) == 48 for p in parts[:-1])


def test_zwj_family_kept_whole() -> None:
    family = "👨\u200d👩\u200d👧\u200d👦"  # 25 bytes, one user-perceived character
    text = family * 20
    for part in check(text, 80):
        body = NUMBER.sub("", part, count=1)
        assert body == family * (len(body) // len(family))


def test_skin_tone_and_variation_selector_kept() -> None:
    thumbs = "👍🏽"  # base + skin tone
    heart = "❤\ufe0f"  # base + VS16
    text = (thumbs + heart) * 50
    for chunk in split_chunks(text, 30, number_parts=False):
        assert not chunk.startswith(("\U0001f3fd", "\ufe0f"))
        assert not chunk.endswith(("👍", "❤"))


def test_flags_kept_in_pairs() -> None:
    text = "🇨🇳🇺🇸🇯🇵🇫🇷🇩🇪" * 10  # each flag is two regional indicators, 8 bytes
    for chunk in split_chunks(text, 30, number_parts=False):
        assert len(chunk) % 2 == 0
    for part in check(text, 30):
        body = NUMBER.sub("", part, count=1)
        assert len(body) % 2 == 0


def test_combining_marks_stay_with_base() -> None:
    text = "e\u0301" * 100  # decomposed é
    for chunk in split_chunks(text, 20, number_parts=False):
        assert chunk.startswith("e")
        assert chunk.endswith("\u0301")


def test_unavoidable_cluster_split() -> None:
    text = "e" + "\u0301" * 100  # one grapheme of 201 bytes: it has to be cut
    check(text, 40)
    check(text, 40, number_parts=False)


def test_paragraph_preference() -> None:
    para1 = "First paragraph. It has two sentences."
    para2 = "Second paragraph, a bit longer than the first one, with words."
    text = f"{para1}\n\n{para2}\n\n{para1}"
    chunks = split_chunks(text, 100, number_parts=False)
    assert chunks[0] == f"{para1}\n\n"
    assert chunks[1].startswith("Second")


def test_line_then_sentence_preference() -> None:
    text = "line one is here\nline two. Still line two and more words"
    assert split_chunks(text, 50, number_parts=False)[0] == "line one is here\n"
    text = "Sentence one. Sentence two is a bit longer. More words here"
    assert split_chunks(text, 50, number_parts=False)[0] == "Sentence one. Sentence two is a bit longer. "


def test_numbering_within_budget() -> None:
    text = "x" * 5000
    parts = check(text, 100)
    assert len(parts) > 50
    assert parts[0].startswith("(1/")
    assert parts[-1].startswith(f"({len(parts)}/{len(parts)}) ")
    assert all(nbytes(p) <= 100 for p in parts)
    # Ten or more parts: the budget is reserved for two-digit numbers everywhere.
    parts = check("y" * 1000, 100)
    assert 10 <= len(parts) < 100


def test_code_block_kept_whole_when_it_fits() -> None:
    code = "```python\n" + "".join(f"print({i})\n" for i in range(8)) + "```\n"
    text = "Intro paragraph with some words.\n\n" + code + "\nOutro text."
    parts = check(text, 160, markdown=True)
    assert any(code in p for p in parts)


def test_code_block_longer_than_a_part() -> None:
    code = "```python\n" + "".join(f"value_{i} = {i} * 2\n" for i in range(60)) + "```\n"
    text = "Intro.\n\n" + code + "after the block\n"
    parts = check(text, 200, markdown=True)
    assert len(parts) > 3
    for part in parts:
        body = NUMBER.sub("", part, count=1)
        fences = [line for line in body.split("\n") if line.startswith("```")]
        assert len(fences) % 2 == 0, body  # every part opens and closes its fences
    for part in parts[1:-1]:
        assert NUMBER.sub("", part, count=1).startswith("```python\n")
        assert part.rstrip("\n").endswith("```")
    # Code lines are never cut in the middle.
    for chunk in split_chunks(text, 200, markdown=True)[:-1]:
        assert chunk.endswith("\n")


def test_unclosed_code_block() -> None:
    text = "```\n" + "line of code\n" * 50
    check(text, 100, markdown=True)


def test_markdown_off_adds_no_fences() -> None:
    code = "```\n" + "line of code\n" * 50 + "```\n"
    parts = check(code, 100)
    assert sum(p.count("```") for p in parts) == 2


def test_large_text_is_fast() -> None:
    text = ("word " * 50 + "\n") * 2000 + "中文。" * 20000
    parts = check(text, 2048)
    assert len(parts) > 100


pieces = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "\n",
            "\n\n",
            "\r\n",
            " ",
            ". ",
            "。",
            "```",
            "```python\n",
            "\n```\n",
            "e\u0301",
            "👨\u200d👩\u200d👧\u200d👦",
            "👍🏽",
            "🇨🇳",
            "\U0001f1e6",
            "❤\ufe0f",
            "\u200d",
            "汉字",
            "x" * 40,
        ]
    ),
)
texts = st.lists(pieces, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), limit=st.integers(MIN_LIMIT_BYTES, 5000))
def test_property_arbitrary_text(text: str, limit: int) -> None:
    check(text, limit)
    check(text, limit, number_parts=False)


@settings(max_examples=300, deadline=None)
@given(
    text=texts,
    limit=st.integers(MIN_LIMIT_BYTES, 400),
    number_parts=st.booleans(),
    markdown=st.booleans(),
)
def test_property_structured_text(text: str, limit: int, number_parts: bool, markdown: bool) -> None:
    check(text, limit, number_parts=number_parts, markdown=markdown)
