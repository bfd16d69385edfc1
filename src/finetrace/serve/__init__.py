"""Serving: an OpenAI-compatible HTTP server with many LoRA adapters on one base, provenance on every answer.

    engine.py      the model, adapters, request queue and scheduler (no HTTP); decodes through finetrace.decoding
    lora_batch.py  re-exports gathered LoRA (now finetrace.decoding.lora, shared with evaluation)
    parity.py      served answers vs the eval report's recorded answers (`finetrace parity`, deploy gate)
    registry.py    which adapters may be served on which base (digest, identity, eval gates)
    requestlog.py  `serve.request` ledger events, batched by a background writer
    provenance.py  provenance id -> deployment, adapter, training run, datasets, eval, approvals
    metrics.py     Prometheus text metrics
    settings.py    ServeSettings (what the CLI flags fill)
    protocol.py    OpenAI request models and error bodies
    app.py         create_app(engine, settings): the FastAPI routes (errors, keys, health, provenance, admin)
    engines/       llama.cpp and vLLM behind the same gateway (GatewayEngine), open_engine(--engine)
    gguf_export.py GGUF export of a base, and of a LoRA adapter as llama.cpp's converter writes it
    server.py      run a uvicorn server (foreground, or in a thread for tests and benchmarks)
    export.py      merged safetensors export of an adapter (+ notes on vLLM / LoRAX)

Deployment decisions (see registry.py): an adapter is served only if it is recorded in the workspace and
re-hashes to its digest, was trained on the running base (digest) with the same tokenizer and chat
template, and its eval gates passed or were overridden by a named person. An adapter never evaluated
is served with a logged warning, or refused under ``--require-eval``.
"""
