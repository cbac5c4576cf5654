"""Serving under load: `specialize serve` (continuous batching) with 1, 8, 16 and 32 concurrent clients.

    python bench/serve_load.py --baseline     # ~21M-param Llama on CPU, vs `transformers serve`, ~15 min on 2 cores
    python bench/serve_load.py --clients 1 8 32 --rounds 1      # specialize alone, quick

Nothing is downloaded: a Llama (hidden 512, 6 layers, vocabulary 8,192, 20.8M parameters) is
built from a config with random weights and a tokenizer trained on stdlib docstrings, and saved
to a temporary folder. Each server runs in its own process on 127.0.0.1; the clients are one
asyncio process (httpx), each client sending `--requests` completions one after the other, with
answer budgets cycling through `--max-tokens` so that short and long answers share the batch.
Random weights rarely produce EOS, so nearly every answer runs to its budget.

Reported per (server, clients, streamed): completion tokens/s over the wall time, time to first
token p50/p99 (streamed: the first content chunk; not streamed: the whole answer), request
latency p50/p99. Last line: the wall time of 16 streamed clients over 16 non-streamed ones.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Return a new list containing all items from the iterable in ascending order. A custom key"


def build_model(folder: Path) -> Path:
    import collections
    import pathlib

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from specialize.tokenizer import train_bpe

    texts = [inspect.getdoc(getattr(m, n)) or "" for m in (collections, json, pathlib, inspect, os)
             for n in sorted(dir(m)) if not n.startswith("_")]
    tokenizer = train_bpe(texts, vocab_size=8192)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"prompt {len(tokenizer(PROMPT)['input_ids'])} tokens", flush=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, model: Path, port: int, max_batch_size: int, threads: int) -> subprocess.Popen:
    if kind == "specialize":
        code = ("import sys, uvicorn; from specialize.config import ServeConfig; from specialize.generate import Generator;"
                "from specialize.serve.app import create_app, server_config;"
                f"cfg = ServeConfig(model=sys.argv[1], port={port}, max_batch_size={max_batch_size}, max_queue=1024);"
                "app = create_app(Generator.load(cfg.model), cfg);"
                f"uvicorn.Server(server_config(app, cfg, host='127.0.0.1', port={port}, log_level='warning')).run()")
        command = [sys.executable, "-c", code, str(model)]
    else:
        command = [str(Path(sys.executable).parent / "transformers"), "serve", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "--device", "cpu", "--continuous-batching"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


async def wait_ready(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read()[-2000:]}")
            try:
                if (await client.get(url + "/health", timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server did not start")


async def one_request(client, url: str, model: str, max_tokens: int, stream: bool) -> tuple[float, float, int]:
    """(time to first token, latency, completion tokens) of one completion."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    if not stream:
        response = await client.post(url + "/v1/completions", json=body, timeout=600)
        response.raise_for_status()
        latency = time.perf_counter() - start
        return latency, latency, response.json()["usage"]["completion_tokens"]
    first, chunks, usage = None, 0, None
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                chunks += 1
                first = first or time.perf_counter() - start
    latency = time.perf_counter() - start
    return first or latency, latency, usage if usage is not None else chunks


async def load(url: str, model: str, clients: int, requests: int, budgets: list[int], stream: bool) -> dict:
    import httpx

    results = []

    async def client_loop(index: int, client) -> None:
        for r in range(requests):
            results.append(await one_request(client, url, model, budgets[(index + r) % len(budgets)], stream))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - start
    ttft, latency = sorted(r[0] for r in results), sorted(r[1] for r in results)

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    tokens = sum(r[2] for r in results)
    return {"clients": clients, "stream": stream, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
            "latency_p50": statistics.median(latency), "latency_p99": pct(latency, 0.99)}


def measure(url: str, served: str, clients: int, stream: bool, args) -> dict:
    return asyncio.run(load(url, served, clients, args.requests, args.max_tokens, stream))


def median_row(rows: list[dict]) -> dict:
    """The per-key median over rounds (the first row's labels)."""
    return rows[0] | {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after the other")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[16, 32, 64], help="answer budgets, cycled")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each figure is the median over them")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each server (OMP_NUM_THREADS); more than the free cores thrashes")
    parser.add_argument("--baseline", action="store_true", help="also run `transformers serve` on the same folder")
    parser.add_argument("--json", type=Path, help="write every row here")
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model")
        servers: dict[str, tuple[str, str, subprocess.Popen]] = {}
        try:
            for kind in ("specialize", "transformers") if args.baseline else ("specialize",):
                port = free_port()
                process = start_server(kind, model, port, args.max_batch_size, args.threads)
                url, served = f"http://127.0.0.1:{port}", "model" if kind == "specialize" else str(model)
                try:
                    asyncio.run(wait_ready(url, process))
                    asyncio.run(load(url, served, 1, 1, [4], False))  # warm-up
                except Exception as e:  # reported, not hidden: the comparison is only made where it runs
                    print(f"{kind} serve: could not run: {type(e).__name__}: {e}", flush=True)
                    process.terminate()
                    continue
                servers[kind] = (url, served, process)
            # Both servers stay up (one thread each) and take turns, so a busy shared machine slows
            # both alike; each figure is the median over the rounds.
            for clients in args.clients:
                for stream in (False, True):
                    for kind, (url, served, _) in servers.items():
                        runs = [measure(url, served, clients, stream, args) for _ in range(args.rounds)]
                        row = median_row(runs) | {"server": kind, "walls": [r["wall_s"] for r in runs]}
                        rows.append(row)
                        print(f"{kind:12s} clients {clients:3d} {'streamed' if stream else 'whole   '} "
                              f"{row['tokens_per_s']:7.1f} tok/s  ttft p50 {row['ttft_p50']:5.2f}s "
                              f"p99 {row['ttft_p99']:5.2f}s  latency p50 {row['latency_p50']:5.2f}s "
                              f"p99 {row['latency_p99']:5.2f}s  wall {row['wall_s']:5.2f}s ({row['tokens']} tokens)",
                              flush=True)
        finally:
            for _, _, process in servers.values():
                process.terminate()
                process.wait(timeout=30)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    walls = {(r["server"], r["clients"], r["stream"]): r["wall_s"] for r in rows}
    for server in servers:
        if (server, 16, True) in walls and (server, 16, False) in walls:
            print(f"{server}: 16 streamed / 16 non-streamed wall time = "
                  f"{walls[(server, 16, True)] / walls[(server, 16, False)]:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
