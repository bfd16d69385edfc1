"""Decoding core units without a model: batched seeded sampling, end-of-turn ids from the template,
streaming hold-back, and the preallocated KV cache's row and column bookkeeping."""

from __future__ import annotations

import pytest
import torch

from finetrace.decoding.kvcache import SlabLayer
from finetrace.decoding.sampling import make_generator, pick_tokens
from finetrace.decoding.text import holdback, normalise_answer


def test_seeded_rows_draw_the_same_tokens_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 300) * 3
    alone = [pick_tokens(logits[i : i + 1], [0.9], [0.8], [make_generator(10 + i)])[0] for i in range(5)]
    batch = pick_tokens(logits, [0.9] * 5, [0.8] * 5, [make_generator(10 + i) for i in range(5)])
    assert batch == alone
    mixed = pick_tokens(logits, [0.0, 0.9, 0.0, 0.9, 0.9], [1.0] * 5, [None] + [make_generator(1)] * 4)
    assert mixed[0] == int(logits[0].argmax()) and mixed[2] == int(logits[2].argmax())


def test_top_p_keeps_the_nucleus_and_frequencies_follow_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]])
    g = make_generator(3)
    draws = [pick_tokens(logits, [1.0], [0.7], [g])[0] for _ in range(400)]
    p = torch.softmax(logits[0], -1)
    assert set(draws) == {0, 1}  # p0 = 0.64 < 0.7, so the nucleus is {0, 1}
    share = draws.count(0) / len(draws)
    assert share == pytest.approx(float(p[0] / (p[0] + p[1])), abs=0.07)
    g = make_generator(4)
    draws = [pick_tokens(logits, [1.0], [1.0], [g])[0] for _ in range(2000)]
    assert draws.count(2) / 2000 == pytest.approx(float(p[2]), abs=0.03)


def test_end_of_turn_comes_from_the_template():
    from finetrace.decoding.chat import end_ids, template_turn_end, turn_end_id
    from finetrace.models.tiny import build_tokenizer

    chatml = build_tokenizer(200)
    assert template_turn_end(chatml) == chatml.convert_tokens_to_ids("<|im_end|>")
    llama3 = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    tok = build_tokenizer(
        200,
        special=["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
        eos="<|end_of_text|>",
        template=llama3,
    )
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert turn_end_id(tok) == eot and end_ids(tok) == {eot, tok.eos_token_id}
    plain = build_tokenizer(200, template="{% for m in messages %}{{ m['content'] + '\\n\\n' }}{% endfor %}")
    assert template_turn_end(plain) is None and end_ids(plain) == {plain.eos_token_id}


def test_holdback_and_normalisation():
    assert holdback("abc</", ["</s>"]) == 2 and holdback("abc", ["</s>"]) == 0 and holdback("ab\ufffd", []) == 1
    assert normalise_answer("  Paris \n") == "Paris"


def test_slab_layer_appends_compacts_and_trims_in_place():
    def kv(b, t, v):
        return torch.full((b, 2, t, 4), float(v)), torch.full((b, 2, t, 4), float(-v))

    a = SlabLayer()
    a.update(*kv(2, 3, 1))  # 2 rows, 3 columns
    buf = a.kbuf
    a.update(*kv(2, 1, 2))  # one decode step: written in place, same buffer
    assert a.kbuf is buf and a.t == 4 and a.keys.shape == (2, 2, 4, 4) and float(a.keys[0, 0, 3, 0]) == 2
    b = SlabLayer()
    b.update(*kv(1, 6, 5))  # a longer prompt joins: the running rows shift right
    a.append(b)
    assert (a.b, a.t) == (3, 6)
    assert a.keys[:2, 0, 2:, 0].tolist() == [[1, 1, 1, 2]] * 2 and a.keys[2, 0, :, 0].tolist() == [5] * 6
    a.keep_rows([2])  # rows 0 and 1 finish
    assert a.b == 1 and a.keys[0, 0, :, 0].tolist() == [5] * 6
    a.drop_columns(2)
    assert a.t == 4 and a.keys.shape == (1, 2, 4, 4) and float(a.values[0, 0, 0, 0]) == -5


def test_a_finished_row_is_replaced_by_the_last_one_and_nothing_else_moves():
    from finetrace.decoding.kvcache import compaction

    assert compaction([1, 2, 3, 4]) == [4, 1, 2, 3]  # row 0 finished: the last row takes its place
    assert compaction([0, 2, 4, 5]) == [0, 4, 2, 5]  # rows 1 and 3 finished
    assert compaction([0, 1, 2]) == [0, 1, 2] and compaction([]) == []
    layer = SlabLayer()
    rows = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 3, 4).contiguous()
    layer.update(rows, -rows)
    before = layer.kbuf.clone()
    copied = []
    real = layer.kbuf.index_select
    layer.kbuf.index_select = lambda dim, idx: copied.append(idx.tolist()) or real(dim, idx)  # type: ignore[method-assign]
    layer.keep_rows(compaction([1, 2, 3, 4, 5]))
    assert copied == [[5]]  # one row copied, not five
    assert layer.keys[:, 0, 0, 0].tolist() == [5, 1, 2, 3, 4] and torch.equal(layer.kbuf[1:5], before[1:5])
    assert layer.values[:, 1, 2, 3].tolist() == [-5, -1, -2, -3, -4]


