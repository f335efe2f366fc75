"""Split long text into parts that fit a UTF-8 byte budget.

WeChat/WeCom limits are counted in UTF-8 bytes (text 2048, markdown 4096 for the webhook bot, ...).
`split_text` cuts a message into parts that each fit, never inside a code point and, where it can be
avoided, never inside a user-perceived character (combining marks, emoji ZWJ sequences, skin tones,
variation selectors, flags). Break points are chosen in this order of preference: around a fenced
code block (markdown mode), paragraph, line, sentence end, whitespace, anywhere; a better kind of
break wins as long as it leaves the part at least a quarter full.

Nothing is dropped or rewritten: `split_chunks` returns the raw pieces (same arguments, same cuts)
and ``"".join(split_chunks(text, ...)) == text`` always holds. `split_text` only adds a "(i/n)"
number in front of each part and, in markdown mode, closes and reopens a code fence that a cut
went through, so that every part renders on its own.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

__all__ = ["MIN_LIMIT_BYTES", "split_chunks", "split_text"]

MIN_LIMIT_BYTES = 16

_ZWJ = "\u200d"
_SENTENCE_END = frozenset(".!?。！？")
_CJK_SENTENCE_END = frozenset("。！？")
_OPEN_FENCE = re.compile(r" {0,3}(`{3,})([^`]*)")
_CLOSE_FENCE = re.compile(r" {0,3}(`{3,})[ \t]*")

# Break levels: higher is preferred. _NO marks positions that are never chosen except as a
# last-resort hard cut (inside a grapheme cluster or inside a fence line).
_NO = -1
_ANY = 0
_SPACE = 1
_SENTENCE = 2
_LINE = 3
_PARAGRAPH = 4
_BLOCK = 5


@dataclass(frozen=True)
class _Block:
    """A fenced code block: text[start:end], body text[body:close], fence lines around it."""

    start: int  # start of the opening fence line
    body: int  # just after the opening fence line
    close: int  # start of the closing fence line (== end when unclosed)
    end: int  # just after the closing fence line
    fence: str  # the backtick run, e.g. "```"
    opener: str  # the opening fence line without its newline, e.g. "```python"

    @property
    def overhead(self) -> int:
        """Bytes needed to reopen ("```python\\n") and close ("\\n```") the block in one part."""
        return len(self.opener.encode()) + 1 + len(self.fence) + 1


@dataclass(frozen=True)
class _Cut:
    start: int
    end: int
    reopen: str  # fence line to prepend (markdown, the part starts inside a code block)
    close: str  # fence to append (markdown, the part ends inside a code block)


def split_text(
    text: str, limit_bytes: int, *, number_parts: bool = True, markdown: bool = False
) -> list[str]:
    """Split `text` into parts of at most `limit_bytes` UTF-8 bytes each, decorations included.

    A text that fits is returned unchanged as ``[text]``. Otherwise each part gets a "(i/n) "
    prefix when `number_parts` is true ("(i/n)" on its own line in markdown mode, so that headings
    and fences still start a line), and in markdown mode a code block cut in two is closed at the
    end of one part and reopened (same fence and info string) at the start of the next.
    Raises ValueError when `limit_bytes` is too small to make progress.
    """
    cuts = _split(text, limit_bytes, number_parts=number_parts, markdown=markdown)
    if len(cuts) == 1 and not cuts[0].reopen and not cuts[0].close:
        return [text]
    total = len(cuts)
    sep = "\n" if markdown else " "
    parts = []
    for i, cut in enumerate(cuts, 1):
        number = f"({i}/{total}){sep}" if number_parts else ""
        parts.append(number + cut.reopen + text[cut.start : cut.end] + cut.close)
    return parts


def split_chunks(
    text: str, limit_bytes: int, *, number_parts: bool = True, markdown: bool = False
) -> list[str]:
    """The raw pieces behind ``split_text(text, limit_bytes, ...)``, without numbers or fences.

    Their concatenation is exactly `text`.
    """
    cuts = _split(text, limit_bytes, number_parts=number_parts, markdown=markdown)
    return [text[cut.start : cut.end] for cut in cuts]


def _split(text: str, limit: int, *, number_parts: bool, markdown: bool) -> list[_Cut]:
    if limit < MIN_LIMIT_BYTES:
        raise ValueError(f"limit_bytes must be at least {MIN_LIMIT_BYTES}, got {limit}")
    size = len(text.encode("utf-8"))
    if size <= limit:
        return [_Cut(0, len(text), "", "")]
    cum = list(range(len(text) + 1)) if text.isascii() else [0, *accumulate(map(_utf8_len, text))]
    blocks = _find_blocks(text) if markdown else []
    levels = _levels(text, _glue(text), blocks)
    width = len(str(-(-size // limit)))  # digits of the least possible number of parts
    while True:
        # Reserve room for the widest number of this many digits: "(99/99) " for width 2.
        reserve = len(f"({'9' * width}/{'9' * width}) ") if number_parts else 0
        budget = limit - reserve
        if budget < 4:  # one code point can take 4 bytes
            raise ValueError(f"limit_bytes={limit} is too small to split this text")
        cuts = _plan(text, cum, levels, blocks, budget)
        if not number_parts or len(str(len(cuts))) <= width:
            return cuts
        width += 1


def _utf8_len(ch: str) -> int:
    o = ord(ch)
    return 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4


def _is_extend(ch: str) -> bool:
    """True for characters that attach to the previous one (grapheme extenders, roughly)."""
    o = ord(ch)
    return (
        ch == _ZWJ
        or 0xFE00 <= o <= 0xFE0F  # variation selectors
        or 0xE0100 <= o <= 0xE01EF  # variation selectors supplement
        or 0x1F3FB <= o <= 0x1F3FF  # emoji skin tone modifiers
        or 0xE0020 <= o <= 0xE007F  # tag characters (subdivision flags)
        or unicodedata.combining(ch) != 0
        or unicodedata.category(ch) in ("Mn", "Me", "Mc")
    )


def _glue(text: str) -> list[bool]:
    """glue[p] is True when a break before text[p] would split a user-perceived character."""
    glue = [False] * (len(text) + 1)
    ri_run = 0  # regional indicators seen in a row: flags are pairs
    prev = ""
    for p, ch in enumerate(text):
        o = ord(ch)
        if 0x1F1E6 <= o <= 0x1F1FF:
            glue[p] = ri_run % 2 == 1
            ri_run += 1
        else:
            ri_run = 0
            if prev == "\r":
                glue[p] = ch == "\n"
            elif prev != "\n":
                glue[p] = prev == _ZWJ or (o >= 0x300 and _is_extend(ch))
        prev = ch
    return glue


def _find_blocks(text: str) -> list[_Block]:
    blocks = []
    n = len(text)
    opened: tuple[int, int, str, str] | None = None  # start, body, fence, opener
    start = 0
    while start < n:
        newline = text.find("\n", start)
        end = n if newline == -1 else newline + 1
        line = text[start:end].rstrip("\r\n")
        if opened is None:
            m = _OPEN_FENCE.fullmatch(line)
            if m:
                opened = (start, end, m.group(1), line)
        else:
            m = _CLOSE_FENCE.fullmatch(line)
            if m and len(m.group(1)) >= len(opened[2]):
                blocks.append(_Block(opened[0], opened[1], start, end, opened[2], opened[3]))
                opened = None
        start = end
    if opened is not None:  # unclosed: the block runs to the end of the text
        blocks.append(_Block(opened[0], opened[1], n, n, opened[2], opened[3]))
    return blocks


def _levels(text: str, glue: list[bool], blocks: list[_Block]) -> list[int]:
    """levels[p]: how good a cut before text[p] is (see the _NO.._BLOCK constants)."""
    n = len(text)
    levels = [_NO] * (n + 1)
    for p in range(1, n):
        if glue[p]:
            continue
        c = text[p - 1]
        if c == "\n":
            q = p - 2
            if q >= 0 and text[q] == "\r":
                q -= 1
            levels[p] = _PARAGRAPH if q >= 0 and text[q] == "\n" else _LINE
        elif c in _CJK_SENTENCE_END:
            levels[p] = _SENTENCE
        elif c.isspace():
            levels[p] = _SENTENCE if p >= 2 and text[p - 2] in _SENTENCE_END else _SPACE
        else:
            levels[p] = _ANY
    for b in blocks:
        for p in range(b.start + 1, min(b.body + 1, n)):
            levels[p] = _NO  # inside the opening fence line, or right after it
        for p in range(b.body + 1, b.close):
            if levels[p] == _PARAGRAPH:
                levels[p] = _LINE  # code has lines, not paragraphs
            elif levels[p] == _SENTENCE:
                levels[p] = _SPACE
        for p in range(max(b.close, b.start + 1), b.end):
            levels[p] = _NO  # right before or inside the closing fence line
        for p in (b.start, b.end):
            if 0 < p < n:
                levels[p] = _BLOCK
    return levels


def _plan(text: str, cum: list[int], levels: list[int], blocks: list[_Block], budget: int) -> list[_Cut]:
    """Cut `text` into pieces of at most `budget` bytes, the fences added in markdown mode included.

    cum[p] is the UTF-8 size of text[:p]; levels as computed by _levels.
    """
    n = len(text)
    block_starts = [b.start for b in blocks]
    # owner[p] is the block whose fences must be closed/reopened for a cut at p, if any.
    # Blocks whose fence lines would eat more than half a part are left as they are.
    owner: list[_Block | None] = [None] * (n + 1)
    for b in blocks:
        if b.overhead <= budget // 2:
            for p in range(b.body + 1, b.close):
                owner[p] = b

    def close_at(p: int) -> str:
        b = owner[p]
        if b is None:
            return ""
        return b.fence if text[p - 1] == "\n" else "\n" + b.fence

    cuts = []
    s = 0
    while True:
        inside = owner[s]
        reopen = inside.opener + "\n" if inside is not None else ""
        room = budget - len(reopen.encode())
        e = bisect_right(cum, cum[s] + room) - 1
        if e >= n:
            cuts.append(_Cut(s, n, reopen, ""))
            return cuts

        def fits(p: int, s: int = s, room: int = room) -> bool:
            return cum[p] - cum[s] + len(close_at(p)) <= room

        cut = _whole_block_cut(blocks, block_starts, s, e, cum, budget)
        if cut is None:
            cut = _best_cut(levels, cum, s, e, room, fits)
        cuts.append(_Cut(s, cut, reopen, close_at(cut)))
        s = cut


def _whole_block_cut(
    blocks: list[_Block], block_starts: list[int], s: int, e: int, cum: list[int], budget: int
) -> int | None:
    """If the window ends inside a code block that would fit a part on its own, cut before it."""
    i = bisect_right(block_starts, e - 1) - 1
    if i < 0:
        return None
    b = blocks[i]
    if s < b.start < e < b.end and cum[b.end] - cum[b.start] <= budget:
        return b.start
    return None


def _best_cut(
    levels: list[int], cum: list[int], s: int, e: int, room: int, fits: Callable[[int], bool]
) -> int:
    """The best cut in (s, e].

    The highest-level natural break (whitespace or better) that leaves the part at least a quarter
    full; else the highest-level natural break anywhere in the window; else the last cut between
    two user-perceived characters; else a hard cut at a code point boundary.
    """
    min_fill = cum[s] + room // 4
    late: dict[int, int] = {}  # level -> last position with that level, cum[p] >= min_fill
    early: dict[int, int] = {}
    p = e
    while p > s:
        if cum[p] < min_fill and any(level > _ANY for level in late):
            break
        level = levels[p]
        found = late if cum[p] >= min_fill else early
        if level >= 0 and level not in found and fits(p):
            found[level] = p
        p -= 1
    for found in (late, early):
        natural = [level for level in found if level > _ANY]
        if natural:
            return found[max(natural)]
    if _ANY in late or _ANY in early:
        return late.get(_ANY, early.get(_ANY, e))
    p = e
    while p > s + 1 and not fits(p):
        p -= 1
    return p
