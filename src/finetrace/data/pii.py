"""Personal data detection and redaction, with a registry of detectors a user can extend.

Built-in detectors (regular expressions, each confirmed by a checksum or parser where one exists):

    email        local@domain.tld
    phone        +CC … (8-15 digits) or North-American (555) 123-4567 / 555-123-4567
    credit_card  13-19 digits, spaces/dashes allowed, Luhn checksum must hold
    iban         CC00 + 11-30 alphanumerics, ISO 13616 mod-97 must equal 1
    us_ssn       AAA-GG-SSSS without the never-issued 000/666/9xx areas, 00 groups, 0000 serials
    ip_address   IPv4 dotted quads and IPv6 (validated by ``ipaddress``)

A detector is anything with a ``name`` and ``find(text) -> list[Span]`` (a one-method Protocol);
``register_detector`` adds one (``PresidioDetector`` wraps Microsoft Presidio when it is installed).
``scan(text, detectors)`` returns non-overlapping spans (earlier detectors win), ``redact`` replaces each
with ``[TYPE]``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Protocol

from ..errors import DependencyError, InputError
from . import compiled as _compiled

PII_MODES = ("redact", "flag", "fail")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    type: str


class Detector(Protocol):
    name: str

    def find(self, text: str) -> list[Span]: ...


class RegexDetector:
    """A regular expression whose matches are kept when ``check(match_text)`` is true."""

    def __init__(self, name: str, pattern: str, check=None, flags: int = 0, precheck=None):
        self.name = name
        self.regex = re.compile(pattern, flags)
        self.check = check
        self.precheck = precheck  # cheap test on the whole text before running the regex

    def find(self, text: str) -> list[Span]:
        if self.precheck and not self.precheck(text):
            return []
        out = []
        for m in self.regex.finditer(text):
            if self.check is None or self.check(m.group(0)):
                out.append(Span(m.start(), m.end(), self.name))
        return out

    def find_in(self, text: str, windows) -> list[Span]:
        """``find(text)``, searching only ``windows`` ([(start, endpos)], from ``windows``): the same
        spans when every match lies in a window and each endpos leaves one character of context."""
        if self.precheck and not self.precheck(text):
            return []
        out = []
        for a, b in windows:
            for m in self.regex.finditer(text, a, b):
                if self.check is None or self.check(m.group(0)):
                    out.append(Span(m.start(), m.end(), self.name))
        return out


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    try:
        return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1
    except ValueError:
        return False


def ipv6_ok(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def phone_ok(text: str) -> bool:
    return 8 <= sum(c.isdigit() for c in text) <= 15


@functools.lru_cache(maxsize=16)  # several detectors ask about the same text in a row
def digit_count(text: str) -> int:
    """Number of ASCII digits (bytes.translate deletes them at C speed; far cheaper than a regex scan)."""
    data = text.encode("utf-8", "surrogatepass")
    return len(data) - len(data.translate(None, b"0123456789"))


def _min_digits(n: int, dots: int = 0):
    """Cheap gate: a number-shaped detector needs at least ``n`` digits (and ``dots`` dots)."""
    return lambda t: digit_count(t) >= n and (not dots or t.count(".") >= dots)


_IBAN_START = re.compile(r"[A-Z]{2}\d\d")


BUILTIN = [
    RegexDetector(
        "email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", precheck=lambda t: "@" in t
    ),
    RegexDetector("credit_card", r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])", luhn_ok, precheck=_min_digits(13)),
    RegexDetector(
        "iban",
        r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
        iban_ok,
        precheck=lambda t: digit_count(t) >= 6 and _IBAN_START.search(t) is not None,
    ),
    RegexDetector(
        "us_ssn", r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])", precheck=_min_digits(9)
    ),
    RegexDetector(
        "ip_address",
        r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
        r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])",
        precheck=_min_digits(4, dots=3),
    ),
    RegexDetector(
        "ip_address",
        r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])",
        ipv6_ok,
        precheck=lambda t: "::" in t or t.count(":") >= 3,
    ),
    RegexDetector(
        "phone",
        r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
        r"|(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4})(?![\w])",
        phone_ok,
        precheck=_min_digits(8),
    ),
]

DETECTORS: dict[str, Detector] = {}


def register_detector(detector: Detector, key: str | None = None) -> None:
    """Add (or replace) a detector under ``key`` (default its name); built-ins are registered alike."""
    DETECTORS[key or detector.name] = detector


for _key, _d in zip(("email", "credit_card", "iban", "us_ssn", "ipv4", "ipv6", "phone"), BUILTIN):
    register_detector(_d, _key)


def _gates(data, offs) -> list:
    """Per built-in detector (same order as BUILTIN), a bool (n,) superset of the rows its precheck passes.

    From the positions of the few bytes that matter (digits, '@', ':', '.'): one comparison pass over
    the bytes each, then work on those positions only (an IBAN start is two capitals before two digits)."""
    import numpy as np

    n = len(offs) - 1

    def where(mask):
        return np.flatnonzero(mask)

    def count(pos):
        return np.bincount(np.searchsorted(offs, pos, side="right") - 1, minlength=n)

    def rows(pos):
        out = np.zeros(n, bool)
        out[np.searchsorted(offs, pos, side="right") - 1] = True
        return out

    dpos = where(np.subtract(data, 48, dtype=np.uint8) < 10)
    digits = count(dpos)
    pair = dpos[1:][np.diff(dpos) == 1]  # the second digit of two in a row
    pair = pair[pair >= 3]
    up = data[pair - 2] - np.uint8(65) < 26
    up &= data[pair - 3] - np.uint8(65) < 26
    iban = rows(pair[up] - 3)
    cpos = where(data == 58)
    ipv6 = (count(cpos) >= 3) | rows(cpos[:-1][np.diff(cpos) == 1])  # the row of the first of "::"
    return [
        rows(where(data == 64)),
        digits >= 13,
        (digits >= 6) & iban,
        digits >= 9,
        (digits >= 4) & (count(where(data == 46)) >= 3),
        ipv6,
        digits >= 8,
    ]


def _table(chars: str):
    """bool (256,): the bytes of ``chars``."""
    import numpy as np

    t = np.zeros(256, bool)
    t[list(chars.encode())] = True
    return t


_DIGITS = "0123456789"
_HEX = _DIGITS + "abcdefABCDEF"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# per built-in detector (BUILTIN order), on ASCII text: the characters any of its matches consists of,
# the ones it counts, and the fewest of those an accepted match holds. Every match lies inside one run
# of such characters; its lookarounds see at most one character beyond the match.
_RUNS = [
    (_UPPER + _UPPER.lower() + _DIGITS + "._%+-@", "@", 1),  # email
    (_DIGITS + " -", _DIGITS, 13),  # credit_card
    (_UPPER + _DIGITS + " ", _DIGITS, 2),  # iban
    (_DIGITS + "-", _DIGITS, 9),  # us_ssn
    (_DIGITS + ".", _DIGITS, 4),  # ipv4
    (_HEX + ":", ":", 2),  # ipv6
    (_DIGITS + " .()+-", _DIGITS, 8),
]  # phone
_RUN_TABLES: list = []


def windows(arr, dets: list[Detector], need: list | None = None, compiled: bool = False) -> tuple | None:
    """Where each detector's matches can be, in the ASCII rows of an Arrow string array (no nulls):
    ``(ascii, per detector [(row, start, endpos)] arrays)``, char offsets within each row; ``endpos``
    keeps one character after the run, so a lookahead or ``\\b`` sees what it sees in the whole text,
    and a lookbehind sees the real text before ``start`` (``Pattern.finditer(text, start, endpos)``).
    Runs too short of the characters an accepted match needs are left out. None when a detector is not
    a built-in one (it has to read whole texts). ``need`` (per detector, a bool): detectors marked
    False get no windows (no row of ``arr`` passes their gate), which saves their passes over the bytes.
    ``compiled``: each detector's runs from one numba pass (``compiled.pii_runs``), when installed."""
    import numpy as np

    from .arrowtext import rows_with, str_buffers

    ids = [id(d) for d in BUILTIN]
    if any(id(d) not in ids for d in dets):
        return None
    if not _RUN_TABLES:
        _RUN_TABLES.extend((_table(c), _table(k), n) for c, k, n in _RUNS)
    data, offs = str_buffers(arr)
    ascii_ = ~rows_with(data >= 0x80, offs)
    row_start = np.zeros(len(data) + 1, bool)
    row_start[offs] = True
    out = []
    none = np.zeros(0, np.int64)
    for k, d in enumerate(dets):
        if need is not None and not need[k]:
            out.append((none, none, none))
            continue
        cls, counted, least = _RUN_TABLES[ids.index(id(d))]
        if compiled and _compiled.available():
            out.append(_compiled.pii_runs(data, offs, cls, counted, least))
            continue
        f = cls[data]
        prev = np.empty_like(f)
        prev[:1] = False
        prev[1:] = f[:-1]
        starts = np.flatnonzero(f & (~prev | row_start[:-1]))
        nxt = np.empty_like(f)
        nxt[-1:] = False
        nxt[:-1] = f[1:]
        ends = np.flatnonzero(f & (~nxt | row_start[1:])) + 1
        cpos = np.flatnonzero(counted[data])  # counted characters inside a run [start, end)
        ok = np.searchsorted(cpos, ends) - np.searchsorted(cpos, starts) >= least
        starts, ends = starts[ok], ends[ok]
        row = np.searchsorted(offs, starts, side="right") - 1
        base = offs[row]
        out.append((row, starts - base, np.minimum(ends + 1, offs[row + 1]) - base))
    return ascii_, out


