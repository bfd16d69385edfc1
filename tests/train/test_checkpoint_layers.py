"""Selective gradient checkpointing (``checkpoint_layers``): only the first N decoder layers recompute; the
loss and gradients equal those of a run without checkpointing, and the memory plan estimates (and
suggests) the number of layers."""

from __future__ import annotations

import pytest
import torch

from finetrace.errors import ConfigError
from finetrace.train.config import load_config
from finetrace.train.loop import enable_checkpointing
from finetrace.train.plan import Plan, cheapest_fix, estimate, settings_of

from .test_checkpointing import _loss_and_grads, _model, counted_batch
from .test_plan import llama_1b_shape
from .train_support import make_config


@pytest.mark.slow  # compiles the fused element-wise kernels (~7 s the first time in a process)
@pytest.mark.parametrize("layers,recomputed", [(None, 1), (2, 2), (1, 1), (0, 0)])
def test_checkpointing_some_layers_gives_the_same_loss_and_gradients(
    learnable_model_dir, monkeypatch, layers, recomputed
):
    calls, batch = counted_batch(learnable_model_dir, monkeypatch)
    model = _model(learnable_model_dir, quantized=False)
    plain_loss, plain, plain_calls = _loss_and_grads(model, batch, calls)
    assert enable_checkpointing(model, layers) == recomputed
    ck_loss, ck, ck_calls = _loss_and_grads(model, batch, calls)
    assert plain_calls == 6 and ck_calls == 6 + 3 * recomputed  # 3 fused layers per decoder layer, rerun
    assert abs(plain_loss - ck_loss) < 1e-5
    for k in plain:
        torch.testing.assert_close(ck[k], plain[k], rtol=1e-4, atol=1e-6)


def test_plan_counts_the_layers_that_keep_their_activations():
    shape = llama_1b_shape()

    def acts(**kw) -> float:
        return estimate(shape, settings_of(make_config(**kw), 1024, 1), "cpu")["activations"]

    none, default = acts(), acts(gradient_checkpointing=True)
    some = [acts(gradient_checkpointing=True, checkpoint_layers=n) for n in range(shape.layers + 1)]
    assert (
        some[0] == none and some[-2] == default and acts(gradient_checkpointing=True, checkpoint_layers=99) == some[-1]
    )
    assert all(a > b for a, b in zip(some[:-1], some[1:-1]))  # each recomputed layer saves memory...
    assert some[-1] > some[-2]  # ...but the last: recomputed right after its forward, it holds its set anyway
    # one layer more that keeps its activations costs one layer's set minus its saved input
    per_layer = (none - default) / (shape.layers - 1)
    assert some[-3] - default == pytest.approx(per_layer, rel=0.02)


def test_cheapest_fix_names_the_fewest_recomputed_layers():
    shape = llama_1b_shape()
    s = settings_of(make_config(method="qlora"), 256, 1)  # no smaller micro-batch budget is tried below 256 tokens
    full = Plan(estimate(shape, {**s, "checkpointing": True}, "cpu"), "cpu", None).peak_mb  # 15 of 16 layers
    half = Plan(estimate(shape, {**s, "checkpointing": True, "checkpoint_layers": 8}, "cpu"), "cpu", None).peak_mb
    fix = cheapest_fix(shape, s, "cpu", half + 1)
    assert fix.startswith("gradient_checkpointing: true with checkpoint_layers: 8"), fix
    assert "8 of 16 layers" in fix
    fix = cheapest_fix(shape, {**s, "checkpointing": True, "checkpoint_layers": 4}, "cpu", full + 1)
    assert fix.startswith("gradient_checkpointing: true with checkpoint_layers: null"), fix


def test_checkpoint_layers_needs_checkpointing(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("base_model: b\ndataset: d\noutput_name: o\ncheckpoint_layers: 4\n")
    with pytest.raises(ConfigError, match="checkpoint_layers.*gradient_checkpointing: true"):
        load_config(f)
    assert load_config(f, ["gradient_checkpointing=true"]).checkpoint_layers == 4