def test_thread_tuner_keeps_the_faster_thread_count_and_rechecks_it():
    from finetrace.decoding.threads import ThreadTuner

    cost = {1: 0.01, 4: 0.05}  # an oversubscribed machine: 1 thread is faster
    tuner = ThreadTuner([1, 4], period=10, trial=2, max_period=40)
    assert tuner.threads() == 1 and tuner.best == 4  # the trial first, interleaved
    seen = []
    for _ in range(4):
        n = tuner.threads()
        seen.append(n)
        tuner.record(n, cost[n])
    assert seen == [1, 4, 1, 4] and tuner.best == 1
    assert [tuner.threads() for _ in range(1)] == [1]
    cost = {1: 0.05, 4: 0.01}  # the machine went quiet: the next trial moves to 4
    used = []
    for _ in range(40):
        n = tuner.threads()
        used.append(n)
        tuner.record(n, cost[n])
    assert tuner.best == 4 and used[-1] == 4 and used.count(1) <= 12
    assert tuner.period > 10  # rechecked less often while the winner holds


def test_a_decode_step_leaves_the_callers_thread_count(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrace.decoding import Decoder, Seq, encode_chat
    from finetrace.decoding.threads import ThreadTuner

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prev = torch.get_num_threads()
    dec = Decoder(model, tok, weights="fp32")
    dec.tuner = ThreadTuner([1, 2], period=4, trial=1)  # both counts used, then rechecked
    seq = Seq(encode_chat(tok, [{"role": "user", "content": "hi"}]), max_tokens=6)
    dec.run([seq])
    assert torch.get_num_threads() == prev and len(seq.ids) >= 1 and dec.tuner.best in (1, 2)


def test_releasing_the_openmp_team_leaves_torch_and_its_threads_working():
    import threading

    import torch

    from finetrace.decoding.threads import release_openmp_team

    a = torch.randn(256, 256)
    want = a @ a
    # torch's CPU build on Linux runs libgomp (OpenMP 5): the call is taken; elsewhere it does nothing
    released = release_openmp_team()
    assert released or not any("libgomp" in line for line in open("/proc/self/maps"))
    assert torch.allclose(a @ a, want, rtol=1e-5, atol=1e-4)  # the next parallel region starts a new team
    got = []
    t = threading.Thread(
        target=lambda: got.append(torch.allclose(a @ a, want, rtol=1e-5, atol=1e-4))
    )  # and on another thread
    t.start()
    t.join()
    assert got == [True] and release_openmp_team() == released  # idempotent
