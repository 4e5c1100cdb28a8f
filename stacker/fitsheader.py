"""A fast reader for the plain primary header of a FITS frame (the inventory's common case).

`astropy.io.fits.open` costs ~2 ms per file before a single value is read (configuration
look-ups, one `Card` object per card, HDU set-up). The inventory needs a dozen keyword values
from each of hundreds of files, so `read_primary_header` reads them itself, but only when the
result is certainly what astropy would give; for anything unusual it returns None and the
caller uses astropy. It never guesses: a card it does not fully understand, whose keyword
could matter, sends the file to astropy.

Values are read as astropy reads them (``Card._parse_value``): quoted strings with ``''`` for
a quote and trailing spaces stripped, ``T``/``F`` as bool, numbers through ``int()`` and
else ``float()`` (``D`` exponents as ``E``); the first card of a repeated keyword wins.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path

BLOCK = 2880
CARD = 80
#: Headers longer than this (in 2880-byte blocks) are left to astropy.
MAX_BLOCKS = 1000

_END_CARD = "END" + " " * 77
# Bytes allowed in a header (FITS standard: printable ASCII); anything else goes to astropy,
# which replaces it and warns.
_NOT_PRINTABLE = re.compile(rb"[^ -~]")
_KEYWORD_CHARS = re.compile(r"[A-Z0-9_-]*")
# A strict subset of astropy's free-format values: no blanks inside numbers, no complex values.
# What follows the value may only be blanks and an optional comment.
_REST = r" *(?:/.*)?$"
_STRING = re.compile(r"'((?:[^']|'')*)'" + _REST)
_LOGICAL = re.compile(r"([TF])" + _REST)
_NUMBER = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[EeDd][+-]?\d+)?)" + _REST)
_COMMENTARY = frozenset({"", "COMMENT", "HISTORY"})


class UnparsedError(Exception):
    """A value the fast reader does not read exactly as astropy would (internal signal)."""


class FastHeader:
    """Read-only values of the keywords a caller asked for, with the `Header` look-ups it uses.

    Supports ``header.get(key, default)``, ``key in header`` and ``header[key]`` as
    `astropy.io.fits.Header` does, for the keywords that were tracked (read or refused); any
    other keyword raises `LookupError`, so that code reading a new keyword cannot silently
    get "absent" from a header that never looked for it.
    """

    __slots__ = ("_tracked", "_values")

    def __init__(self, values: dict[str, object], tracked: Collection[str]) -> None:
        self._values = values
        self._tracked = tracked

    def _check(self, key: str) -> None:
        if key not in self._tracked:
            raise LookupError(f"keyword {key!r} is not read by the fast header reader")

    def get(self, key: str, default: object = None) -> object:
        """The value of `key`, or `default` when the header has no such card."""
        self._check(key)
        return self._values.get(key, default)

    def __contains__(self, key: str) -> bool:
        self._check(key)
        return key in self._values

    def __getitem__(self, key: str) -> object:
        self._check(key)
        return self._values[key]

    def __repr__(self) -> str:
        return f"FastHeader({self._values!r})"


def parse_value(text: str) -> object:
    """The value of a card from the text after its ``= `` (columns 11-80), as astropy reads it.

    Parameters
    ----------
    text : str
        The value and comment field of a card.

    Returns
    -------
    str, bool, int or float
        Strings are unescaped (``''`` -> ``'``) with trailing blanks kept (astropy strips
        them only when its ``strip_header_whitespace`` option is on; the caller decides).

    Raises
    ------
    UnparsedError
        For anything astropy may read differently: no value, complex numbers, blanks inside
        numbers, unterminated or odd strings, strings astropy would cut short or read as a
        record-valued keyword.
    """
    text = text.strip(" ")
    if text.startswith("'"):
        match = _STRING.match(text)
        if match is None:
            raise UnparsedError(text)
        raw = match.group(1)
        # astropy's string pattern is lazy: an escaped quote followed by a comment slash
        # can end the string early there, so such strings are left to it. ": " would make
        # the card a record-valued keyword (``DP1 = 'AXIS.1: 1'``) in astropy.
        if ("'" in raw and "/" in raw) or ": " in raw:
            raise UnparsedError(text)
        return raw.replace("''", "'")
    match = _LOGICAL.match(text)
    if match is not None:
        return match.group(1) == "T"
    match = _NUMBER.match(text)
    if match is None:
        raise UnparsedError(text)
    number = match.group(1).translate(str.maketrans("dD", "eE"))
    try:
        return int(number)
    except ValueError:
        return float(number)


def read_primary_header(
    path: Path, keywords: Collection[str], refuse: Collection[str] = ()
) -> tuple[FastHeader, int] | None:
    """Read the values of `keywords` from the primary header of `path`, if it is plain.

    Parameters
    ----------
    path : Path
        A file starting with ``SIMPLE  =                    T``, then BITPIX, NAXIS, NAXIS1
        and NAXIS2.
    keywords : collection of str
        Upper-case keywords whose values are wanted; each must read cleanly (first card
        of a repeated keyword only, as astropy).
    refuse : collection of str
        Keywords whose presence means the file is not the plain case (e.g. ``XTENSION``).

    Returns
    -------
    (FastHeader, int) or None
        The values and the header's length in bytes (the offset of the data, a multiple of
        2880), or None when astropy must read the file: not a plain primary 2-D header, a
        short or unreadable file, CONTINUE cards, a refused keyword, a wanted keyword in
        a HIERARCH card or a card astropy reads differently, a value that does not read
        cleanly, or more than `MAX_BLOCKS` blocks.
    """
    tracked = frozenset(keywords) | frozenset(refuse)
    values: dict[str, object] = {}
    try:
        with open(path, "rb") as fh:
            for nblock in range(1, MAX_BLOCKS + 1):
                block = fh.read(BLOCK)
                if len(block) != BLOCK or _NOT_PRINTABLE.search(block):
                    return None
                text = block.decode("ascii")
                if nblock == 1 and not _plain_start(text):
                    return None
                end = _read_cards(text, nblock == 1, keywords, refuse, tracked, values)
                if end is None:
                    return None
                if end:
                    return FastHeader(_strip_strings(values), tracked), nblock * BLOCK
    except (OSError, UnparsedError):
        return None
    return None


def _strip_strings(values: dict[str, object]) -> dict[str, object]:
    """Trailing blanks of strings stripped as astropy does with its default configuration."""
    padded = [k for k, v in values.items() if isinstance(v, str) and v.endswith(" ")]
    if padded:
        # Looked up only when it matters: importing astropy.io.fits costs ~0.2 s once.
        from astropy.io.fits import conf

        if conf.strip_header_whitespace:
            for key in padded:
                values[key] = values[key].rstrip(" ")  # type: ignore[union-attr]
    return values


#: The standard's mandatory order for a primary 2-D image (FITS 4.0, section 4.4.1.1).
_PLAIN_ORDER = ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2")


def _plain_start(block: str) -> bool:
    """True when the first block opens with ``SIMPLE = T`` and the structural cards of a
    2-D image in the standard's order (their values are the caller's to check)."""
    if not (block.startswith("SIMPLE  =                    T")
            and parse_value(block[10:CARD]) is True):
        return False
    keys = tuple(block[i : i + 8].rstrip(" ") for i in range(CARD, 5 * CARD, CARD))
    return keys == _PLAIN_ORDER


def _read_cards(
    text: str,
    first: bool,
    keywords: Collection[str],
    refuse: Collection[str],
    tracked: Collection[str],
    values: dict[str, object],
) -> bool | None:
    """Read the cards of one block into `values`: True at END, False without, None to refuse."""
    for pos in range(CARD if first else 0, BLOCK, CARD):
        card = text[pos : pos + CARD]
        if card.startswith("END") and card[3] not in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-":
            # astropy takes any such card as the end (warning when it is not blank); only a
            # standard END card followed by blank padding is read here.
            if card != _END_CARD or text[pos + CARD :].strip(" "):
                return None
            return True
        keyword = card[:8].strip(" ").upper()
        if keyword in _COMMENTARY:
            continue
        if keyword in ("CONTINUE", "END"):
            return None
        if keyword == "HIERARCH" and card[8] == " " and "=" in card:
            # astropy finds a HIERARCH card by the name after HIERARCH, also for short names.
            name = " ".join(card[9:].split("=", 1)[0].split()).upper()
            if name in tracked:
                return None
            continue
        indicator = card.find("= ")
        if indicator != 8:
            # astropy cuts the keyword at an early "= "; without one the card is invalid but
            # still found by its first 8 characters.
            if 0 <= indicator < 8 or _KEYWORD_CHARS.match(keyword).group() in tracked:
                return None
            continue
        if keyword in refuse:
            return None
        if keyword in keywords and keyword not in values:
            values[keyword] = parse_value(card[10:])
    return False