def gates(arr, dets: list[Detector], compiled: bool = False) -> list:
    """Per detector, bool (n,): rows of an Arrow string array its precheck might accept (a superset);
    only those rows need that detector's ``find``, and the others have no match by construction. A
    detector other than the built-ins (Presidio, a plug-in) has no vectorised gate: every row passes.
    ``compiled``: the same gates from one numba pass over the bytes (``compiled.pii_gates``), when
    numba is installed."""
    import numpy as np

    from .arrowtext import str_buffers

    ids = [id(d) for d in BUILTIN]
    if any(id(d) not in ids for d in dets):
        return [np.ones(len(arr), bool) for _ in dets]
    data, offs = str_buffers(arr)
    if compiled and _compiled.available():
        every = _compiled.pii_gates(data, offs)
    else:
        every = _gates(data, offs)
    return [every[ids.index(id(d))] for d in dets]


def detectors(names: list[str] | None = None) -> list[Detector]:
    if names is None:
        return list(DETECTORS.values())
    unknown = [n for n in names if n not in {d.name for d in DETECTORS.values()}]
    if unknown:
        raise InputError(
            f"unknown PII detector(s) {', '.join(unknown)}",
            hint=f"known: {', '.join(sorted({d.name for d in DETECTORS.values()}))}",
        )
    return [d for d in DETECTORS.values() if d.name in names]


