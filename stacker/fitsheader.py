"""FITS header cards without astropy: a fast reader for the plain primary header of a frame
(the inventory's common case), and the writer of the headers of a master.

`astropy.io.fits.open` costs ~2 ms per file before a single value is read (configuration
look-ups, one `Card` object per card, HDU set-up). The inventory needs a dozen keyword values
from each of hundreds of files, so `read_primary_header` reads them itself, but only when the
result is certainly what astropy would give; for anything unusual it returns None and the
caller uses astropy. It never guesses: a card it does not fully understand, whose keyword
could matter, sends the file to astropy.

Values are read as astropy reads them (``Card._parse_value``, default configuration): quoted
strings with ``''`` for a quote and trailing spaces stripped, ``T``/``F`` as bool, numbers
through ``int()`` and else ``float()`` (``D`` exponents as ``E``); the first card of a
repeated keyword wins.

`HeaderCards` and `format_card` write a master's header with the bytes astropy 8 writes for
the same cards (``Card.image``: fixed-format values, ``CONTINUE`` long strings, long
``HISTORY`` split at 72 characters); the tests hold them to astropy byte for byte. Importing
``astropy.io.fits`` only to format a few dozen cards cost every run ~0.2-0.35 s.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection, Iterator
from functools import partial
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
#: Cards whose value is free text after the keyword (no ``= ``, no comment).
COMMENTARY = ("HISTORY", "COMMENT")
_COMMENTARY = frozenset({"", *COMMENTARY})  # and blank-keyword cards, read as commentary


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
            nblocks = _read_header(fh, _plain_start, keywords, refuse, tracked, values)
    except (OSError, UnparsedError):
        return None
    if nblocks is None:
        return None
    return FastHeader(_strip_strings(values), tracked), nblocks * BLOCK


def _read_header(fh, opens, keywords, refuse, tracked, values) -> int | None:
    """Read one header from `fh`'s position into `values`: its length in blocks, or None
    when astropy must read it (`opens(first_block)` false, a refused card, no END within
    `MAX_BLOCKS`, a short file or bytes that are not printable ASCII)."""
    for nblock in range(1, MAX_BLOCKS + 1):
        block = fh.read(BLOCK)
        if len(block) != BLOCK or _NOT_PRINTABLE.search(block):
            return None
        text = block.decode("ascii")
        if nblock == 1 and not opens(text):
            return None
        end = _read_cards(text, nblock == 1, keywords, refuse, tracked, values)
        if end is None:
            return None
        if end:
            return nblock
    return None


#: Keywords that size an HDU's data (FITS 4.0, section 4.4.1); at most 9 axes are read here.
_SIZE_KEYWORDS = ("BITPIX", "NAXIS", "PCOUNT", "GCOUNT", *(f"NAXIS{i}" for i in range(1, 10)))


def read_hdus(
    path: Path, keywords: Collection[str], refuse: Collection[str] = ("GROUPS",)
) -> list[tuple[FastHeader, int]] | None:
    """Read `keywords` from every HDU header of `path`, and where each HDU's data starts.

    Parameters
    ----------
    path : Path
        A FITS file whose primary header starts with ``SIMPLE = T``.
    keywords : collection of str
        Upper-case keywords whose values are wanted from each header (``BITPIX``,
        ``NAXIS``, ``NAXISn``, ``PCOUNT`` and ``GCOUNT`` are always read).
    refuse : collection of str
        Keywords whose presence sends the file to astropy (random groups by default,
        whose data are sized differently).

    Returns
    -------
    list of (FastHeader, int) or None
        Per HDU in file order, its values (strings without trailing blanks) and the byte
        offset of its data; None when
        astropy must read the file: a header `read_primary_header` would refuse, an
        extension not starting with ``XTENSION``, more than 9 axes, structural values
        that are not non-negative integers, or a file that does not end at the end of
        an HDU's padded data.
    """
    wanted = frozenset(keywords) | frozenset(_SIZE_KEYWORDS) | {"XTENSION"}
    tracked = wanted | frozenset(refuse)
    hdus: list[tuple[FastHeader, int]] = []
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            start = 0
            while start < size:
                values: dict[str, object] = {}
                opens = partial(_hdu_start, primary=not hdus, values=values)
                nblocks = _read_header(fh, opens, wanted, refuse, tracked, values)
                if nblocks is None:
                    return None
                header = FastHeader(_strip_strings(values), tracked)
                data = start + nblocks * BLOCK
                span = _data_bytes(header)
                if span is None:
                    return None
                hdus.append((header, data))
                start = data + -(-span // BLOCK) * BLOCK
                fh.seek(start)
            if start != size:
                return None
    except (OSError, UnparsedError):
        return None
    return hdus


def _hdu_start(block: str, primary: bool, values: dict[str, object]) -> bool:
    """True when a header opens with ``SIMPLE = T`` (primary) or an ``XTENSION`` string
    (extension); that first card's value goes into `values`."""
    try:
        if primary:
            if (block.startswith("SIMPLE  =                    T")
                    and parse_value(block[10:CARD]) is True):
                values["SIMPLE"] = True
                return True
        elif block.startswith("XTENSION= "):
            value = parse_value(block[10:CARD])
            if isinstance(value, str):
                values["XTENSION"] = value
                return True
    except UnparsedError:
        pass
    return False


