"""Reading JSON a user or another tool wrote: every way hostile JSON breaks ``json.loads`` (or what comes
after it) is a ``ValueError`` with a one-line message, never a ``RecursionError`` or a crash downstream.

``json.loads`` accepts values nested 100,000 deep (RecursionError), integers longer than Python's int
parser takes (ValueError, not JSONDecodeError), and escapes of lone surrogates (``"\\ud800"``), which
parse into a ``str`` that cannot be encoded as UTF-8: printing, hashing or writing it fails later,
far from the file that held it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

# an escaped surrogate: a pair (an emoji written as two escapes) parses into one valid character, so only a
# match of this is worth the walk that finds a lone one
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BadJson(ValueError):
    """JSON that cannot be used; ``key`` is where in the value the problem is (None: the document)."""

    def __init__(self, problem: str, key: Optional[str] = None, lineno: Optional[int] = None):
        self.problem, self.key, self.lineno = problem, key, lineno
        super().__init__(problem)


def _refuse_constant(token: str) -> Any:
    raise BadJson(f"{token} is not JSON (a number must be finite; leave the field out, or null, when it has no value)")


def loads(text: str, allow_nan: bool = True) -> Any:
    """``json.loads``, raising ``BadJson`` for malformed, too deeply nested or too long values and for strings
    holding a lone surrogate; with ``allow_nan=False`` also for the non-JSON tokens ``NaN``, ``Infinity`` and
    ``-Infinity`` that Python's ``json`` reads and writes (data rows: they would be stored as non-JSON)."""
    try:
        value = json.loads(text) if allow_nan else json.loads(text, parse_constant=_refuse_constant)
    except BadJson:
        raise
    except json.JSONDecodeError as err:
        raise BadJson(f"malformed JSON: {err.msg} at column {err.colno}", lineno=err.lineno) from None
    except RecursionError:
        raise BadJson("malformed JSON: nested too deeply") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise BadJson(f"malformed JSON: {str(err).split(':')[0].split(';')[0]}") from None
    if _SURROGATE_ESCAPE.search(text):
        key = lone_surrogate(value)
        if key is not None:
            raise BadJson("holds a lone surrogate escape (like \\ud800): not valid Unicode text", key=key or None)
    return value


def lone_surrogate(value: Any) -> Optional[str]:
    """The dotted key of the first string (key or value) that is not encodable as UTF-8; "" for the value
    itself; None when every string is fine. Iterative: the value may be nested as deep as ``json`` allows."""
    stack = [("", value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, str):
            if not _encodable(node):
                return where
        elif isinstance(node, dict):
            for key, child in node.items():
                inner = f"{where}.{key}" if where else str(key)
                if not _encodable(str(key)):  # named escaped: the message itself must stay printable
                    escaped = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
                    return f"{where}.{escaped}" if where else escaped
                stack.append((inner, child))
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", child) for i, child in enumerate(node))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# the most a JSON file named by a user (or found in a folder a user gave) may hold: far past any metadata file
MAX_JSON_FILE_BYTES = 64 * 1024 * 1024


def load_file(path, error: type, expect: Optional[type] = None, allow_nan: bool = True,
              limit: int = MAX_JSON_FILE_BYTES) -> Any:
    """The one guarded reader of a JSON file: bounded (a FIFO or ``/dev/zero`` is read no further than
    ``limit``), UTF-8, :func:`loads`, and of type ``expect`` when given; every failure is ``error(path, key,
    problem)`` (a ``VerifilyError`` subclass), one line naming the file and the key."""
    import os

    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise error(path, None, f"cannot read: {err.strerror or err}") from None
    if len(data) > limit:
        raise error(path, None, f"longer than {limit // 2 ** 20} MiB, the most a JSON file here may hold")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(path, None, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        value = loads(text, allow_nan=allow_nan)
    except BadJson as err:
        raise error(path, err.key, err.problem if err.lineno is None else f"{err.problem} (line {err.lineno})") from None
    if expect is not None and not isinstance(value, expect):
        raise error(path, None, f"must be a JSON {_JSON_NAMES.get(expect, expect.__name__)}, "
                                f"got {_JSON_NAMES.get(type(value), type(value).__name__)}")
    return value


_JSON_NAMES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "boolean",
               type(None): "null"}
