"""Counterfactual bias suite: swap demographic terms in the inputs and see whether the answer moves.

For each evaluation example and each word-list category (given names by gender and by origin,
pronouns, gendered nouns, nationality, religion; ``resources/wordlists.json``, extendable), we build one
variant per group of the category:

- if the input mentions terms of the category, every such term is replaced by the aligned term of the
  target group (entry i of one group <-> entry i of another; whole words, case kept);
- otherwise, if templates are on, the input is wrapped in the category's template (``Message from
  {term}: {text}``) with the term of each group at index (example index mod list length).

All variants are answered by the same ``predict`` function (the model under test, or a stub in tests),
then per category we report:

    flip_rate      share of examples whose answer is not the same for every group's variant
    pairs          per pair of groups: the share of examples where the two answers differ, worst first,
                   each with up to ``max_flip_examples`` flipped examples (both inputs and answers)
    groups / gap   the task metric on each group's variants, and max - min across groups

Everything is offline: the word lists ship with the package.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from ..data.schemas import Example, split_instruction
from ..errors import InputError

Predict = Callable[[list[list[dict]]], list[str]]
Score = Callable[[str, str], float]


@dataclass(frozen=True)
class Category:
    name: str
    groups: dict[str, list[str]]
    template: str | None = None
    description: str = ""

    def __post_init__(self):
        lengths = {g: len(t) for g, t in self.groups.items()}
        if len(self.groups) < 2:
            raise InputError(f"word-list category {self.name!r} needs at least two groups")
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise InputError(
                f"word-list category {self.name!r}: every group needs the same, non-zero "
                f"number of terms (entry i is swapped for entry i); got {lengths}"
            )

    @property
    def pattern(self) -> re.Pattern:
        terms = sorted({t for ts in self.groups.values() for t in ts}, key=lambda t: (-len(t), t))
        return re.compile(r"(?<![\w-])(" + "|".join(re.escape(t) for t in terms) + r")(?![\w-])", re.IGNORECASE)

    @property
    def index(self) -> dict[str, int]:
        """lower-cased term -> its position (the first one, for terms listed twice such as 'her')."""
        idx: dict[str, int] = {}
        for ts in self.groups.values():
            for i, t in enumerate(ts):
                idx.setdefault(t.lower(), i)
        return idx


def _match_case(src: str, term: str) -> str:
    if src.isupper() and len(src) > 1:
        return term.upper()
    if src[:1].isupper():
        return term[:1].upper() + term[1:]
    if src.islower() and term[:1].isupper() and term.lower() in ("mrs", "ms", "mr"):
        return term
    return term if term[:1].isupper() else term.lower()


def swap(text: str, category: Category, group: str) -> tuple[str, int]:
    """``text`` with every term of ``category`` replaced by ``group``'s aligned term; and the count."""
    index, targets = category.index, category.groups[group]
    count = 0

    def sub(m: re.Match) -> str:
        nonlocal count
        count += 1
        return _match_case(m.group(0), targets[index[m.group(0).lower()]])

    return category.pattern.sub(sub, text), count


def load_wordlists(extra: Sequence[str | Path] = ()) -> dict[str, Category]:
    """The shipped categories, with each extra JSON file's groups added (or replacing same-named ones)."""
    docs = [
        (
            "wordlists.json (shipped)",
            json.loads(resources.files(__package__).joinpath("resources/wordlists.json").read_text("utf-8")),
        )
    ]
    for path in extra:
        try:
            docs.append((str(path), json.loads(Path(path).read_text("utf-8"))))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(
                f"cannot read word list: {exc}",
                file=str(path),
                hint='a JSON file {"categories": {NAME: {"groups": {GROUP: [terms]}}}}',
            ) from exc
    merged: dict[str, dict] = {}
    for src, doc in docs:
        cats = doc.get("categories")
        if not isinstance(cats, dict):
            raise InputError("no 'categories' object", file=src, field="categories")
        for name, c in cats.items():
            if not isinstance(c.get("groups"), dict):
                raise InputError(
                    "a category needs 'groups': {GROUP: [terms]}", file=src, field=f"categories.{name}.groups"
                )
            cur = merged.setdefault(name, {"groups": {}, "template": None, "description": ""})
            cur["groups"].update({g: [str(t) for t in ts] for g, ts in c["groups"].items()})
            cur["template"] = c.get("template", cur["template"])
            cur["description"] = c.get("description", cur["description"])
    return {n: Category(n, c["groups"], c["template"], c["description"]) for n, c in merged.items()}


def _user_texts(ex: Example) -> str:
    return "\n".join(m["content"] for m in ex.messages if m["role"] == "user")


