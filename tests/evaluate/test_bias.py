"""The counterfactual suite: swaps, templates, a planted bias found, an unbiased scorer passed."""

from __future__ import annotations

import json

import pytest

from finetrace.data.schemas import Example
from finetrace.errors import InputError
from finetrace.evaluate import bias as B


@pytest.fixture(scope="module")
def cats():
    return B.load_wordlists()


def ex(text: str, target: str = "approve", i: int = 0) -> Example:
    return Example(
        [{"role": "system", "content": "Mary is not swapped here."}, {"role": "user", "content": text}],
        target,
        id=str(i),
    )


def test_shipped_wordlists_cover_the_required_categories(cats):
    assert {"gender_names", "origin_names", "pronouns", "gendered_nouns", "nationality", "religion"} <= set(cats)
    for c in cats.values():
        assert len({len(t) for t in c.groups.values()}) == 1 and len(c.groups) >= 2 and c.template


def test_swap_keeps_case_and_whole_words(cats):
    text = "Mary told MARY's sister that Maryland is far; she said her brother agreed."
    assert B.swap(text, cats["gender_names"], "male") == (
        "John told JOHN's sister that Maryland is far; she said her brother agreed.",
        2,
    )
    assert (
        B.swap(text, cats["pronouns"], "male")[0]
        == "Mary told MARY's sister that Maryland is far; he said him brother agreed."
    )
    assert B.swap("She and his wife", cats["gendered_nouns"], "male")[0] == "She and his husband"
    assert (
        B.swap("A Muslim family visited the mosque.", cats["religion"], "jewish")[0]
        == "A Jewish family visited the synagogue."
    )


def test_variants_swap_user_turns_only_or_use_the_template(cats):
    kind, vs = B.variants(ex("Emily asked about the invoice."), 3, cats["gender_names"])
    assert kind == "swap"
    assert vs["male"].messages[1]["content"] == "James asked about the invoice."
    assert vs["male"].messages[0]["content"] == "Mary is not swapped here."  # system turn untouched
    kind, vs = B.variants(ex("Where is my invoice?"), 3, cats["gender_names"])
    assert kind == "template"
    assert vs["female"].messages[1]["content"] == "Message from Anna: Where is my invoice?"
    assert vs["male"].messages[1]["content"] == "Message from Peter: Where is my invoice?"
    assert B.variants(ex("Where is my invoice?"), 0, cats["gender_names"], templates=False) is None


def _examples():
    texts = [
        "Please refund my order.",
        "Kofi wants a refund for the order.",
        "Emma asks about an invoice.",
        "My parcel is late.",
        "Priya needs a refund today.",
        "Carlos reports a broken part.",
    ]
    return [ex(t, "approve" if "refund" in t else "reject", i) for i, t in enumerate(texts)]


def _stub(rule):
    def predict(prompts):
        return [rule(p[-1]["content"]) for p in prompts]

    return predict


def score(answer: str, gold: str) -> float:
    return float(answer == gold)


def test_planted_bias_is_found(cats):
    west_african = set(cats["origin_names"].groups["west_african"])

    def biased(text):  # answers "reject" whenever a West African name appears
        if any(n in text.split() or n + "'s" in text for n in west_african) or any(
            text.startswith(f"Message from {n}") for n in west_african
        ):
            return "reject"
        return "approve" if "refund" in text else "reject"

    rep = B.counterfactual_suite(_examples(), _stub(biased), score, {"origin_names": cats["origin_names"]})
    origin = rep["categories"]["origin_names"]
    # every refund example flips between west_african and any other group; the others answer reject anyway
    assert origin["n_examples"] == 6 and origin["n_swapped"] == 4 and origin["n_templated"] == 2
    assert origin["flip_rate"] == pytest.approx(3 / 6)
    assert origin["groups"]["west_african"]["value"] == pytest.approx(3 / 6)
    assert origin["groups"]["european"]["value"] == 1.0
    assert origin["gap"] == pytest.approx(0.5)
    worst = rep["worst_pairs"][0]
    assert "west_african" in (worst["a"], worst["b"]) and worst["flip_rate"] == pytest.approx(0.5)
    assert all("west_african" in (p["a"], p["b"]) for p in rep["worst_pairs"])
    flip = worst["examples"][0]
    assert {flip["answer_a"], flip["answer_b"]} == {"approve", "reject"} and "refund" in flip["input_a"]
    assert rep["flip_rate"] == pytest.approx(0.5) and rep["group_gap"] == pytest.approx(0.5)


def test_unbiased_scorer_passes(cats):
    rep = B.counterfactual_suite(_examples(), _stub(lambda t: "approve" if "refund" in t else "reject"), score, cats)
    assert rep["flip_rate"] == 0.0 and rep["group_gap"] == 0.0 and rep["worst_pairs"] == []
    assert all(c["n_examples"] == 6 for c in rep["categories"].values())


def test_wordlists_are_extendable_and_validated(tmp_path, cats):
    extra = tmp_path / "extra.json"
    extra.write_text(
        json.dumps(
            {
                "categories": {
                    "age": {
                        "template": "A {term} customer: {text}",
                        "groups": {"young": ["young"], "old": ["elderly"]},
                    },
                    "gender_names": {
                        "groups": {"female": [f"F{i}" for i in range(12)], "male": cats["gender_names"].groups["male"]}
                    },
                }
            }
        )
    )
    merged = B.load_wordlists([extra])
    assert merged["age"].groups == {"young": ["young"], "old": ["elderly"]}
    assert merged["gender_names"].groups["female"][0] == "F0"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": {"x": {"groups": {"a": ["1", "2"], "b": ["3"]}}}}))
    with pytest.raises(InputError, match="same"):
        B.load_wordlists([bad])


@pytest.mark.parametrize("fmt", ["labels-first", "text-first"])
def test_a_template_wraps_the_text_of_a_classification_prompt_not_its_instruction(cats, fmt):
    from finetrace.data.schemas import classification_prompt

    prompt = classification_prompt("where is my invoice?", ["billing", "tech"], fmt)
    kind, vs = B.variants(ex(prompt), 3, cats["gender_names"])
    got = vs["female"].messages[1]["content"]
    assert kind == "template"
    if fmt == "labels-first":  # the instruction stays first: every variant starts as the original does
        assert got == "Answer with one of: billing, tech.\n\nMessage from Anna: where is my invoice?"
    else:
        assert got == "Message from Anna: where is my invoice?\n\nAnswer with one of: billing, tech."
