"""Text from messages, made safe to show a person: no control characters reach a terminal.

A bug-queue message comes from any producer: its task name, id, error or traceback may carry
terminal escape sequences (colour, cursor moves, a changed window title) or bidirectional overrides
that make text read differently from what it is. :func:`terminal` shows each such character as a
visible escape (``\\x1b``, ``\\u202e``) instead; ordinary text, including non-ASCII letters, is kept.

>>> terminal("ok\\x1b]0;pwned\\x07 \\u202eevil")
'ok\\\\x1b]0;pwned\\\\x07 \\\\u202eevil'
>>> terminal("Zürich")
'Zürich'
"""

from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls and DEL; format characters (bidi overrides, zero-width); line and paragraph separators
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]|[^\x00-\x7f]")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch > "\x9f" and unicodedata.category(ch) not in ("Cf", "Cc", "Zl", "Zp", "Co", "Cs", "Cn"):
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal(text: object) -> str:
    """``text`` as one safe line fragment: control and format characters shown as escapes."""
    return _UNSAFE.sub(_escape, text if isinstance(text, str) else str(text))


def count(n: int, word: str) -> str:
    """``1 message``, ``1,200 messages``."""
    return f"{n:,} {word if n == 1 else word + 's'}"
