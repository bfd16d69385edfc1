"""Serving: an OpenAI-compatible HTTP server with many LoRA adapters on one base, provenance on every answer.

    engine.py      the model, adapters, request queue and batching scheduler (no HTTP)
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
"""
