"""Look-alike names: the skeleton two names share when a reader could mistake one for the other.

    skeleton("acme/legal-lora") == skeleton("acrne/1egal_lora") == skeleton("ACME/Legal.Lora")

The skeleton is NFKC normalisation, case folding, a map of confusable characters to the Latin letter
they imitate (a subset of Unicode TR39's confusables for Cyrillic and Greek, plus the ASCII pairs
0/o, 1/l/i and the digraphs rn/m, vv/w), with separators ('-', '_', '.', spaces) dropped. The registry
refuses a namespace or package whose skeleton equals another account's: a buyer searching for one
publisher's adapter must not find a look-alike by someone else.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_CONFUSABLE = str.maketrans(
    {
        # Cyrillic
        "а": "a",
        "в": "b",
        "е": "e",
        "ё": "e",
        "к": "k",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "с": "c",
        "т": "t",
        "у": "y",
        "х": "x",
        "і": "l",
        "ї": "l",
        "ј": "j",
        "ѕ": "s",
        "ԁ": "d",
        "ԛ": "q",
        "ԝ": "w",
        "һ": "h",
        "ɡ": "g",
        "ո": "n",
        "ս": "u",
        # Greek
        "α": "a",
        "β": "b",
        "ε": "e",
        "η": "n",
        "ι": "l",
        "κ": "k",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "τ": "t",
        "υ": "u",
        "χ": "x",
        "ω": "w",
        "ϲ": "c",
        # Latin look-alikes and ASCII pairs
        "ı": "l",
        "ł": "l",
        "ɩ": "l",
        "0": "o",
        "1": "l",
        "i": "l",
        "|": "l",
        "!": "l",
    }
)
_DIGRAPHS = (("rn", "m"), ("vv", "w"), ("cl", "d"))


@lru_cache(maxsize=1 << 16)
def skeleton(name: str) -> str:
    """The look-alike class of ``name`` (see the module docstring)."""
    text = unicodedata.normalize("NFKC", name).casefold()
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    text = text.translate(_CONFUSABLE)
    text = re.sub(r"[\s._\-]+", "", text)
    for pair, single in _DIGRAPHS:
        text = text.replace(pair, single)
    return text


def confusable_with(name: str, others) -> str | None:
    """The first of ``others`` that is not ``name`` but looks like it, else None."""
    sk = skeleton(name)
    return next((o for o in others if o != name and skeleton(o) == sk), None)
