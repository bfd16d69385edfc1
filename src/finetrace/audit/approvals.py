"""``finetrace approve``: a signed, dated approval of an adapter's evaluation report by a named person.

Annex IV 2(g) asks for test reports "dated and signed by the responsible persons". An approval is a
ledger event ``approval`` with data ``{adapter, report, by, note, date, key_id, signature}``; the
signature is Ed25519 (workspace key) over the canonical JSON of ``approval_message`` (format, adapter,
report, by, note, date). Serving resolves provenance to approvals through this event type, and the
bundle verifier re-checks every signature offline.
"""

from __future__ import annotations

from ..canonical import canonical_json
from ..errors import InputError, NotFoundError
from ..ledger.log import Entry, now
from ..workspace import Workspace

FORMAT = "finetrace-approval/1"


def approval_message(data: dict) -> bytes:
    """The exact bytes an approval's signature covers."""
    return canonical_json(
        {
            "format": FORMAT,
            "adapter": data["adapter"],
            "report": data["report"],
            "by": data["by"],
            "note": data["note"],
            "date": data["date"],
        }
    )


def approve(ws: Workspace, adapter_ref: str, by: str, note: str, report_ref: str | None = None) -> Entry:
    """Record ``by``'s signed approval of the adapter's latest eval report (or ``report_ref``).

    Raises InputError without a name or note, NotFoundError when the adapter has no eval report.
    """
    if not by or not by.strip():
        raise InputError("an approval needs the name of the responsible person", field="--as", hint="--as 'Full Name'")
    if not note or not note.strip():
        raise InputError("an approval needs a note saying what was checked", field="--note")
    led = ws.ledger
    adapter = led.resolve(adapter_ref)
    if adapter.kind not in ("adapter", "model"):
        raise InputError(f"{adapter_ref} is a {adapter.kind}, not an adapter")
    if report_ref:
        report = led.resolve(report_ref, kind="eval_report")
        if adapter.digest not in ((report.metadata or {}).get("adapters") or []):
            raise InputError(
                f"report {report.ref} does not evaluate {adapter.ref}",
                hint="pass the report of an evaluation of this adapter",
            )
    else:
        reports = [
            a for a in led.artifacts("eval_report") if adapter.digest in ((a.metadata or {}).get("adapters") or [])
        ]
        if not reports:
            raise NotFoundError(
                f"{adapter.ref} has no evaluation report to approve",
                hint=f"run `finetrace eval --adapter {adapter.ref}` first",
            )
        report = reports[-1]
    data = {
        "adapter": adapter.digest,
        "adapter_ref": adapter.ref,
        "report": report.digest,
        "report_ref": report.ref,
        "by": by.strip(),
        "note": note.strip(),
        "date": now(),
    }
    keys = ws.keys
    data["key_id"] = keys.key_id
    data["signature"] = keys.sign(approval_message(data))
    entry = led.append("approval", data, who=data["by"], seal=True)
    return entry


def approvals(ws: Workspace, adapter_digest: str) -> list[Entry]:
    return [e for e in ws.ledger.entries(type="approval") if e.data.get("adapter") == adapter_digest]
