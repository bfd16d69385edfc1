"""From a dataset artifact to micro-batches: tokenise, plan the data order, pack without padding.

An example becomes ``prompt_ids + target_ids + [eos]`` where the prompt is the chat template applied to
the prompt messages with the generation prompt (``<|im_start|>assistant\\n`` for ChatML) and the loss is
on the target tokens and the end-of-turn token only. Labels are located by *segment* (the prompt
length), never by the pad id: SmolLM2's pad token is its eos, and masking by pad id would hide the stop
token from the loss.

The data order is a pure function of (seed, epoch): resuming at step k replays exactly the batches an
uninterrupted run would have seen, with no sampler state to save.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.schemas import conversation, to_example
from ..errors import InputError

if TYPE_CHECKING:  # torch loads lazily, inside the functions that need it
    import torch


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # prompt + target + eos (or a whole rendered conversation)
    n_prompt: int  # tokens before the first one that carries loss
    loss_at: tuple[int, ...] | None = None  # positions that carry loss (multi-turn); None: all from n_prompt

    @property
    def n_target(self) -> int:
        return len(self.ids) - self.n_prompt if self.loss_at is None else len(self.loss_at)

    def targets(self) -> list[int]:
        """Positions whose token carries loss (each predicted from the position before it)."""
        return list(range(self.n_prompt, len(self.ids))) if self.loss_at is None else list(self.loss_at)


@dataclass
class Batch:
    """One forward pass. Packed: B == 1 and ``cu_seqlens`` marks examples; padded: ``attention_mask``."""

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T), restarting at 0 for each packed example
    loss_index: torch.Tensor  # (n,) flat indices into B*T of the positions that predict a target
    targets: torch.Tensor  # (n,) the token each of those positions must predict
    cu_seqlens: list[int] | None  # packed: example boundaries [0, l0, l0+l1, ...]
    attention_mask: torch.Tensor | None  # padded: (B, T) 1 for real tokens
    n_tokens: int  # real (non-pad) tokens

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device) -> Batch:
        """The same batch with its tensors on ``device`` (itself when they are there already)."""
        import torch

        if self.input_ids.device == torch.device(device):
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.loss_index),
            move(self.targets),
            self.cu_seqlens,
            move(self.attention_mask),
            self.n_tokens,
        )


def read_dataset(folder: Path, split: str) -> tuple[dict, list[dict]]:
    """``dataset.json`` and the rows of one split of a materialised dataset folder."""
    import pyarrow.parquet as pq

    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise InputError("not a dataset folder: dataset.json is missing", file=str(folder))
    meta = json.loads(meta_path.read_text())
    part = folder / f"{split}.parquet"
    if not part.is_file():
        have = sorted(p.stem for p in folder.glob("*.parquet"))
        raise InputError(
            f"the dataset has no split {split!r}", field="split", hint=f"splits present: {', '.join(have) or 'none'}"
        )
    return meta, pq.read_table(part).to_pylist()


def encode(tokenizer, messages: list[dict], target: str) -> Encoded:
    """Token ids of one example: chat-templated prompt, then target and the end-of-turn token."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos/end-of-turn token", hint="use a chat model with one")
    return Encoded(list(p_ids) + list(t_ids) + [eos], len(p_ids))


def encode_rows(
    tokenizer,
    rows: list[dict],
    schema: str,
    labels: list[str] | None,
    max_length: int,
    turns: str = "auto",
    prompt_format: str | None = None,
) -> tuple[list[Encoded], int]:
    """Encode rows; returns (examples, number skipped for being longer than ``max_length``).

    ``turns`` (chat rows): "last" puts the loss on the last assistant turn only (its prompt is every
    turn before it), "all" on every assistant turn without ``weight: 0``, rendered as one sequence by
    the model's chat template; "auto" is "all" for rows with tool calls or weights (OpenAI, ShareGPT
    imports) and "last" otherwise.
    """
    from ..data.chat import check_renders_tools

    out, skipped = [], 0
    checked = False
    for i, row in enumerate(rows):
        multi = schema == "chat" and (turns == "all" or "tools" in row)
        try:
            if multi:
                msgs, tools, trainable = conversation(row)
                if not checked and (tools or any("tool_calls" in m or m["role"] == "tool" for m in msgs)):
                    check_renders_tools(tokenizer)
                    checked = True
                if turns == "last":  # only the last turn that carries loss
                    last = max((k for k, t in enumerate(trainable) if t), default=None)
                    trainable = [k == last for k in range(len(trainable))]
                if not any(trainable):
                    raise ValueError("no assistant turn carries loss")
                enc = encode_conversation(tokenizer, msgs, tools, trainable)
            else:
                ex = to_example(row, schema, labels, prompt_format)
                enc = encode(tokenizer, ex.messages, ex.target)
        except (KeyError, ValueError) as exc:
            raise InputError(f"row {i} cannot be rendered as a {schema} example: {exc}") from None
        if len(enc.ids) > max_length:
            skipped += 1
            continue
        out.append(enc)
    return out, skipped


