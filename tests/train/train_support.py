"""Helpers shared by the train tests (a module of its own: conftest modules of sibling folders clash)."""

from __future__ import annotations


def make_config(**kw):
    from finetrace.train import TrainConfig

    base = dict(
        base_model="tiny",
        dataset="toy",
        output_name="toy-lora",
        batch_size=4,
        max_steps=6,
        lr=5e-3,
        checkpoint_every=None,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)
