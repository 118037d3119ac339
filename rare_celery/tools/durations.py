"""Durations as operators type and read them: ``90s``, ``15m``, ``1h``, ``7d``, ``1d12h``.

>>> parse("1d12h"), parse("90s"), parse("1.5h"), parse("250ms")
(129600.0, 90.0, 5400.0, 0.25)
>>> offset(109800), offset(60), offset(0.3)
('+1d 06:30:00', '+00:01:00', '+00:00:00.300')
>>> short(109800), short(0.3), short(0)
('1d6h30m', '300ms', '0s')
"""

from __future__ import annotations

import math
import re

UNITS = {"w": 604_800.0, "d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[wdhms])")


def parse(text: str) -> float:
    """Seconds in ``text``: numbers with units w, d, h, m, s, ms, largest first, each at most once.

    Raises ``ValueError`` with a message that shows the accepted forms.
    """
    raw = text.strip().lower().replace(" ", "")
    parts = _PART.findall(raw)
    order = [list(UNITS).index(unit) for _, unit in parts]
    if not raw or "".join(n + u for n, u in parts) != raw or order != sorted(set(order)):
        hint = "add a unit: " + raw + "s" if re.fullmatch(r"\d+(\.\d+)?", raw) else "for example 90s, 15m, 1h, 7d, 1d12h"
        raise ValueError(f"not a duration: {text!r} ({hint})")
    return sum(float(number) * UNITS[unit] for number, unit in parts)


def offset(seconds: float) -> str:
    """A time after a start, ``+[Nd ]HH:MM:SS[.mmm]``: ``+1d 06:00:00``, ``+00:01:00``."""
    ms = round(seconds * 1000)
    days, ms = divmod(ms, 86_400_000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}" + (f".{ms:03d}" if ms else "")
    return f"+{days}d {text}" if days else f"+{text}"


def short(seconds: float) -> str:
    """A compact duration, the inverse of :func:`parse` for whole milliseconds: ``1d6h30m``, ``300ms``."""
    if not math.isfinite(seconds):
        return str(seconds)
    ms, out = round(seconds * 1000), []
    for unit in ("d", "h", "m", "s", "ms"):
        size = round(UNITS[unit] * 1000)
        count, ms = divmod(ms, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out) or "0s"
