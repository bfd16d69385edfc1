"""Serving settings: one typed object that the CLI flags fill and the app, engine and tests read."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    """Interface to listen on; keep loopback unless a proxy with TLS sits in front."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    api_keys: list[str] = field(default_factory=list)
    """Bearer keys accepted on /v1 and /metrics; empty means an open server (a warning is logged)."""
    admin_key: str | None = None
    """Bearer key for /admin (hot load/unload); without it the admin endpoints answer 403."""
    log_content: bool = False
    """Store full prompt and answer text in the ledger events (default: SHA-256 digests only)."""
    max_queue: int = 64
    """Requests waiting for a batch slot; one more is answered 429 (back-pressure, bounded memory)."""
    max_batch: int = 16
    """Rows decoded together in one forward pass (requests for any mix of adapters)."""
    require_eval: bool = False
    """Refuse adapters with no recorded eval verdict (default: serve them and log a warning)."""
    default_max_tokens: int = 256
    """``max_tokens`` when a request gives none."""
    max_tokens_limit: int = 4096
    """Largest ``max_tokens`` a request may ask for."""
    lora_kernel: str = "gathered"
    """How mixed-adapter batches apply LoRA: ``gathered`` (batched matmuls over stacked adapters, cost
    independent of the number of adapters) or ``peft`` (PEFT's per-adapter loop over row groups)."""
    prefix_cache_mb: int = 256
    """Memory for the keys and values of prompts already read (``decoding/prefix.py``): a later prompt
    on the same adapter that starts alike (a system turn, instructions, earlier turns) skips the shared
    part. 0 turns it off."""
    log_flush_s: float = 0.2
    """How often the background writer appends the batched ``serve.request`` events."""
    drain_s: float = 30.0
    """On shutdown (SIGTERM/SIGINT): seconds to let in-flight and queued requests finish; what is still
    running then is answered 503 ``shutting_down``. A second signal stops at once (deploy: interrupted)."""
    ledger_timeout_s: float = 5.0
    """How long one ledger write may wait for a lock (or be retried) before the events it carries are
    written to ``spill/`` in the workspace instead, with a warning: shutdown never waits on a ledger."""
    max_request_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted; a larger one is answered 413 before it is parsed or tokenised."""

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ConfigError("must be at least 1", field="--max-queue")
        if self.prefix_cache_mb < 0:
            raise ConfigError("must be 0 (off) or more", field="--prefix-cache-mb")
        if self.max_batch < 1:
            raise ConfigError("must be at least 1", field="--max-batch")
        if self.lora_kernel not in ("gathered", "peft"):
            raise ConfigError(
                f"unknown LoRA kernel {self.lora_kernel!r}; use 'gathered' or 'peft'", field="--lora-kernel"
            )
        for name, flag in (("drain_s", "--drain-s"), ("ledger_timeout_s", "--ledger-timeout-s")):
            v = getattr(self, name)
            if not 0 <= v <= 3600:
                raise ConfigError(f"must be between 0 and 3600 seconds, got {v}", field=flag)
        if not 1024 <= self.max_request_bytes <= 2**31:
            raise ConfigError(
                f"must be between 1024 and 2**31 bytes, got {self.max_request_bytes}", field="--max-request-bytes"
            )
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is out of range", field="--port")

    def public(self) -> dict:
        """The settings as recorded in the deploy run: everything except the secrets."""
        return {
            "host": self.host,
            "port": self.port,
            "auth": bool(self.api_keys),
            "admin": bool(self.admin_key),
            "log_content": self.log_content,
            "max_queue": self.max_queue,
            "max_batch": self.max_batch,
            "require_eval": self.require_eval,
            "default_max_tokens": self.default_max_tokens,
            "max_tokens_limit": self.max_tokens_limit,
            "lora_kernel": self.lora_kernel,
            "drain_s": self.drain_s,
            "ledger_timeout_s": self.ledger_timeout_s,
            "max_request_bytes": self.max_request_bytes,
        }
