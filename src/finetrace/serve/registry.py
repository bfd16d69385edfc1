"""Which adapters may be served on which base: digest, base, text identity and eval-gate checks.

An adapter is served only when all of these hold (each failure is a ``DeploymentRefused`` naming why):

- it is an ``adapter`` artifact recorded in this workspace, and its folder re-hashes to its digest
  (``store.materialize`` verifies every file) and holds ``adapter_model.safetensors`` (no pickle);
- its recorded ``base_model`` digest is the running base's digest;
- its recorded text identity (tokenizer, chat template, end-of-turn token) matches the running base, and
  any tokenizer file or chat template in its folder is the base's known-good one
  (``models.template_check``, the marketplace's rule too); a difference is refused with the difference
  shown, unless the caller allows it explicitly (``allow_template_change``; nothing an adapter's own
  metadata says allows it);
- its eval gates passed, or failed with a recorded override. An adapter with no verdict at all
  ("unevaluated") is served with a warning in the log, or refused when ``require_eval`` is set.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetraceError
from ..ledger import Artifact
from ..ledger.clearance import Clearance, clearance
from ..models import template_check
from ..workspace import Workspace

log = logging.getLogger("finetrace.serve")

IDENTITY_KEYS = ("tokenizer_sha256", "chat_template_sha256", "eos_token", "eos_token_id")


class DeploymentRefused(FinetraceError):
    """An adapter that must not be served on this base (wrong base, identity, failed gates)."""

    exit_code = 4


@dataclass
class AdapterInfo:
    artifact: Artifact
    path: Path
    clearance: Clearance

    @property
    def digest(self) -> str:
        return self.artifact.digest

    @property
    def ref(self) -> str:
        return self.artifact.ref


def recorded_identity(meta: dict, folder: Path | None = None) -> dict:
    """The text identity recorded for an adapter: artifact metadata, else ``finetrace_adapter.json``."""
    for key in ("identity", "text_identity"):
        if isinstance(meta.get(key), dict):
            return {k: v for k, v in meta[key].items() if k in IDENTITY_KEYS}
    found = {k: meta[k] for k in IDENTITY_KEYS if k in meta}
    if not found and folder is not None and (folder / "finetrace_adapter.json").is_file():
        doc = json.loads((folder / "finetrace_adapter.json").read_text())
        return recorded_identity(doc)
    return found


def check_adapter(
    ws: Workspace,
    ref: str,
    base: Artifact,
    base_identity: dict,
    require_eval: bool = False,
    allow_template_change: bool = False,
) -> AdapterInfo:
    """Resolve ``ref`` (NAME, NAME@V or digest) to a verified adapter servable on ``base``, or refuse.
    ``allow_template_change``: serve it although its tokenizer or chat template differs from the base's
    (logged with the difference)."""
    art = ws.ledger.resolve(ref, kind="adapter")
    folder = ws.store.materialize(art.digest)
    if not (folder / "adapter_model.safetensors").is_file() or not (folder / "adapter_config.json").is_file():
        raise DeploymentRefused(
            f"adapter {art.ref} ({art.digest}) has no adapter_model.safetensors + adapter_config.json",
            hint="only PEFT adapters in safetensors format are served",
        )
    meta = art.metadata
    recorded_base = meta.get("base_model")
    if recorded_base != base.digest:
        raise DeploymentRefused(
            f"adapter {art.ref} was trained on base {recorded_base or '(not recorded)'}, not on the running "
            f"base {base.ref} ({base.digest})",
            hint="serve it with --base set to the base it was trained on",
        )
    expected = recorded_identity(meta, folder)
    if not expected:
        raise DeploymentRefused(
            f"adapter {art.ref} records no tokenizer/chat-template identity",
            hint="retrain it with this finetrace, which records the identity",
        )
    diffs = template_check.check_serving(
        folder,
        template_check.base_files(ws.store, base.digest),
        expected,
        base_identity,
        allow=allow_template_change,
        what=f"adapter {art.ref} ({art.digest})",
        error=DeploymentRefused,
        hint="retrain the adapter on this base, or, if the change is intended, allow it explicitly "
        "(allow_template_change)",
    )
    if diffs:
        log.warning(
            "serving adapter %s (%s) with a tokenizer/chat template unlike the base's (allowed):\n%s",
            art.ref,
            art.digest,
            "\n".join(f"{d['file']}:\n{d['diff']}" for d in diffs),
        )
    clear = clearance(ws.ledger, art.digest)
    if clear.status == "failed":
        raise DeploymentRefused(
            f"adapter {art.ref} is refused: {clear.detail}",
            hint="fix and re-evaluate it, or record an override: `finetrace override ADAPTER@V --as NAME --reason ...`",
        )
    if clear.status == "unevaluated":
        if require_eval:
            raise DeploymentRefused(
                f"adapter {art.ref} has no eval verdict and --require-eval is set",
                hint="run `finetrace eval` on it first",
            )
        log.warning("serving unevaluated adapter %s (%s): %s", art.ref, art.digest, clear.detail)
    return AdapterInfo(art, folder, clear)
