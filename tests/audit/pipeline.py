"""A real pipeline on the tiny model, shared by the audit tests: import -> train -> evaluate -> gate.

Every document, attestation and bundle in these tests is generated from what this records, through
the stages' public entry points (``import_dataset``, ``train``, ``evaluate``), never from hand-written
ledger entries.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

ROUTES = {"billing": "invoice", "technical": "crash", "account": "password"}
FILLER = ["the", "my", "a", "again", "today", "please", "help", "now"]
GROUPS = ["web", "phone"]

DATASHEET = """\
title: Support routing tickets
source: Example Corp helpdesk export (tickets.example.com)
owner: Example Corp support operations
license: CC-BY-4.0
collection_method: export of closed tickets, subject line only
collection_period: 2024-01 to 2024-06
annotation_process: queue assigned by the resolving agent, spot-checked by a lead
personal_data: false
copyrighted: false
purchased_or_licensed: false
synthetic: true
intended_use: routing support tickets to the right queue
known_limitations: English only; short subjects
"""

INTENDED_USE = """\
intended_use: Route English customer-support tickets to billing, technical or account queues.
intended_users: Support operations staff at Example Corp.
out_of_scope_use: Any decision about a person; languages other than English.
limitations: Trained on short synthetic subjects; unreliable on long or mixed-topic tickets.
provider: Example Corp AI team, ai@example.com
license: apache-2.0
human_oversight: Agents see the suggested queue and can reassign every ticket.
"""


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(sorted(ROUTES))
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
        out.append(
            {
                "id": f"t{seed}-{i}",
                "text": f"order {rng.randint(100, 999)}: {' '.join(words)} {ROUTES[label]}",
                "label": label,
                "group": GROUPS[i % 2],
            }
        )
    return out


def write_csv(path: Path, data: list[dict]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(data[0]))
        w.writeheader()
        w.writerows(data)
    return path


SUITE = {
    "name": "routing",
    "split": "test",
    "metrics": ["accuracy"],
    "scoring": "constrained",
    "bootstrap": {"samples": 100, "seed": 0},
    "bias": {"enabled": True, "categories": ["gender_names"], "max_examples": 4},
    "forgetting": {"enabled": False},
    "gates": {"min_metric": {"accuracy": 0.0}, "max_flip_rate": 1.0},
}


def build(ws, model_dir: Path, tmp: Path) -> dict:
    """Record a base model, a dataset with a datasheet, a trained adapter and an evaluation."""
    from finetrace.data import import_dataset
    from finetrace.evaluate import Suite, evaluate
    from finetrace.models import add_folder
    from finetrace.train import TrainConfig, train

    tmp.mkdir(parents=True, exist_ok=True)
    base = add_folder(ws, model_dir, "tiny")
    sheet = tmp / "datasheet.yaml"
    sheet.write_text(DATASHEET)
    data = import_dataset(
        ws,
        [write_csv(tmp / "tickets.csv", rows(40, 0))],
        "tickets",
        schema="classification",
        datasheet=sheet,
        splits=(0.7, 0.1, 0.2),
        seed=0,
        near_dup_threshold=1.0,
    )
    cfg = TrainConfig(
        base_model="tiny",
        dataset=data.ref,
        output_name="routing-lora",
        batch_size=4,
        max_steps=3,
        lr=5e-3,
        checkpoint_every=None,
        seed=0,
        threads=1,
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    adapter = train(ws, cfg, progress=False)
    report = evaluate(
        ws, "tiny", f"{data.ref}:test", adapter_ref=adapter.ref, suite=Suite.model_validate(SUITE), name="routing-eval"
    )
    intended = tmp / "intended_use.yaml"
    intended.write_text(INTENDED_USE)
    return {"base": base, "data": data, "adapter": adapter, "report": report, "intended_use": intended}
