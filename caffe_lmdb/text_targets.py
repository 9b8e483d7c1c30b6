"""Text targets (OCR labels) beside a Datum LMDB: `<out>_texts.txt`, one escaped line per record.

A Datum's `label` is an int32, so a text target has no field of its own. `migrate` writes each
record's text to `<out>_texts.txt` (line i is record i's text, records in key order, the order of
`<out>_keys.npy`), UTF-8, and stores label 0; `export` of such a layout writes `OUT_DIR/texts.txt`
by the same rule, line i for line i of its list file. Nothing is dropped and every line is one
record, so a text may hold any character:

* a backslash is written `\\\\`; a newline `\\n`, a carriage return `\\r`, a tab `\\t`;
* the other characters Python's `str.splitlines` ends a line at (`\\x0b`, `\\x0c`, `\\x1c`, `\\x1d`,
  `\\x1e`, `\\x85`, `\\u2028`, `\\u2029`) as those escapes;
* everything else as it is.

`unescape_text` undoes it; `read_texts` gives the texts of an LMDB.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from .errors import LmdbFormatError
from .files import sidecar_path

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
            **{char: f"\\x{ord(char):02x}" for char in "\x0b\x0c\x1c\x1d\x1e\x85"},
            **{char: f"\\u{ord(char):04x}" for char in "\u2028\u2029"}}
_TO_ESCAPE = re.compile("[" + re.escape("".join(_ESCAPES)) + "]")
_ESCAPED = re.compile(r"\\(\\|n|r|t|x[0-9a-f]{2}|u[0-9a-f]{4})")
_SIMPLE = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def escape_text(text: str) -> str:
    """`text` as one line of a texts file (the rule in the module docstring)."""
    return _TO_ESCAPE.sub(lambda match: _ESCAPES[match.group()], text)


def unescape_text(line: str) -> str:
    """The text a texts-file line holds (`escape_text` undone)."""
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return _SIMPLE[code] if code in _SIMPLE else chr(int(code[1:], 16))
    return _ESCAPED.sub(one, line)


def texts_file_bytes(texts: Sequence[str]) -> bytes:
    """The contents of a texts file: each text escaped, one line each, UTF-8."""
    return "".join(f"{escape_text(text)}\n" for text in texts).encode("utf-8")


def read_texts(lmdb_path: str | os.PathLike) -> list[str] | None:
    """The text targets `migrate` wrote beside an LMDB (`<stem>_texts.txt`), record i's at i; None if absent.

    Raises:
        LmdbFormatError: the file is not UTF-8.
    """
    path = sidecar_path(lmdb_path, "texts.txt")
    if not path.is_file():
        return None
    try:
        data = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmdbFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [unescape_text(line) for line in data.split("\n")[:-1]]
