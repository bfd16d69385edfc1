"""Every run ends with a signed checkpoint, by construction (Ledger.run seals; nobody signs by hand)."""

from __future__ import annotations

import pytest

from finetrace.ledger.signing import verify_signature
from finetrace.workspace import Workspace


def _head_is_signed(ws) -> None:
    cp = ws.ledger.checkpoints()[-1]
    assert cp.size == ws.ledger.size() and cp.root == ws.ledger.root().hex()
    verify_signature(ws.public_key, cp.message(), cp.signature, "checkpoint")


def test_a_run_that_succeeds_or_fails_is_sealed(workspace):
    ws = Workspace.open(workspace.root)  # opened afresh: the key is not loaded until a run needs it
    assert ws._keys is None
    with ws.ledger.run("import", config={"n": 1}) as run:
        run.output("dataset", ws.store.put_bytes(b"rows"), name="d")
    _head_is_signed(ws)
    with pytest.raises(RuntimeError, match="boom"):
        with ws.ledger.run("import", config={"n": 2}):
            raise RuntimeError("boom")
    _head_is_signed(ws)
    assert sorted(r.status for r in ws.ledger.runs()) == ["failed", "succeeded"]
    ws.close()


def test_standalone_events_seal_when_asked_and_runs_never_sign_by_hand(workspace):
    n = len(workspace.ledger.checkpoints())
    workspace.ledger.append("note", {"x": 1})
    assert len(workspace.ledger.checkpoints()) == n  # an ordinary event waits for the next seal
    workspace.ledger.append("approval", {"x": 2}, seal=True)
    _head_is_signed(workspace)


def test_no_caller_signs_a_run_by_hand():
    """The manual ``ws.checkpoint()`` after a run is gone: only the proof-needing callers remain."""
    import pathlib
    import re

    import finetrace

    src = pathlib.Path(finetrace.__file__).parent
    calls = sorted(
        str(p.relative_to(src)) for p in src.rglob("*.py") if re.search(r"\bws\.checkpoint\(\)", p.read_text("utf-8"))
    )
    assert calls == ["audit/bundle.py", "cli/ledger.py", "market/client.py"]
