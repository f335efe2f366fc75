"""bench.fault.check, the fault run's judge: a clean record passes, and each kind of broken promise
(lost, duplicated, reordered, over the rate, a wrong dead letter, something left pending) fails it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bench.fault import Hit, check

CONVS = {"a": 4, "b": 3}
PERM = {"perm-0:0"}


def clean() -> list[Hit]:
    hits, t = [], 0.0
    for seq in range(4):
        for conv, n in CONVS.items():
            if seq < n:
                t += 0.1
                hits.append(Hit(t, f"d-{conv}-{seq}", conv, seq, "ok"))
    hits.append(Hit(t + 0.1, "d-perm", "perm-0", 0, "perm"))
    return hits


def judge(hits: list[Hit], **kw: Any) -> list[str]:
    args: dict[str, Any] = {"permanent": PERM, "dead": PERM, "crash_faults": 0, "rate": (10, 1.0), "burst": 1}
    args.update(kw)
    rep = check(hits, CONVS, **args)
    print("\n".join(rep.lines()))
    return rep.failures


def test_a_clean_record_passes() -> None:
    assert judge(clean()) == []


def test_a_lost_envelope_fails() -> None:
    hits = [h for h in clean() if (h.conversation, h.seq) != ("a", 2)]
    [f] = judge(hits)
    assert f.startswith("lost: a never got [2]")


def test_a_failed_attempt_is_not_a_delivery() -> None:
    hits = [replace(h, answer="slow") if (h.conversation, h.seq) == ("b", 1) else h for h in clean()]
    assert judge(hits)[0].startswith("lost: b never got [1]")


def test_a_duplicate_beyond_the_crash_window_fails() -> None:
    hits = clean()
    again = replace(hits[0], at=hits[0].at + 0.01)  # the same delivery id, resent at once
    assert judge([*hits, again], crash_faults=1) == []  # one kill: one resend allowed
    [f] = judge([*hits, again], crash_faults=0)
    assert f.startswith("dup: 1 duplicates for 0")


def test_the_same_message_under_two_delivery_ids_fails() -> None:
    hits = clean()
    other = replace(hits[0], at=hits[0].at + 0.01, delivery="d-other")
    assert any(
        f.startswith("dup: a:0 came under 2 delivery ids") for f in judge([*hits, other], crash_faults=5)
    )


def test_a_reordered_conversation_fails() -> None:
    hits = clean()
    a1 = next(h for h in hits if (h.conversation, h.seq) == ("a", 1))
    a2 = next(h for h in hits if (h.conversation, h.seq) == ("a", 2))
    swapped = [replace(h, at=a2.at) if h is a1 else replace(h, at=a1.at) if h is a2 else h for h in hits]
    [f] = judge(swapped)
    assert f == "order: a: 1 after 2"


def test_a_resend_of_an_earlier_message_after_a_later_one_is_out_of_order() -> None:
    hits = clean()
    late = replace(hits[0], at=100.0)  # a:0 again, after a:3
    assert "order: a: 0 after 3" in judge([*hits, late], crash_faults=1)


def test_a_window_over_the_rate_fails() -> None:
    hits = [replace(h, at=h.at / 100) for h in clean()]  # all eight in 10 ms
    [f] = judge(hits, rate=(5, 1.0), burst=1)
    assert f.startswith("rate: 8 sends in 1.0 s (allowed 7)")


def test_a_dead_letter_that_was_not_a_permanent_failure_fails() -> None:
    [f] = judge(clean(), dead={*PERM, "a:1"})
    assert f.startswith("dead: dead letters ['a:1']")
    [f] = judge(clean(), dead=set())
    assert "permanent ones not dead: ['perm-0:0']" in f


def test_entries_left_pending_fail() -> None:
    [f] = judge(clean(), pending=2)
    assert f.startswith("pending: 2 entries")
