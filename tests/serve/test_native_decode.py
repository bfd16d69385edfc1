"""The native decode step (decoding/native.py): one row's token in one C call computes what the torch lean
forward computes (logits to fp32 summation order, the same tokens, the same cache), on the base and on
adapters; where it cannot run, the torch path answers the same."""

from __future__ import annotations

import ctypes

import pytest
import torch

import finetrace.decoding.lean as lean
from finetrace.decoding import BASE, Decoder, Seq, encode_chat
from finetrace.decoding.lora import adapter_selector
from finetrace.decoding.native import library, panels

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler or no AVX2/FMA/F16C here")

PROMPTS = [[{"role": "user", "content": f"clause {i}: {'notice ' * (i % 5)}within {i + 3} days"}] for i in range(9)]


def _answers(model, tok, names, native: bool, monkeypatch, max_batch=1):
    calls = []
    real = lean.native_step

    def counted(lean_model, packed):
        step = real(lean_model, packed) if native else None
        if step is not None:
            calls.append(1)
        return step

    monkeypatch.setattr(lean, "native_step", counted)
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    dec = Decoder(model, tok, sel, max_batch=max_batch, prefix_cache_bytes=0)
    seqs = [Seq(encode_chat(tok, p), n, max_tokens=12) for p, n in zip(PROMPTS, names)]
    dec.run(seqs)
    monkeypatch.setattr(lean, "native_step", real)
    return [s.ids for s in seqs], len(calls)


def test_single_rows_decode_natively_to_the_tokens_of_the_torch_path(two_adapters, monkeypatch):
    model, tok = two_adapters
    names = [["alpha", "beta", BASE][i % 3] for i in range(len(PROMPTS))]
    want, none = _answers(model, tok, names, False, monkeypatch)
    got, calls = _answers(model, tok, names, True, monkeypatch)
    assert none == 0 and calls >= len(PROMPTS) * 5  # most tokens of every row came from the C step
    assert got == want
    assert len({tuple(a) for a in got}) > 3  # the adapters (and the prompts) change the answers
    batched, _ = _answers(model, tok, names, True, monkeypatch, max_batch=4)  # batches keep the torch path
    assert batched == want


def test_the_native_step_equals_the_lean_forward_logits_and_cache(two_adapters):
    from finetrace.decoding.kvcache import slab_cache
    from finetrace.decoding.native import native_step

    model, tok = two_adapters
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    dec = Decoder(model, tok, sel, max_batch=1)
    sel.select(["alpha"])
    fwd = dec.lean()
    step = native_step(fwd, fwd.packed())
    assert fwd is not None and step is not None
    ids = torch.tensor([encode_chat(tok, PROMPTS[3])])
    n = ids.shape[1]
    runs = []
    with torch.inference_mode():
        for native in (True, False):
            cache = slab_cache(len(fwd.layers))
            mask = torch.ones((1, n), dtype=torch.long)
            logits = fwd.forward(ids, mask, torch.arange(n)[None], cache.layers)
            out = []
            for s in range(10):
                token = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones((1, 1), dtype=torch.long)], 1)
                pos = torch.tensor([[n + s]])
                if native:
                    logits = step(token, mask, pos, cache.layers, fwd.adapters)
                else:
                    with pytest.MonkeyPatch.context() as mp:
                        mp.setattr(lean, "native_step", lambda *_: None)
                        logits = fwd.forward(token, mask, pos, cache.layers)
                out.append(logits.clone())
            runs.append((out, [(c.keys.clone(), c.values.clone()) for c in cache.layers]))
    (nat, nat_kv), (ref, ref_kv) = runs
    for a, b in zip(nat, ref):
        assert a.shape == b.shape == (1, model.config.vocab_size)
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        assert a.argmax() == b.argmax()
    for (ka, va), (kb, vb) in zip(nat_kv, ref_kv):
        assert ka.shape == kb.shape and ka.shape[2] == n + 10
        assert (ka - kb).abs().max() <= 1e-4 * kb.abs().max() and (va - vb).abs().max() <= 1e-4 * vb.abs().max()


@pytest.mark.parametrize(
    "rows,out,inp,threads",
    [
        (1, 13, 37, 1),
        (1, 200, 64, 2),
        (3, 7, 200, 2),
        (16, 9, 24, 2),
        (7, 100, 33, 2),
        (37, 70, 50, 2),
        (70, 20, 40, 2),
        (17, 64, 256, 2),  # past 16 rows the widened-block kernel: panels split between the threads
        (130, 150, 300, 2),  # rows split between the threads, three input blocks, a masked last panel
        (250, 33, 129, 1),
    ],
)
def test_the_fp16_kernels_on_any_shape_and_each_row_as_if_alone(rows, out, inp, threads):
    torch.manual_seed(out)
    w = torch.randn(out, inp).half()
    x, b = torch.randn(rows, inp), torch.randn(out)
    wp = panels(w)
    fn = library().ft_gemm16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + [
        ctypes.c_int64
    ] * 3

    def run(xs):
        y = torch.full((xs.shape[0], out), float("nan"))
        fn(wp.data_ptr(), xs.data_ptr(), xs.shape[0], b.data_ptr(), y.data_ptr(), out, inp, threads)
        return y

    y = run(x)
    assert torch.allclose(y, x @ w.float().T + b, rtol=1e-5, atol=1e-5)
    for r in range(rows):  # the same bits alone as in the batch: a row never depends on its batch-mates
        assert torch.equal(run(x[r : r + 1].contiguous()), y[r : r + 1])
    wide = library().ft_wide
    if wide(-1):  # this CPU has the 16-row AVX-512 tile: the 8-lane tiles give the same bits
        try:
            assert wide(0) == 0
            assert torch.equal(run(x), y)
        finally:
            wide(1)


