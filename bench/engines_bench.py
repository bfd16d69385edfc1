"""The gateway's cost in front of llama.cpp: the same requests sent straight to the llama.cpp engine process
and through finetrace's gateway (HTTP, auth, provenance id, ``serve.request`` event), interleaved, one
client at a time (llama.cpp decodes one request at a time per process).

    .venv/bin/python bench/serve_throughput.py --engine llamacpp [--tiny]     # calls run_llamacpp below

``engine_tokens_per_s``: completion tokens / wall time straight to the engine's ``/v1/completions``;
``gateway_tokens_per_s``: the same through the gateway's; ``gateway_overhead`` = 1 - gateway / engine.
Tokens are counted the same way on both paths (the base's tokenizer over the answer text).
"""

from __future__ import annotations

import sys
import time


def run_llamacpp(
    ws, base, refs: list[str], prompts: list[list[dict]], max_tokens: int, rounds: int = 3, threads: int = 2
) -> dict:
    import httpx

    from finetrace.serve.engines import open_engine
    from finetrace.serve.server import BackgroundServer
    from finetrace.serve.settings import ServeSettings

    eng = open_engine(ws, base.digest, refs, ServeSettings(log_flush_s=0.2), "llamacpp", threads=threads)
    tok = eng.tokenizer
    with BackgroundServer(eng) as srv, httpx.Client(timeout=600) as client:
        worker = eng.backend.url

        def direct(model: str, ids: list[int]) -> int:
            r = client.post(
                worker + "/v1/completions",
                json={"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0},
            )
            r.raise_for_status()
            return len(tok(r.json()["choices"][0]["text"], add_special_tokens=False)["input_ids"])

        def gateway(model: str, ids: list[int]) -> int:
            r = client.post(
                srv.base_url + "/completions",
                json={"model": model, "prompt": texts[tuple(ids)], "max_tokens": max_tokens, "temperature": 0.0},
            )
            r.raise_for_status()
            return len(tok(r.json()["choices"][0]["text"], add_special_tokens=False)["input_ids"])

        texts = {}  # the gateway gets the text, the engine the gateway's own tokens of it: the same work
        rows = []
        for i, p in enumerate(prompts):
            text = tok.decode(eng.encode_chat(p))
            ids = eng.encode_text(text)
            texts[tuple(ids)] = text
            rows.append((refs[i % len(refs)], ids))
        direct(*rows[0])  # warm-up
        gateway(*rows[0])
        tally = {"engine": [0, 0.0], "gateway": [0, 0.0]}
        for _ in range(rounds):  # interleaved, so that load from elsewhere hits both alike
            for name, fn in (("engine", direct), ("gateway", gateway)):
                t0 = time.perf_counter()
                n = sum(fn(m, ids) for m, ids in rows)
                tally[name][0] += n
                tally[name][1] += time.perf_counter() - t0
                print(f"{name}: {n} tokens in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
        version = eng.backend.describe()["version"]
    e, g = (tally[k][0] / tally[k][1] for k in ("engine", "gateway"))
    return {
        "engine": "llamacpp",
        "engine_version": version,
        "engine_tokens_per_s": round(e, 2),
        "gateway_tokens_per_s": round(g, 2),
        "gateway_overhead": round(1 - g / e, 4),
        "requests": rounds * len(rows),
        "max_tokens": max_tokens,
        "tokens": {k: v[0] for k, v in tally.items()},
    }
