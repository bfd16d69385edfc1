"""The prefix cache (decoding/prefix.py): prompts that start alike skip the shared part, and the answers are
the tokens a decoder without the cache gives; prefixes never cross adapters, and a swapped adapter never
sees the old one's prefixes."""

from __future__ import annotations

import pytest
import torch

from finetrace.decoding import BASE, Decoder, Seq, encode_chat
from finetrace.decoding.lora import adapter_selector
from finetrace.decoding.prefix import MIN_TOKENS, PrefixCache

SYSTEM = "You are a careful reviewer of contracts. Answer briefly, in one short sentence, and cite the clause."
PROMPTS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"clause {i}: {'notice ' * (i % 4)}days {i}"}]
    for i in range(8)
]


def _run(dec, tok, names, prompts=PROMPTS):
    seqs = [Seq(encode_chat(tok, p), n, max_tokens=8) for p, n in zip(prompts, names)]
    dec.run(seqs)
    return [s.ids for s in seqs]


@pytest.mark.parametrize("kernel", ["gathered", "peft"])  # the lean forward, and the model's own (PEFT's batches)
def test_cached_prefixes_give_the_answers_of_a_decoder_without_them(two_adapters, kernel):
    model, tok = two_adapters
    sel = adapter_selector(model, kernel, ["alpha", "beta"])
    names = [["alpha", "beta", BASE][i % 3] for i in range(len(PROMPTS))]
    plain = Decoder(model, tok, sel, max_batch=3, prefill_chunk=5, prefix_cache_bytes=0)
    want = _run(plain, tok, names)
    assert plain.prefix_hit_tokens == 0

    dec = Decoder(model, tok, sel, max_batch=3, prefill_chunk=5)
    first = _run(dec, tok, names)  # later groups already hit what earlier ones stored
    assert first == want
    shared = len(encode_chat(tok, [{"role": "system", "content": SYSTEM}]))
    hits = dec.prefix_hit_tokens
    assert hits > 0
    again = _run(dec, tok, names)  # each prompt's system turn now comes from the cache
    assert again == want
    assert dec.prefix_hit_tokens - hits >= shared * len(PROMPTS)
    # the adapters change the answers, so a prefix shared across adapters would have shown above
    assert _run(plain, tok, ["alpha"] * len(PROMPTS)) != _run(plain, tok, [BASE] * len(PROMPTS))


def test_a_swapped_adapter_does_not_reuse_the_old_prefixes(two_adapters):
    model, tok = two_adapters
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    dec = Decoder(model, tok, sel, max_batch=4)
    before = _run(dec, tok, ["alpha"] * 4, PROMPTS[:4])
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["alpha"].weight
    saved = a.detach().clone()
    try:
        with torch.no_grad():
            a.mul_(-3.0)  # "alpha" now names other weights: restacked, as the engine's hot swap does
        sel.rebuild(["alpha", "beta"])
        hits = dec.prefix_hit_tokens
        swapped = _run(dec, tok, ["alpha"] * 4, PROMPTS[:4])
        fresh = _run(Decoder(model, tok, sel, max_batch=4, prefix_cache_bytes=0), tok, ["alpha"] * 4, PROMPTS[:4])
        assert swapped == fresh != before
        first_group_hits = dec.prefix_hit_tokens - hits
        assert first_group_hits == 0  # the four rows were read in one group, with an emptied cache
    finally:
        with torch.no_grad():
            a.copy_(saved)
        sel.rebuild(["alpha", "beta"])


def test_lookup_finds_the_longest_prefix_per_adapter_within_the_budget():
    def kv(n):
        return [(torch.zeros(2, n, 4), torch.ones(2, n, 4))]

    c = PrefixCache(max_bytes=2 * 2 * 20 * 2 * 4 * 4)  # room for two 20-token entries
    a = list(range(20))
    b = list(range(12)) + [99] * 8
    c.store("x", a, kv(20))
    c.store("x", b, kv(20))
    assert c.lookup("x", list(range(15)) + [5, 5])[0] == 15
    assert c.lookup("x", list(range(12)) + [99, 99, 7])[0] == 14
    assert c.lookup("y", a + [1])[0] == 0  # another adapter's prefixes are not shared
    assert c.lookup("x", a)[0] == 19  # the last prompt token is always read
    assert c.lookup("x", list(range(MIN_TOKENS - 1)) + [77, 77, 77])[0] == 0  # too short a prefix
    c.store("x", [5] * 20, kv(20))  # a third entry evicts the least recently used (b: a was looked up last)
    assert len(c.entries) == 2 and c.lookup("x", b + [1])[0] == 12 and c.bytes <= c.max_bytes
    c.validate(("model", 1))
    assert not c.entries and c.bytes == 0


def test_a_prompt_is_kept_when_it_adds_more_than_it_repeats():
    def kv(n):
        return [(torch.zeros(1, n, 2), torch.zeros(1, n, 2))]

    c = PrefixCache()
    system = list(range(100, 130))  # a 30-token system turn
    first = system + [1, 2, 3, 4]
    assert c.admit("x", first)
    c.store("x", first, kv(len(first)))
    assert not c.admit("x", system + [5, 6, 7])  # repeats 30 tokens, adds 3: the first entry serves it
    assert c.admit("y", system + [5, 6, 7])  # another adapter has nothing yet
    assert c.admit("x", system + list(range(40)))  # adds 40 of its own
    longer = first + list(range(200, 210))  # the next turn of the first conversation: replaces its entry
    assert c.admit("x", longer)
    assert ("x", tuple(first)) not in c.entries and c.bytes == 0
    c.store("x", longer, kv(len(longer)))
    assert not c.admit("x", longer)  # already kept
    assert c.lookup("x", first + [9])[0] == len(first)


def test_label_scores_are_the_same_when_prompts_come_from_the_cache(two_adapters):
    from finetrace.decoding.labels import score_prompts

    model, tok = two_adapters
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    # examples longer than the system turn (as a clause with its instructions is): each gets an entry
    clause = "the supplier shall deliver the goods within {} days of the order and bear the cost of transport"
    long = [
        [p[0], {"role": "user", "content": clause.format(i) + f" ({p[1]['content']})"}] for i, p in enumerate(PROMPTS)
    ]
    rows = [encode_chat(tok, p) for p in long]
    variants = [encode_chat(tok, [p[0], {"role": "user", "content": p[1]["content"] + " and a name"}]) for p in long]
    names = [["alpha", "beta", BASE][i % 3] for i in range(len(rows))]
    labels = ["notice", "termination", "days"]
    plain = Decoder(model, tok, sel, prefix_cache_bytes=0)
    want = score_prompts(model, tok, rows + variants, labels, sel, names * 2, batch_size=3, decoder=plain)
    assert plain.prefix_hit_tokens == 0
    dec = Decoder(model, tok, sel)
    got = score_prompts(model, tok, rows, labels, sel, names, batch_size=3, decoder=dec)
    hits = dec.prefix_hit_tokens
    got += score_prompts(model, tok, variants, labels, sel, names, batch_size=3, decoder=dec)
    # each variant starts with its example (read in the first call) up to the end of the example's text
    common = [next(j for j, (a, b) in enumerate(zip(r, v)) if a != b) for r, v in zip(rows, variants)]
    system = len(encode_chat(tok, [PROMPTS[0][0]]))
    assert min(common) > system + 3
    assert dec.prefix_hit_tokens - hits >= 0.7 * sum(common)  # a batch reads as far back as its least-cached row
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-5)
