"""``finetrace market ...``: run a registry (serve, add-user, add-base) and use one (publish, search, pull)."""

from __future__ import annotations

import typer

from ..errors import InputError
from .common import JSON_OPTION, emit_json, open_workspace

DB_OPTION = typer.Option(
    "sqlite:///registry.db",
    "--db",
    envvar="FINETRACE_MARKET_DB",
    help="SQLAlchemy URL of the registry database (sqlite:///PATH or postgresql+psycopg://...).",
)
STORE_OPTION = typer.Option(
    "registry-objects", "--store", envvar="FINETRACE_MARKET_STORE", help="Folder of the registry's object store."
)
REGISTRY_OPTION = typer.Option(..., "--registry", envvar="FINETRACE_REGISTRY", help="Registry URL.")


def _settings(db: str, store: str, allow_modules_to_save: bool = False, max_rank: int | None = None):
    from ..market.checks import Limits
    from ..market.registry import Settings

    limits = Limits(allow_modules_to_save=allow_modules_to_save, **({"max_rank": max_rank} if max_rank else {}))
    return Settings(db_url=db, store=store, limits=limits)


def _kv(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k or not v:
            raise InputError(f"expected KIND=PATH, got {it!r}", field=flag)
        out[k.strip()] = v.strip()
    return out


def serve_cmd(
    db: str = DB_OPTION,
    store: str = STORE_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8700, "--port", help="TCP port."),
    allow_modules_to_save: bool = typer.Option(
        False, "--allow-modules-to-save", help="Accept full layers inside adapters."
    ),
    max_rank: int = typer.Option(None, "--max-rank", help="Largest LoRA rank accepted (default 256)."),
):
    """Run the registry (API + web pages)."""
    from ..market.server import serve

    serve(_settings(db, store, allow_modules_to_save, max_rank), host, port)


def add_user_cmd(
    name: str = typer.Argument(..., help="Account name (also its first namespace)."),
    namespace: list[str] = typer.Option([], "--namespace", help="Further namespace it owns."),
    admin: bool = typer.Option(False, "--admin", help="Mark the account as admin."),
    db: str = DB_OPTION,
    store: str = STORE_OPTION,
):
    """Create an account and print its API token (once: only its hash is kept)."""
    from ..market.registry import Registry

    reg = Registry(_settings(db, store))
    try:
        token = reg.add_user(name, namespace, admin)
    finally:
        reg.close()
    typer.echo(token)


def add_base_cmd(
    base: str = typer.Argument(..., help="Base model in the current workspace (name or digest)."),
    db: str = DB_OPTION,
    store: str = STORE_OPTION,
):
    """Register a base model's tensor shape map with the registry (it then overrides publishers' maps)."""
    from ..market.checks import base_shapes_from_folder
    from ..market.registry import Registry
    from ..models import model_path

    folder, art = model_path(open_workspace(), base)
    reg = Registry(_settings(db, store))
    try:
        reg.add_base(art.ref, art.digest, base_shapes_from_folder(folder))
    finally:
        reg.close()
    typer.echo(f"registered {art.ref} ({art.digest})")


# duplicates: alike export_hub_cmd on purpose (the --json or text output of two commands).
def publish_cmd(
    adapter: str = typer.Argument(..., help="Adapter NAME@V (or digest) in this workspace."),
    to: str = typer.Option(..., "--to", help="Target namespace/name@version."),
    registry: str = REGISTRY_OPTION,
    token: str = typer.Option(..., "--token", envvar="FINETRACE_MARKET_TOKEN", help="API token."),
    license_id: str = typer.Option("Apache-2.0", "--license", help="SPDX id, or 'custom'."),
    license_file: str = typer.Option(None, "--license-terms", help="File with custom licence terms."),
    domain: list[str] = typer.Option([], "--domain", help="Domain tag (repeatable)."),
    task: list[str] = typer.Option([], "--task", help="Task tag (repeatable)."),
    description: str = typer.Option("", "--description", help="One paragraph for buyers."),
    document: list[str] = typer.Option([], "--document", help="KIND=PATH (model_card, annex_iv, ab2013)."),
    attestation: str = typer.Option(None, "--attestation", help="DSSE envelope file."),
    min_serve_agreement: float = typer.Option(
        None,
        "--min-serve-agreement",
        min=0.0,
        max=1.0,
        help="Refuse below this parity (served vs evaluated answers; default 1.0, token-exact).",
    ),
    json_out: bool = JSON_OPTION,
):
    """Sign and upload an adapter with its evidence (refused locally if gates or documents are missing)."""
    from pathlib import Path

    from ..market.client import publish

    terms = Path(license_file).read_text("utf-8") if license_file else None
    if license_id == "custom" and not terms:
        raise InputError("a custom licence needs its terms", field="--license-terms")
    res = publish(
        open_workspace(),
        adapter,
        to,
        registry,
        token,
        license_id=license_id,
        license_terms=terms,
        domain=domain,
        task=task,
        description=description,
        documents=_kv(document, "--document"),
        attestation=attestation,
        min_serve_agreement=min_serve_agreement,
    )
    if json_out:
        emit_json(res)
    else:
        typer.echo(f"{res['status']} {res['ref']} ({res['digest']}, {res['uploaded']} objects sent)")


