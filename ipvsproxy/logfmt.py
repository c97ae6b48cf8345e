"""Log lines that untrusted text cannot forge.

Service names, port names, annotations and the messages built from them
reach the log verbatim; the API server validates names, but `--from-file`
does not, so a name holding a newline could write a line of its own that
looks like the agent's ("... ERROR ipvsproxy: ..."). Every log message is
escaped once, where it is formatted: control characters (newlines, carriage
returns, escape sequences, Unicode line separators) become their Python
escapes, so one record is always one line and each line's prefix is ours.
Tracebacks (--debug) keep their lines.
"""

from __future__ import annotations

import logging
import re

__all__ = ["EscapingFormatter", "escape"]

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(m: re.Match[str]) -> str:
    return repr(m.group())[1:-1]


def escape(text: str) -> str:
    """'a\\nb' -> 'a\\\\nb': control characters as escapes, the rest as is."""
    return _CONTROL.sub(_escaped, text)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose message part is escaped (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = escape(record.getMessage()), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = msg, args