def _probe(monkeypatch, **env) -> bool:
    with monkeypatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        library.cache_clear()
        try:
            return library() is not None
        finally:
            library.cache_clear()


@pytest.mark.slow  # compiles the C source afresh (about 1.5 s)
def test_the_library_is_built_once_atomically_and_can_be_turned_off(tmp_path, monkeypatch):
    assert _probe(monkeypatch, FINETRACE_CACHE_DIR=str(tmp_path))
    built = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].startswith("decode-") and built[0].endswith(".so")  # no temp file left
    stamp = (tmp_path / "native" / built[0]).stat().st_mtime_ns
    assert _probe(monkeypatch, FINETRACE_CACHE_DIR=str(tmp_path))
    assert (tmp_path / "native" / built[0]).stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not _probe(monkeypatch, FINETRACE_NATIVE_DECODE="0")
    assert not _probe(monkeypatch, CC="no-such-compiler", FINETRACE_CACHE_DIR=str(tmp_path / "fresh"), PATH="")
    assert not (tmp_path / "fresh").exists()


def test_a_rows_logits_are_the_same_bits_alone_and_batched_with_other_adapters(two_adapters, monkeypatch):
    from finetrace.decoding.kvcache import slab_cache
    from finetrace.decoding.native import NativeStep

    native_rows = []
    real_call = NativeStep.__call__

    def counted(self, ids, *a):
        out = real_call(self, ids, *a)
        native_rows.append(ids.shape[0] if out is not None else 0)
        return out

    monkeypatch.setattr(NativeStep, "__call__", counted)
    model, tok = two_adapters
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    fwd = Decoder(model, tok, sel, max_batch=3).lean()
    names = ["alpha", "beta", BASE]
    prompts = [torch.tensor([encode_chat(tok, PROMPTS[i])]) for i in (1, 4, 7)]
    with torch.inference_mode():

        def prefill(i):
            sel.select([names[i]])
            cache = slab_cache(len(fwd.layers))
            n = prompts[i].shape[1]
            logits = fwd.forward(prompts[i], torch.ones((1, n), dtype=torch.long), torch.arange(n)[None], cache.layers)
            return cache, logits.argmax(-1)

        def decode(cache, mask, tokens, pos, rows, steps=6):
            out = []
            for _ in range(steps):
                sel.select(rows)
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long)], 1)
                logits = fwd.forward(tokens[:, None], mask, pos[:, None], cache.layers)
                out.append(logits.clone())
                tokens, pos = logits.argmax(-1), pos + 1
            return out

        alone = []
        for i in range(3):
            cache, first = prefill(i)
            n = prompts[i].shape[1]
            alone.append(decode(cache, torch.ones((1, n), dtype=torch.long), first, torch.tensor([n]), [names[i]]))
        caches, firsts = zip(*[prefill(i) for i in range(3)])
        joined = caches[0]
        for c in caches[1:]:
            for mine, theirs in zip(joined.layers, c.layers):
                mine.append(theirs)  # right-aligned in time, as the decoder joins a new group
        t = joined.layers[0].t
        lens = [p.shape[1] for p in prompts]
        mask = torch.stack(
            [torch.cat([torch.zeros(t - n, dtype=torch.long), torch.ones(n, dtype=torch.long)]) for n in lens]
        )
        together = decode(joined, mask, torch.cat(firsts), torch.tensor(lens), names)
    assert native_rows == [1] * 24 + [3] * 6  # every prefill and decode step in C, alone and batched
    for step, both in enumerate(together):
        for i in range(3):
            assert torch.equal(both[i : i + 1], alone[i][step]), (step, names[i])
    assert not torch.equal(together[0][0], together[0][2])  # the rows (and their adapters) differ