def encode_conversation(tokenizer, messages: list[dict], tools, trainable: list[bool]) -> Encoded:
    """The whole conversation as the template renders it; ``loss_at`` = the tokens whose characters lie
    inside a trained assistant turn (``data.chat.turn_spans``: its content, tool calls, end-of-turn)."""
    from ..data.chat import turn_spans

    full, spans = turn_spans(tokenizer, messages, tools, trainable)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    loss_at = tuple(
        t for t, (s, e) in enumerate(offsets) if t > 0 and e > s and any(a <= s and e <= b for a, b in spans)
    )
    if not loss_at:
        raise ValueError("no token of the assistant turns survived tokenisation")
    return Encoded(ids, loss_at[0], loss_at)


# -- data order ----------------------------------------------------------------------------------
def epoch_batches(
    lengths: list[int], global_batch: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The global batches (lists of example indices) of one epoch, a pure function of its arguments."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n).tolist()
    if group_by_length:
        # Sort within windows of 64 steps so a step's examples have similar lengths (balanced
        # micro-batches), then shuffle the steps so lengths do not trend within the epoch.
        window = global_batch * 64
        grouped = []
        for s in range(0, n, window):
            grouped += sorted(order[s : s + window], key=lambda i: -lengths[i])
        order = grouped
    steps = [order[s : s + global_batch] for s in range(0, n, global_batch)]
    if group_by_length:
        perm = rng.permutation(len(steps)).tolist()
        steps = [steps[i] for i in perm]
    return steps


def plan(
    lengths: list[int],
    batch_size: int,
    grad_accum: int,
    epochs: float,
    max_steps: int | None,
    seed: int,
    group_by_length: bool,
) -> list[list[int]]:
    """Every optimiser step's example indices for the whole run."""
    if not lengths:
        raise InputError("no training examples left", hint="check the split and max_length")
    gb = batch_size * grad_accum
    per_epoch = math.ceil(len(lengths) / gb)
    total = max_steps if max_steps is not None else max(1, math.ceil(epochs * per_epoch))
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < total:
        steps += epoch_batches(lengths, gb, seed, epoch, group_by_length)
        epoch += 1
    return steps[:total]


def micro_batches(step: list[int], batch_size: int, lengths: list[int], token_budget: int | None) -> list[list[int]]:
    """Split a step's examples into micro-batches of ``batch_size`` (then by ``token_budget``)."""
    out = []
    for s in range(0, len(step), batch_size):
        mb = step[s : s + batch_size]
        if token_budget is None:
            out.append(mb)
            continue
        cur, used = [], 0
        for i in mb:
            if cur and used + lengths[i] > token_budget:
                out.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += lengths[i]
        if cur:
            out.append(cur)
    return out


# -- collation -----------------------------------------------------------------------------------
def collate_packed(examples: list[Encoded]) -> Batch:
    """One row of concatenated examples; positions restart per example, no padding at all."""
    import torch

    ids, pos, loss_index, targets, cu = [], [], [], [], [0]
    for ex in examples:
        off = len(ids)
        ids += ex.ids
        pos += range(len(ex.ids))
        # position t-1 predicts token t, for every t that carries loss
        at = ex.targets()
        loss_index += [off + t - 1 for t in at]
        targets += [ex.ids[t] for t in at]
        cu.append(len(ids))
    return Batch(
        torch.tensor([ids]), torch.tensor([pos]), torch.tensor(loss_index), torch.tensor(targets), cu, None, len(ids)
    )


def collate_padded(examples: list[Encoded], pad_id: int) -> Batch:
    """The usual padded batch (right padding, attention mask): the reference packing is checked against."""
    import torch

    width = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    loss_index, targets = [], []
    for b, ex in enumerate(examples):
        ids[b, : len(ex.ids)] = torch.tensor(ex.ids)
        mask[b, : len(ex.ids)] = 1
        at = ex.targets()
        loss_index += [b * width + t - 1 for t in at]
        targets += [ex.ids[t] for t in at]
    pos = torch.arange(width).unsqueeze(0).expand(len(examples), -1)
    return Batch(ids, pos, torch.tensor(loss_index), torch.tensor(targets), None, mask, int(mask.sum()))


def collate(examples: list[Encoded], packing: bool, pad_id: int) -> Batch:
    return collate_packed(examples) if packing else collate_padded(examples, pad_id)
