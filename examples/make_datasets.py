"""Generate the two bundled domain datasets, deterministically (seeded), licence-clean (all synthetic).

    python examples/make_datasets.py            # writes examples/<task>/{train.csv,test.csv}

Each task folder also holds (hand-written, not generated) ``datasheet.yaml``, ``intended_use.yaml``,
``suite.yaml`` (eval suite with gates), ``train.yaml`` and ``pipeline.yaml``:
``finetrace run examples/<task>/pipeline.yaml`` runs everything.

1. ``clauses``: regulatory/contract clause identification for a compliance team. Each row is one contract
   clause written from templates with varied parties, amounts, periods and jurisdictions; the label is the
   clause type. ``group`` is the jurisdiction (for disaggregated metrics).
2. ``tickets``: customer-support ticket routing. Each row is a ticket; the label is the team that must
   handle it. ``group`` is the customer's region.

The texts are generated, so they contain no personal data; the person names used are common given names
(shipped with the bias suite too) combined with invented surnames.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

FIRST = ["Maria", "James", "Aisha", "Wei", "Olga", "Carlos", "Fatima", "John", "Priya", "Lukas", "Emma",
         "Mohammed", "Sofia", "Kenji", "Amara", "Daniel"]
LAST = ["Hartwell", "Okafor", "Lindqvist", "Moreau", "Castellano", "Brandt", "Nakamura", "Osei", "Varga",
        "Delacroix"]
COMPANIES = ["Northwind Logistics", "Helios Analytics", "Bluefin Capital", "Arcadia Health", "Quanta Retail",
             "Meridian Foods", "Solstice Energy", "Vantage Legal", "Orion Telecom", "Cobalt Insurance"]
JURIS = {"EU": ["Germany", "France", "the Netherlands", "Ireland"], "UK": ["England and Wales", "Scotland"],
         "US": ["the State of New York", "the State of Delaware", "the State of California"]}

CLAUSES = {
    "termination": [
        "Either party may terminate this Agreement upon {days} days' written notice to the other party.",
        "{a} may terminate this Agreement with immediate effect if {b} commits a material breach and fails to remedy it within {days} days.",
        "This Agreement shall terminate automatically if either party becomes insolvent or enters into liquidation.",
        "Upon expiry of the initial term of {years} years, {a} may end the contract by giving {days} days' notice.",
    ],
    "liability": [
        "The total liability of {a} under this Agreement shall not exceed {amount} in any calendar year.",
        "Neither party shall be liable for any indirect, incidental or consequential damages, including loss of profits.",
        "{a} shall indemnify {b} against all losses arising from any breach of its warranties, up to {amount}.",
        "Nothing in this Agreement limits liability for death or personal injury caused by negligence.",
    ],
    "confidentiality": [
        "{b} shall keep all Confidential Information of {a} secret and shall not disclose it to any third party.",
        "The obligations of confidentiality shall survive termination of this Agreement for {years} years.",
        "Confidential Information may be disclosed only to employees who need to know it and are bound by equivalent duties of secrecy.",
        "Each party shall return or destroy the other party's confidential materials within {days} days of a written request.",
    ],
    "data_protection": [
        "{b} shall process personal data only on documented instructions from {a} and in accordance with applicable data protection law.",
        "{b} shall notify {a} of any personal data breach without undue delay and in any event within {hours} hours.",
        "Personal data shall not be transferred outside {region} without appropriate safeguards.",
        "{b} shall implement appropriate technical and organisational measures to protect personal data against unauthorised processing.",
    ],
    "payment": [
        "{a} shall pay each invoice within {days} days of receipt by bank transfer.",
        "Late payments shall bear interest at {rate} percent per annum above the base rate.",
        "The fees of {amount} are payable quarterly in advance and are exclusive of VAT.",
        "{b} may suspend the services if any undisputed invoice remains unpaid for more than {days} days.",
    ],
    "governing_law": [
        "This Agreement shall be governed by and construed in accordance with the laws of {juris}.",
        "The courts of {juris} shall have exclusive jurisdiction over any dispute arising out of this Agreement.",
        "Any dispute shall be finally settled by arbitration seated in {juris} under the rules then in force.",
        "The parties submit to the non-exclusive jurisdiction of the courts of {juris}.",
    ],
}

TICKETS = {
    "billing": [
        "Hi, I was charged twice for my {plan} subscription this month. Can you refund the extra {amount}?",
        "My invoice {ref} shows the wrong VAT number, please issue a corrected invoice.",
        "Why did my bill go up to {amount}? I did not change my {plan} plan.",
        "I need a copy of all invoices from last year for our accountant, order {ref}.",
    ],
    "technical": [
        "The app crashes every time I open the {feature} page on my phone.",
        "I get error {code} when I try to sync my data since this morning.",
        "Your API returns a timeout for the {feature} endpoint, our integration is down.",
        "The {feature} export produces an empty file, can someone look at it?",
    ],
    "account": [
        "I can't log in, the password reset email never arrives. My username is {user}.",
        "Please add my colleague {name} as an administrator on our company account.",
        "How do I change the email address on my account to a new one?",
        "I want to close my account and delete my profile, user {user}.",
    ],
    "shipping": [
        "My order {ref} was supposed to arrive on {day} but the tracking has not moved.",
        "The parcel for order {ref} arrived damaged, the box was crushed.",
        "Can I change the delivery address for order {ref} before it ships?",
        "I received the wrong item in order {ref}, I ordered the {plan} kit.",
    ],
}
REGIONS = ["EU", "NA", "APAC"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def clause_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    labels = sorted(CLAUSES)
    for i in range(n):
        label = labels[i % len(labels)]
        region = rng.choice(sorted(JURIS))
        a, b = rng.sample(COMPANIES, 2)
        if rng.random() < 0.3:
            a = person(rng)
        text = rng.choice(CLAUSES[label]).format(
            a=a, b=b, days=rng.choice([7, 14, 30, 60, 90]), years=rng.choice([1, 2, 3, 5]),
            amount=f"{rng.choice(['EUR', 'USD', 'GBP'])} {rng.randrange(10, 900) * 1000:,}",
            hours=rng.choice([24, 48, 72]), rate=rng.choice([2, 4, 5, 8]), juris=rng.choice(JURIS[region]),
            region={"EU": "the European Economic Area", "UK": "the United Kingdom", "US": "the United States"}[region])
        text = f"{rng.randrange(2, 25)}.{rng.randrange(1, 9)} {text}"  # clause numbers, as in real contracts
        rows.append({"id": f"clause-{i:05d}", "text": text, "label": label, "group": region})
    rng.shuffle(rows)
    return rows


def ticket_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    labels = sorted(TICKETS)
    for i in range(n):
        label = labels[i % len(labels)]
        text = rng.choice(TICKETS[label]).format(
            plan=rng.choice(["Basic", "Pro", "Team", "Enterprise"]), amount=f"${rng.randrange(5, 300)}",
            ref=f"#{rng.randrange(100000, 999999)}", feature=rng.choice(["reports", "calendar", "inventory", "dashboard"]),
            code=rng.choice(["E401", "E503", "SYNC-17", "0x80040154"]), user=f"user{rng.randrange(1000, 9999)}",
            name=person(rng), day=rng.choice(["Monday", "Tuesday", "Friday", "the 12th"]))
        text = f"{rng.choice(['Hello,', 'Hi team,', 'Good morning,', 'Dear support,', ''])} {text} " \
               f"{rng.choice(['Thanks', 'Regards', 'Best', 'Cheers'])}, {rng.choice(FIRST)}".strip()
        rows.append({"id": f"ticket-{i:05d}", "text": text, "label": label, "group": rng.choice(REGIONS)})
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: list[dict], group: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["id", "text", "label"] + (["group"] if group else [])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(out: Path = HERE) -> None:
    for task, make, n_train, n_test in (("clauses", clause_rows, 480, 120), ("tickets", ticket_rows, 400, 120)):
        rng = random.Random(f"finetrace-{task}")
        rows = make(n_train + n_test, rng)
        # The data stage treats `group` as a unit that must not straddle splits (and drops training rows
        # that share a group with a held-out test file), while evaluation uses it to disaggregate
        # metrics. So only the held-out test file carries the group (region), for the group-gap gate.
        write_csv(out / task / "train.csv", rows[:n_train], group=False)
        write_csv(out / task / "test.csv", rows[n_train:])


if __name__ == "__main__":
    main()