def _data_bytes(header: FastHeader) -> int | None:
    """Bytes of an HDU's data: |BITPIX|/8 x GCOUNT x (PCOUNT + NAXIS1 x ... x NAXISn)."""
    bitpix, naxis = header.get("BITPIX"), header.get("NAXIS")
    pcount, gcount = header.get("PCOUNT", 0), header.get("GCOUNT", 1)
    if (bitpix not in (8, 16, 32, 64, -32, -64) or type(naxis) is not int
            or not 0 <= naxis <= 9 or type(pcount) is not int or type(gcount) is not int
            or pcount < 0 or gcount < 0):
        return None
    if naxis == 0:
        return 0
    count = 1
    for i in range(1, naxis + 1):
        n = header.get(f"NAXIS{i}")
        if type(n) is not int or n < 0:
            return None
        count *= n
    return abs(bitpix) // 8 * gcount * (pcount + count)


def _strip_strings(values: dict[str, object]) -> dict[str, object]:
    """Trailing blanks of strings stripped, as astropy does with its default configuration.

    Trailing blanks are not significant in FITS strings (FITS 4.0, 4.2.1.1); stacker strips
    every text value it uses, so a user's ``strip_header_whitespace = False`` changes
    nothing and need not be looked up (importing astropy for it cost ~0.2 s per run).
    """
    return {k: v.rstrip(" ") if isinstance(v, str) else v for k, v in values.items()}


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


# --------------------------------------------------------------------------------------------
# Writing


#: Text of a commentary card: 80 columns less the 8 of the keyword.
_COMMENTARY_WIDTH = CARD - 8
_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")


class HeaderCards:
    """The cards of a header being written, in order, as ``(keyword, value, comment)``.

    Behaves as the parts of `astropy.io.fits.Header` a master's header uses: ``h[key] =
    (value, comment)`` or ``h[key] = value`` sets a card in place (keeping its comment) or
    adds it before the trailing ``HISTORY``/``COMMENT`` cards (as astropy's ``append``
    does), and `add_history` appends a ``HISTORY`` card. Values are str, bool, int or
    finite float; they are checked when the header is formatted (`to_string`).
    """

    __slots__ = ("_cards",)

    def __init__(self) -> None:
        self._cards: list[list] = []

    def __setitem__(self, keyword: str, item: object) -> None:
        value, comment = item if isinstance(item, tuple) else (item, None)
        for card in self._cards:
            if card[0] == keyword:
                card[1] = value
                if comment is not None:
                    card[2] = comment
                return
        at = len(self._cards)
        while at and self._cards[at - 1][0] in COMMENTARY:
            at -= 1
        self._cards.insert(at, [keyword, value, comment or ""])

    def __getitem__(self, keyword: str) -> object:
        for key, value, _ in self._cards:
            if key == keyword:
                return value
        raise KeyError(keyword)

    def __contains__(self, keyword: str) -> bool:
        return any(card[0] == keyword for card in self._cards)

    def __iter__(self) -> Iterator[tuple[str, object, str]]:
        return (tuple(card) for card in self._cards)  # type: ignore[misc]

    def add_history(self, text: str) -> None:
        """Append a ``HISTORY`` card (split over several when longer than 72 characters)."""
        self._cards.append(["HISTORY", text, ""])

    def to_string(self) -> str:
        """The cards' images followed by ``END``, padded with blanks to whole 2880-byte
        records (``Header.tostring()``)."""
        return end_header("".join(format_card(*card) for card in self._cards))