def test_a_wider_head_decodes_as_the_torch_path(tmp_path):
    """head_dim 40: the attention's 32-wide vector part and its tail (the tiny model's 16 has no vector part);
    prefill with a left-padded row and decode steps, against the torch path throughout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrace.decoding.kvcache import slab_cache
    from finetrace.decoding.native import native_step
    from finetrace.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "wide", hidden_size=160)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    fwd = Decoder(model, tok, None, max_batch=2).lean()
    assert fwd is not None and fwd.head_dim == 40 and native_step(fwd, fwd.packed()) is not None
    ids = torch.tensor([encode_chat(tok, PROMPTS[2]), encode_chat(tok, PROMPTS[2])])
    ids[1, :3] = ids[1, 3]  # two different rows
    n = ids.shape[1]
    runs = []
    with torch.inference_mode():
        for native in (True, False):
            with pytest.MonkeyPatch.context() as mp:
                if not native:  # prefill (with a left-padded row) and decode steps all through torch
                    mp.setattr(lean, "native_step", lambda *_: None)
                cache = slab_cache(len(fwd.layers))
                mask = torch.ones((2, n), dtype=torch.long)
                mask[1, :2] = 0
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = fwd.forward(ids, mask, pos, cache.layers)
                out = [logits.clone()]
                for _ in range(8):
                    token = logits.argmax(-1)
                    mask = torch.cat([mask, torch.ones((2, 1), dtype=torch.long)], 1)
                    pos = pos[:, -1:] + 1
                    logits = fwd.forward(token[:, None], mask, pos, cache.layers)
                    out.append(logits.clone())
            runs.append(out)
    for a, b in zip(*runs):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_label_scoring_runs_its_label_pass_natively_with_the_scores_of_the_torch_path(two_adapters, monkeypatch):
    from finetrace.decoding.labels import score_prompts
    from finetrace.decoding.native import NativeStep

    model, tok = two_adapters
    labels = ["notice period", "payment", "liability cap", "termination for cause"]
    rows = [encode_chat(tok, p) for p in PROMPTS]
    names = [["alpha", "beta", BASE][i % 3] for i in range(len(rows))]
    explicit = []  # label passes (an explicit mask) the C step answered
    real_call = NativeStep.__call__

    def counted(self, ids, mask, positions, layers, adapters, keep=None):
        out = real_call(self, ids, mask, positions, layers, adapters, keep)
        if keep is not None and out is not None:
            explicit.append(tuple(out.shape))
        return out

    def scores(native: bool):
        with monkeypatch.context() as mp:
            mp.setattr(NativeStep, "__call__", counted)
            if not native:
                mp.setattr(lean, "native_step", lambda *_: None)
            sel = adapter_selector(model, "gathered", ["alpha", "beta"])
            dec = Decoder(model, tok, sel, max_batch=4, prefix_cache_bytes=0)
            return score_prompts(model, tok, rows, labels, names=names, batch_size=4, decoder=dec)

    ref = scores(False)
    assert not explicit
    got = scores(True)
    assert explicit and all(len(s) == 3 and s[1] > 1 for s in explicit)  # (B, label tokens, vocab)
    flat_ref = torch.tensor([x for r in ref for x in r])
    flat_got = torch.tensor([x for r in got for x in r])
    assert (flat_got - flat_ref).abs().max() <= 1e-4 * flat_ref.abs().max()
    assert [max(range(4), key=r.__getitem__) for r in got] == [max(range(4), key=r.__getitem__) for r in ref]
    assert len({tuple(r) for r in ref}) == len(rows)  # every prompt and adapter scores the labels its own way


def test_adapters_decode_on_fp16_values_in_every_copy(tiny_model_dir):
    """With fp16 decode weights the LoRA matrices are rounded to fp16 values too: PEFT's own weights (still
    views of the stacks), the stacks and the native step's fp16 copies hold the same numbers; adapters
    restacked later (a hot load) are rounded as well, and the native step reads the fp16 copies."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetrace.decoding.native import native_step

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0),
        adapter_name="alpha",
    )
    model.add_adapter("beta", LoraConfig(r=2, lora_alpha=4, target_modules=targets[:4], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    model.eval()
    peft_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert any(not torch.equal(w, w.half().float()) for w in peft_weights.values())  # not fp16 values yet
    sel = adapter_selector(model, "gathered", ["alpha", "beta"])
    dec = Decoder(model, tok, sel, max_batch=2)
    assert dec.weights == "fp16"
    version = sel.version
    dec.run([Seq(encode_chat(tok, PROMPTS[0]), "alpha", max_tokens=3)])
    assert sel.half and sel.version == version + 1  # plans made from the unrounded stacks are stale
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert torch.equal(p.detach(), peft_weights[n].half().float()), n  # rounded to nearest, in place
    for m in sel.modules:
        assert m._ft_A16.dtype == torch.float16 and torch.equal(m._ft_A16.float(), m._ft_A)
        assert torch.equal(m._ft_B16.float(), m._ft_B)
        wa = m.lora_A["alpha"].weight
        assert wa.untyped_storage().data_ptr() == m._ft_A.untyped_storage().data_ptr()  # still one copy
    step = native_step(dec.lean(), dec.lean().packed())
    layers = step._layers(sel)
    seg = layers[0].lora[0][0]
    assert seg.r > 0 and seg.a == sel.modules[0]._ft_A16.data_ptr()  # the C reads the fp16 copies
    sel.rebuild(["beta", "alpha"])  # restacked (as after loading an adapter): rounded again, new copies
    assert all(torch.equal(m._ft_A16.float(), m._ft_A) for m in sel.modules)
