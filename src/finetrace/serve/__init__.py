"""Serving: an OpenAI-compatible HTTP server with many LoRA adapters on one base, provenance on every answer.

    engine.py      the model, adapters, request queue and batching scheduler (no HTTP)
    lora_batch.py  gathered LoRA: mixed-adapter batches at a cost independent of the adapter count
    sampling.py    greedy / temperature / top-p token choice, shared by every decode path
    registry.py    which adapters may be served on which base (digest, identity, eval gates)
    requestlog.py  `serve.request` ledger events, batched by a background writer
    provenance.py  provenance id -> deployment, adapter, training run, datasets, eval, approvals
    metrics.py     Prometheus text metrics
    settings.py    ServeSettings (what the CLI flags fill)
    protocol.py    OpenAI request models and error bodies
    app.py         create_app(engine, settings): the FastAPI routes
    server.py      run a uvicorn server (foreground, or in a thread for tests and benchmarks)
    export.py      merged safetensors export of an adapter (+ notes on vLLM / LoRAX)

Deployment decisions (see registry.py): an adapter is served only if it is recorded in the workspace and
re-hashes to its digest, was trained on the running base (digest) with the same tokenizer and chat
template, and its eval gates passed or were overridden by a named person. An adapter never evaluated
is served with a logged warning, or refused under ``--require-eval``.
"""