def variants(
    ex: Example, position: int, category: Category, templates: bool = True
) -> tuple[str, dict[str, Example]] | None:
    """``("swap"|"template", {group: variant example})``, or None when the category does not apply."""
    if category.pattern.search(_user_texts(ex)):
        out = {}
        for g in category.groups:
            msgs = [
                dict(m, content=swap(m["content"], category, g)[0]) if m["role"] == "user" else dict(m)
                for m in ex.messages
            ]
            out[g] = replace(ex, messages=msgs)
        return "swap", out
    if not templates or not category.template:
        return None
    last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
    out = {}
    for g, terms in category.groups.items():
        term = terms[position % len(terms)]
        msgs = [dict(m) for m in ex.messages]
        head, text = split_instruction(msgs[last_user]["content"])  # a classification instruction stays first
        wrapped = category.template.format(term=term, text=text)
        msgs[last_user]["content"] = head + wrapped[:1].upper() + wrapped[1:]
        out[g] = replace(ex, messages=msgs)
    return "template", out


def counterfactual_suite(
    examples: Sequence[Example],
    predict: Predict,
    score: Score,
    categories: dict[str, Category],
    templates: bool = True,
    max_examples: int | None = None,
    max_flip_examples: int = 3,
    top_pairs: int = 5,
) -> dict:
    """Run the counterfactual suite; see the module docstring for what is measured."""
    examples = list(examples)[:max_examples] if max_examples else list(examples)
    plan: list[tuple[str, int, str, dict[str, Example]]] = []
    for cname, cat in categories.items():
        for pos, ex in enumerate(examples):
            v = variants(ex, pos, cat, templates)
            if v is not None:
                plan.append((cname, pos, v[0], v[1]))
    # one predict call for every distinct prompt
    keyed: dict[str, list[dict]] = {}
    for _, _, _, vs in plan:
        for ex in vs.values():
            keyed.setdefault(json.dumps(ex.messages, sort_keys=True), ex.messages)
    keys = list(keyed)
    answers = dict(zip(keys, predict([keyed[k] for k in keys]))) if keys else {}

    def answer(ex: Example) -> str:
        return answers[json.dumps(ex.messages, sort_keys=True)]

    report: dict = {"categories": {}, "templates": templates}
    for cname, cat in categories.items():
        rows = [(pos, kind, vs) for c, pos, kind, vs in plan if c == cname]
        groups = list(cat.groups)
        if not rows:
            report["categories"][cname] = {
                "n_examples": 0,
                "flip_rate": 0.0,
                "gap": 0.0,
                "groups": {},
                "pairs": [],
                "n_swapped": 0,
                "n_templated": 0,
            }
            continue
        flips = 0
        group_scores = {g: [] for g in groups}
        pair_stats = {
            (a, b): {"a": a, "b": b, "flips": 0, "examples": []} for a, b in itertools.combinations(groups, 2)
        }
        for pos, kind, vs in rows:
            ans = {g: answer(vs[g]) for g in groups}
            gold = examples[pos].target
            for g in groups:
                group_scores[g].append(score(ans[g], gold))
            if len(set(ans.values())) > 1:
                flips += 1
            for (a, b), st in pair_stats.items():
                if ans[a] != ans[b]:
                    st["flips"] += 1
                    if len(st["examples"]) < max_flip_examples:
                        st["examples"].append(
                            {
                                "example": pos,
                                "id": examples[pos].id,
                                "kind": kind,
                                "gold": gold,
                                "input_a": _user_texts(vs[a]),
                                "answer_a": ans[a],
                                "input_b": _user_texts(vs[b]),
                                "answer_b": ans[b],
                            }
                        )
        n = len(rows)
        per_group = {g: {"value": sum(s) / n, "n": n} for g, s in group_scores.items()}
        vals = [v["value"] for v in per_group.values()]
        pairs = sorted(
            (
                {
                    "category": cname,
                    "a": st["a"],
                    "b": st["b"],
                    "flip_rate": st["flips"] / n,
                    "flips": st["flips"],
                    "n": n,
                    "examples": st["examples"],
                }
                for st in pair_stats.values()
            ),
            key=lambda p: (-p["flip_rate"], p["a"], p["b"]),
        )
        report["categories"][cname] = {
            "n_examples": n,
            "n_swapped": sum(k == "swap" for _, k, _ in rows),
            "n_templated": sum(k == "template" for _, k, _ in rows),
            "flip_rate": flips / n,
            "groups": per_group,
            "gap": max(vals) - min(vals),
            "pairs": pairs[:top_pairs],
        }
    cats = report["categories"].values()
    report["flip_rate"] = max((c["flip_rate"] for c in cats), default=0.0)
    report["group_gap"] = max((c["gap"] for c in cats), default=0.0)
    report["worst_pairs"] = sorted(
        (p for c in cats for p in c["pairs"] if p["flips"]),
        key=lambda p: (-p["flip_rate"], p["category"], p["a"], p["b"]),
    )[:top_pairs]
    return report
