"""Text from the log made safe to show: any client may write a reason, a detail or a label."""

from __future__ import annotations


def printable(line: str) -> str:
    """`line` with what is not printable escaped (`\\n`, `\\x1b`, `\\u202e`: control, format and separator
    characters): a newline in a stored reason would forge a line of a table or a chain, an escape sequence reach
    the terminal, a right-to-left override reorder what it shows."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line)