def end_header(images: str) -> str:
    """Card images followed by ``END``, padded with blanks to whole 2880-byte records."""
    text = images + _END_CARD
    return text + " " * (-len(text) % BLOCK)


def format_card(keyword: str, value: object, comment: str = "") -> str:
    """The image of one card as astropy writes it: 80 characters, or a multiple of 80 for
    a string continued on ``CONTINUE`` cards or a long ``HISTORY``/``COMMENT`` text.

    A comment that does not fit beside its value is cut at column 80, as astropy does (with
    a warning there).

    Raises
    ------
    ValueError
        For a keyword that is not 1-8 characters of ``A-Z0-9_-``, text that is not
        printable ASCII, a NaN or infinite number, or a value of another type.
    """
    if not _KEYWORD.fullmatch(keyword):
        raise ValueError(f"header keyword {keyword!r} is not 1-8 characters of A-Z, 0-9, _ "
                         "and -")
    for text in (value, comment) if isinstance(value, str) else (comment,):
        if not (text.isascii() and text.isprintable()):
            raise ValueError(f"header card {keyword}: {text!r} is not printable ASCII")
    head = f"{keyword:8}"
    if keyword in COMMENTARY:
        text = str(value)
        pieces = [text[i : i + _COMMENTARY_WIDTH]
                  for i in range(0, len(text), _COMMENTARY_WIDTH)] or [""]
        return "".join(f"{head}{piece:{_COMMENTARY_WIDTH}}" for piece in pieces)
    field = _format_value(keyword, value)
    # A blank comment is no comment (astropy tests the comment with trailing blanks cut).
    image = f"{head}= {field}" + (f" / {comment}" if comment.rstrip(" ") else "")
    if len(image) <= CARD:
        return f"{image:{CARD}}"
    if isinstance(value, str) and len(field) > CARD - 10:
        return _long_string(head, value, comment)
    return image[:CARD]


def _format_value(keyword: str, value: object) -> str:
    """astropy's ``_format_value`` for the types a master's header holds."""
    if isinstance(value, str):
        if not value:
            return "''"
        escaped = value.replace("'", "''")
        quoted = f"'{escaped:8}'"
        return f"{quoted:20}"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return f"{'T' if value else 'F':>20}"
    if isinstance(value, numbers.Integral):
        return f"{int(value):>20d}"
    if isinstance(value, numbers.Real):
        if not math.isfinite(value):
            raise ValueError(f"header card {keyword}: {value} cannot be written (FITS header "
                             "values are finite numbers)")
        text = str(value).replace("e", "E")
        if len(text) > 20:
            # At most 20 characters: decimals, or the mantissa of an exponent, are cut.
            e = text.find("E")
            text = text[:20] if e < 0 else text[: 20 - (len(text) - e)] + text[e:]
        return f"{text:>20}"
    raise ValueError(f"header card {keyword}: cannot write a {type(value).__name__} value "
                     f"({value!r})")


def _long_string(head: str, value: str, comment: str) -> str:
    """A string value over ``CONTINUE`` cards (astropy's ``_format_long_image``)."""
    words = _words_group(value.replace("'", "''"), 67)
    out = []
    for i, word in enumerate(words):
        start = f"{head}= " if i == 0 else "CONTINUE  "
        amp = "" if not comment.rstrip(" ") and i == len(words) - 1 else "&"
        out.append(f"{start}'{word}{amp}'".ljust(CARD))
    if comment.rstrip(" "):
        words = _words_group(comment, 64)
        for i, word in enumerate(words):
            start = "CONTINUE  '' / " if i == len(words) - 1 else "CONTINUE  '&' / "
            out.append(f"{start}{word}".ljust(CARD))
    return "".join(out)


def _words_group(text: str, width: int) -> list[str]:
    """Pieces of at most `width` characters, broken after a blank where one allows
    (astropy's ``_words_group``; a word longer than `width` is cut)."""
    blanks = [i for i, ch in enumerate(text + " ") if ch == " "]
    pieces: list[str] = []
    start = 0
    while True:
        # The last blank before position start + width ends the piece (just after it).
        fit = [b for b in blanks if b < start + width]
        end = fit[-1] + 1 if fit else -1
        if end <= start:
            end = min(start + width, len(text))
        pieces.append(text[start:end])
        if end >= len(text):
            return pieces
        start = end