def scan(text: str, dets: list[Detector]) -> list[Span]:
    """Non-overlapping spans, in text order; a span overlapping an earlier detector's span is dropped."""
    return merge(det.find(text) for det in dets)


def merge(found) -> list[Span]:
    """Spans found by each detector (in detector order) without overlaps: earlier detectors win."""
    spans: list[Span] = []
    for det_spans in found:
        for s in det_spans:
            if all(s.end <= o.start or s.start >= o.end for o in spans):
                spans.append(s)
    return sorted(spans, key=lambda s: s.start)


def redact(text: str, spans: list[Span]) -> str:
    out, last = [], 0
    for s in spans:
        out.append(text[last : s.start])
        out.append(f"[{s.type.upper()}]")
        last = s.end
    out.append(text[last:])
    return "".join(out)


class PresidioDetector:
    """Microsoft Presidio's analyzer as a detector (``pip install presidio-analyzer`` and a spaCy model).

    from finetrace.data.pii import PresidioDetector, register_detector
    register_detector(PresidioDetector(entities=["PERSON", "LOCATION"]))
    """

    name = "presidio"

    def __init__(self, entities: list[str] | None = None, language: str = "en", score: float = 0.5):
        try:
            from presidio_analyzer import AnalyzerEngine
        except ImportError:
            raise DependencyError(
                "the Presidio detector needs presidio-analyzer",
                hint="pip install presidio-analyzer && python -m spacy download en_core_web_lg",
            ) from None
        self.engine = AnalyzerEngine()
        self.entities, self.language, self.score = entities, language, score

    def find(self, text: str) -> list[Span]:
        results = self.engine.analyze(text=text, entities=self.entities, language=self.language)
        return [Span(r.start, r.end, r.entity_type.lower()) for r in results if r.score >= self.score]
