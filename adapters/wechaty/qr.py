"""The login QR code as text a terminal shows and a phone scans (segno builds the matrix).

Two modules a character (upper and lower half blocks), dark modules drawn as spaces on a light
background, so it scans on dark and light terminals alike.
"""

from __future__ import annotations

import segno


def terminal_qr(data: str, border: int = 2) -> str:
    """``data`` as a QR code in Unicode half blocks, one string of lines."""
    qr = segno.make(data, error="l", micro=False)
    rows = [[bool(m) for m in row] for row in qr.matrix_iter(scale=1, border=border)]
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))
    lines = []
    for top, bottom in zip(rows[::2], rows[1::2], strict=True):
        # light module = block drawn; dark module = blank
        lines.append(
            "".join(
                {(False, False): "█", (False, True): "▀", (True, False): "▄", (True, True): " "}[(t, b)]
                for t, b in zip(top, bottom, strict=True)
            )
        )
    return "\n".join(lines)
