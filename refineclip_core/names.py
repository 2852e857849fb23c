"""Names from users, shown safely: one function for every place a name is displayed.

File and folder names on Linux are bytes; Python decodes the ones that are not UTF-8 with
*surrogate escapes* (``b"cat_\\xff"`` becomes ``"cat_\\udcff"``), which no UTF-8 writer accepts
(Streamlit's messages, a JSON file opened as UTF-8, the tokenizer). Names can also hold characters
that change how *other* text looks: terminal escapes (``\\x1b]0;title\\x07``), right-to-left
overrides that reverse what follows, zero-width characters that make two different names look
identical.

* :func:`visible` is what a person is shown, in the dashboard (``dashboard.widgets.plain`` and the
  tables) and on the terminal (``refineclip_core.cli.common.emit`` and the error line): each
  undecodable byte becomes ``⟨xFF⟩``, and each control, format (bidi, zero-width), line/paragraph
  separator or surrogate character becomes ``⟨U+202E⟩``; everything else is kept as written.
* :func:`decodable` is for names that become *data* (class names from folder names): only the
  undecodable bytes are replaced (marked the same way), so the name can be encoded, written and
  tokenised; the characters a user chose stay as they are. It is the one function names from the
  file system go through where they are read (``loading/data.py``: class folders, ``metadata.csv``
  labels, groups and splits, skipped files; ``ImageRecord.name`` for an image's path) and where
  text is written (the one JSON converter ``reporting.findings.json_safe``, the one CSV writer
  ``reporting.tables.csv_text``). Only ``ImageRecord.path`` keeps the real name, to open the file
  (``os.fsencode(path)`` gives its bytes back; the dashboard's thumbnails are keyed by those bytes).
"""

from __future__ import annotations

import re
import unicodedata

#: Lone surrogates: undecodable bytes (U+DC80..U+DCFF, ``surrogateescape``) and any other.
_SURROGATES = re.compile(r"[\ud800-\udfff]")
#: Unicode categories shown as code points: controls, formats (bidi marks and overrides,
#: zero-width spaces and joiners, soft hyphen, BOM), line and paragraph separators, surrogates.
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def _byte(m: re.Match) -> str:
    code = ord(m.group())
    return f"⟨x{code - 0xDC00:02X}⟩" if 0xDC80 <= code <= 0xDCFF else f"⟨U+{code:04X}⟩"


def decodable(text: object) -> str:
    """``text`` with each undecodable byte (a surrogate escape) replaced by a visible ``⟨xFF⟩``
    marker, so that it can be encoded as UTF-8; all other characters unchanged."""
    return _SURROGATES.sub(_byte, str(text))


def visible(text: object) -> str:
    """``text`` as it may be shown to a person: undecodable bytes as ``⟨xFF⟩``; control, bidi,
    zero-width and other invisible format characters (and line breaks) as ``⟨U+XXXX⟩``."""
    text = decodable(text)
    if text.isprintable() and text.isascii():  # the common case, quickly
        return text
    return "".join(f"⟨U+{ord(ch):04X}⟩" if unicodedata.category(ch) in _HIDDEN else ch for ch in text)