def search_cmd(
    query: str = typer.Argument("", help="Words to find in names, descriptions and model cards."),
    registry: str = REGISTRY_OPTION,
    domain: str = typer.Option(None, "--domain"),
    task: str = typer.Option(None, "--task"),
    base: str = typer.Option(None, "--base", help="Base model name or digest."),
    license_id: str = typer.Option(None, "--license"),
    min_metric: list[str] = typer.Option([], "--min-metric", help="e.g. accuracy>=0.9 (repeatable)."),
    sort: str = typer.Option(None, "--sort", help="downloads | recent | score | relevance."),
    verified: bool = typer.Option(
        None, "--verified/--unverified", help="Only packages whose badge is (or is not) verified."
    ),
    cursor: str = typer.Option(None, "--cursor", help="`next` of the previous page (keyset paging)."),
    limit: int = typer.Option(20, "--limit"),
    json_out: bool = JSON_OPTION,
):
    """Find packages."""
    from ..market.client import search

    res = search(
        registry,
        query,
        domain=domain,
        task=task,
        base=base,
        license=license_id,
        min_metric=min_metric,
        sort=sort,
        limit=limit,
        verified=verified,
        cursor=cursor,
    )
    if json_out:
        emit_json(res)
        return
    for r in res["results"]:
        score = f" score {r['score']:.3f}" if r["score"] is not None else ""
        typer.echo(f"{r['ref']:40} {r['license']:12} {r['downloads']:>6} dl{score}  {r['description'][:60]}")
    if not res["results"]:
        typer.echo("no packages match")
    if res.get("next"):
        typer.echo(f"more: --cursor {res['next']}")


def pull_cmd(
    ref: str = typer.Argument(..., help="namespace/name@version"),
    registry: str = REGISTRY_OPTION,
    trust_key: list[str] = typer.Option([], "--trust-key", help="Publisher key id you trust (repeatable)."),
    accept_license: bool = typer.Option(False, "--accept-license", help="Accept non-open licence terms."),
    name: str = typer.Option(None, "--name", help="Local adapter name (default namespace/name)."),
    allow_yanked: bool = typer.Option(False, "--allow-yanked", help="Pull a version its publisher yanked."),
    allow_template_change: bool = typer.Option(
        False, "--allow-template-change", help="Accept a chat template that differs from the base's."
    ),
    json_out: bool = JSON_OPTION,
):
    """Download, verify and record an adapter; then use it with train (init_from), eval and serve."""
    from ..market.client import pull

    art = pull(
        open_workspace(),
        ref,
        registry,
        trust_keys=trust_key,
        accept_license=accept_license,
        name=name,
        allow_yanked=allow_yanked,
        allow_template_change=allow_template_change,
    )
    if json_out:
        emit_json(art.to_dict())
    else:
        typer.echo(f"pulled {ref} as {art.ref} ({art.digest})")


def versions_cmd(
    ref: str = typer.Argument(..., help="namespace/name"), registry: str = REGISTRY_OPTION, json_out: bool = JSON_OPTION
):
    """List every version of a package: digest, downloads, yanked, latest."""
    from ..market.client import versions

    res = versions(registry, ref)
    if json_out:
        emit_json(res)
        return
    for v in res["versions"]:
        flags = " latest" if v["latest"] else ""
        flags += f" YANKED ({v['yanked_reason'] or 'no reason'})" if v["yanked"] else ""
        typer.echo(f"{v['version']:12} {v['downloads']:>6} dl  {v['digest'][:23]}  {v['created'][:19]}{flags}")


