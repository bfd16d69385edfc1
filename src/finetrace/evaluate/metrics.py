"""Task metrics, computed per example where the metric allows it, in exactly one place.

    normalize("The  Cat!")            -> "cat"          (lower case, no punctuation/articles/extra spaces)
    exact_match(pred, gold)           -> 1.0 | 0.0      (after ``normalize``)
    parse_label(generation, labels)   -> label | None   (robust: exact, prefix, earliest whole-word match)
    accuracy(preds, golds)            -> mean of pred == gold
    macro_f1(preds, golds, labels)    -> mean over classes of 2PR/(P+R)
    label_report(preds, golds, labels) -> confusion matrix, per-class precision/recall/F1/support
    token_f1(pred, gold)              -> SQuAD token-overlap F1
    rouge_l(pred, gold)               -> LCS F-measure on normalised tokens (beta = 1)
    perplexity(nll_sum, n_tokens)     -> exp(nll_sum / n_tokens)

Every metric is a function of example *indices* through ``metric_on(name, ...)`` so that the bootstrap
(``stats.py``) can resample examples and recompute any of them, including macro-F1, which is not a
mean of per-example scores.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)

# name -> (kind, higher is better). "label" metrics need parsed labels; "text" metrics compare strings.
METRICS: dict[str, str] = {
    "accuracy": "label",
    "macro_f1": "label",
    "exact_match": "text",
    "token_f1": "text",
    "rouge_l": "text",
}


def normalize(text: str) -> str:
    """SQuAD-style normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = (text or "").lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold))


def parse_label(generation: str, labels: Sequence[str]) -> str | None:
    """The label a free-text answer names, or None.

    In order: the whole answer equals a label (after ``normalize``); the answer starts with a label
    (longest first, so "billing issue" beats "billing"); the label whose whole-word occurrence comes
    first in the answer (ties: the longer label). Answers such as "Label: Billing." or
    "I think it is billing" parse; "xyz" does not.
    """
    norm = normalize(generation)
    by_norm = {normalize(lab): lab for lab in labels}
    if norm in by_norm:
        return by_norm[norm]
    ordered = sorted(by_norm.items(), key=lambda kv: -len(kv[0]))
    for n, lab in ordered:
        if n and (norm == n or norm.startswith(n + " ")):
            return lab
    best: tuple[int, int, str] | None = None
    for n, lab in ordered:
        if not n:
            continue
        m = re.search(r"(?<!\w)" + re.escape(n) + r"(?!\w)", norm)
        if m and (best is None or (m.start(), -len(n)) < (best[0], best[1])):
            best = (m.start(), -len(n), lab)
    return best[2] if best else None


def accuracy(preds: Sequence[str | None], golds: Sequence[str]) -> float:
    if not golds:
        return 0.0
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def macro_f1(preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions.

    An unparsed prediction (None) is not a class: it counts as a false negative for the gold class.
    A class with no true positives has F1 0.
    """
    classes = sorted({g for g in golds} | {p for p in preds if p is not None})
    if labels is not None:
        classes = [c for c in labels if c in classes] + [c for c in classes if c not in labels]
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp, fp, fn = _class_counts(preds, golds, c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def _class_counts(preds: Sequence[str | None], golds: Sequence[str], c: str) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of class ``c``."""
    tp = sum(p == c and g == c for p, g in zip(preds, golds))
    fp = sum(p == c and g != c for p, g in zip(preds, golds))
    fn = sum(p != c and g == c for p, g in zip(preds, golds))
    return tp, fp, fn


def label_report(preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]) -> dict:
    """Confusion matrix and per-class precision, recall, F1 and support of a label task.

    ``{"classes": [...], "confusion": [[n]], "per_class": {c: {"precision", "recall", "f1", "support"}}}``:
    ``confusion[i][j]`` counts examples of gold class ``classes[i]`` predicted as ``classes[j]``; the
    last column, ``(none)``, counts answers that named no label. Precision of a class never predicted
    is None (undefined), not 0.
    """
    classes = list(labels) + sorted({g for g in golds if g not in labels})
    cols = classes + ["(none)"]
    col = {c: j for j, c in enumerate(cols)}
    confusion = [[0] * len(cols) for _ in classes]
    for p, g in zip(preds, golds):
        confusion[classes.index(g)][col.get(p, len(cols) - 1) if p is not None else len(cols) - 1] += 1
    per = {}
    for c in classes:
        tp, fp, fn = _class_counts(preds, golds, c)
        prec = tp / (tp + fp) if tp + fp else None
        rec = tp / (tp + fn) if tp + fn else None
        per[c] = {
            "precision": prec,
            "recall": rec,
            "support": tp + fn,
            "f1": 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn),
        }
    return {"classes": classes, "columns": cols, "confusion": confusion, "per_class": per}


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall of the normalised bags of words."""
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p and not g:
        return 1.0
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(g)
    return 2 * prec * rec / (prec + rec)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, gold: str) -> float:
    """ROUGE-L F-measure (beta = 1): 2 * P_lcs * R_lcs / (P_lcs + R_lcs) on normalised tokens."""
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p and not g:
        return 1.0
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(g)
    return 2 * prec * rec / (prec + rec)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / n_tokens)


_TEXT_FN: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}


class Scored:
    """One model's answers on one dataset, ready for any metric on any subset of examples.

    ``texts``: the raw answers; ``labels``: parsed labels (classification) or None;
    per-example text scores are cached so resampling costs only a mean.
    """

    def __init__(
        self,
        texts: Sequence[str],
        golds: Sequence[str],
        label_set: Sequence[str] | None = None,
        preds: Sequence[str | None] | None = None,
    ):
        self.texts = list(texts)
        self.golds = list(golds)
        self.label_set = list(label_set) if label_set else None
        if preds is None and self.label_set:
            preds = [parse_label(t, self.label_set) for t in self.texts]
        self.preds = list(preds) if preds is not None else None
        self._per_example: dict[str, list[float]] = {}

    def per_example(self, name: str) -> list[float]:
        if name not in self._per_example:
            if name == "accuracy":
                self._per_example[name] = [float(p == g) for p, g in zip(self.preds, self.golds)]
            else:
                fn = _TEXT_FN[name]
                self._per_example[name] = [fn(t, g) for t, g in zip(self.texts, self.golds)]
        return self._per_example[name]

    def metric(self, name: str, idx: Sequence[int] | None = None) -> float:
        """Metric ``name`` on the examples ``idx`` (all when None)."""
        if name not in METRICS:
            raise KeyError(name)
        if METRICS[name] == "label" and self.preds is None:
            raise ValueError(f"{name} needs a classification dataset (a label set)")
        idx = range(len(self.golds)) if idx is None else idx
        if name == "macro_f1":
            return macro_f1([self.preds[i] for i in idx], [self.golds[i] for i in idx], self.label_set)
        per = self.per_example(name)
        idx = list(idx)
        return sum(per[i] for i in idx) / len(idx) if idx else 0.0