def yank_cmd(
    ref: str = typer.Argument(..., help="namespace/name@version"),
    registry: str = REGISTRY_OPTION,
    token: str = typer.Option(..., "--token", envvar="FINETRACE_MARKET_TOKEN", help="API token."),
    reason: str = typer.Option("", "--reason", help="Why (shown to buyers)."),
    undo: bool = typer.Option(False, "--undo", help="Restore a yanked version."),
    json_out: bool = JSON_OPTION,
):
    """Yank a version: still served and verifiable by exact version, never pulled by default."""
    from ..market.client import yank

    res = yank(registry, token, ref, reason, undo)
    if json_out:
        emit_json(res)
    else:
        typer.echo(f"{'yanked' if res['yanked'] else 'restored'} {res['ref']} ({res['digest']})")


def gc_cmd(
    db: str = DB_OPTION,
    store: str = STORE_OPTION,
    max_age: float = typer.Option(24.0, "--max-age-hours", help="Drop uploads older than this."),
    json_out: bool = JSON_OPTION,
):
    """Remove uploads never committed within the deadline (each removal is a registry ledger event)."""
    from ..market.lifecycle import gc_staging
    from ..market.registry import Registry

    reg = Registry(_settings(db, store))
    try:
        removed = gc_staging(reg, max_age * 3600)
    finally:
        reg.close()
    if json_out:
        emit_json({"removed": removed})
    else:
        typer.echo(f"removed {len(removed)} stale upload(s), {sum(r['bytes'] for r in removed)} bytes")


# duplicates: alike publish_cmd on purpose (the --json or text output of two commands).
def export_hub_cmd(
    adapter: str = typer.Argument(..., help="Adapter NAME@V (or digest) in this workspace."),
    folder: str = typer.Argument(..., help="New or empty folder to write."),
    target: str = typer.Option(None, "--as", help="Package namespace/name@version (default local/NAME@V)."),
    license_id: str = typer.Option("Apache-2.0", "--license", help="SPDX id."),
    domain: list[str] = typer.Option([], "--domain", help="Domain tag (repeatable)."),
    task: list[str] = typer.Option([], "--task", help="Task tag (repeatable)."),
    description: str = typer.Option("", "--description", help="One paragraph for buyers."),
    json_out: bool = JSON_OPTION,
):
    """Write an adapter as a Hugging Face Hub model folder: card metadata, adapter, eval results, signed evidence."""
    from ..market.hub import export_hub

    if not target:
        name, _, version = adapter.partition("@")
        target = f"local/{name.split('/')[-1].lower()}@{version or '1'}"
    res = export_hub(
        open_workspace(),
        adapter,
        folder,
        target,
        license_id=license_id,
        domain=domain,
        task=task,
        description=description,
    )
    if json_out:
        emit_json(res)
    else:
        typer.echo(f"wrote {len(res['files'])} files to {res['folder']} (package {res['manifest_digest']})")


def import_hub_cmd(
    folder: str = typer.Argument(..., help="A Hub model folder (local)."),
    trust_key: list[str] = typer.Option([], "--trust-key", help="Publisher key id you trust."),
    name: str = typer.Option(None, "--name", help="Local adapter name."),
    allow_template_change: bool = typer.Option(
        False, "--allow-template-change", help="Accept tokenizer/chat-template changes."
    ),
    json_out: bool = JSON_OPTION,
):
    """Record the adapter of a Hub folder, verifying its signed finetrace evidence where present."""
    from ..market.hub import import_hub

    art, facts = import_hub(
        open_workspace(), folder, trust_keys=trust_key, name=name, allow_template_change=allow_template_change
    )
    if json_out:
        emit_json({"adapter": art.to_dict(), "facts": facts})
    else:
        state = "verified" if facts["verified"] else f"UNVERIFIED ({', '.join(facts['unverified'])})"
        typer.echo(f"imported {art.ref} ({art.digest}), {state}")


def register(app: typer.Typer) -> None:
    """Add the ``market`` command group to ``app``."""
    market = typer.Typer(no_args_is_help=True, help="Publish, discover and pull adapters with their evidence.")
    app.add_typer(market, name="market")
    market.command("serve")(serve_cmd)
    market.command("add-user")(add_user_cmd)
    market.command("add-base")(add_base_cmd)
    market.command("publish")(publish_cmd)
    market.command("search")(search_cmd)
    market.command("pull")(pull_cmd)
    market.command("versions")(versions_cmd)
    market.command("yank")(yank_cmd)
    market.command("gc-staging")(gc_cmd)
    market.command("export-hub")(export_hub_cmd)
    market.command("import-hub")(import_hub_cmd)
