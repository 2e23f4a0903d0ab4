"""Online serving benchmark against `quantkit serve`, with the methodology of vLLM's benchmark_serving: ShareGPT
requests (first human turn as the prompt, the reference reply's length as max_tokens, ignore_eos), sent as
streaming /v1/completions at Poisson arrivals of a given rate (or all at once), timed on the client: TTFT, TPOT
(per request: (latency - TTFT) / (output tokens - 1)), ITL (gaps between streamed chunks) and end-to-end
latency with mean/p50/p90/p99, request throughput and output tokens/s.

Against a running server:
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --tokenizer smollm2-135m
Launching the servers itself, one after the other on the same requests (ratios side by side in one run):
    python benchmarks/serving.py --launch "cpu=smollm2-135m --device cpu" --request-rates inf,2 \\
        --num-prompts 32 --max-output-len 64 --out benchmarks/results/serving_cpu.json
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from quantkit.harness.workload import BenchRequest


@dataclass
class Result:
    prompt_len: int
    output_len: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


async def send(client: httpx.AsyncClient, model: str, req: BenchRequest) -> Result:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    result = Result(len(req.prompt_token_ids))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                new = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
                if not new:
                    continue
                now = time.perf_counter()
                if result.ttft is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                result.output_len += new
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - start
    if result.error is None and result.output_len != req.output_len:
        result.error = f"got {result.output_len} tokens, asked for {req.output_len}"
    return result


async def run_load(base_url: str, model: str, requests: list[BenchRequest], rate: float, seed: int,
                   headers: dict[str, str]) -> tuple[list[Result], float]:
    """Poisson arrivals (exponential gaps with mean 1/rate; rate=inf: all at once), as vLLM's get_request."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(3600.0),
                                 limits=limits) as client:
        # Warm-up sharing no prefix with the workload: one long prefill and a batch of decodes, so every
        # batch-size bucket's kernels are compiled before the clock starts.
        warm = await asyncio.gather(send(client, model, BenchRequest(list(range(100, 400)), 2)),
                                    *(send(client, model, BenchRequest([100 + i] * 8, 8)) for i in range(40)))
        if any(w.error for w in warm):
            raise RuntimeError(f"the warm-up failed: {next(w.error for w in warm if w.error)}")
        tasks = []
        start = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(send(client, model, req)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.error is None]
    if not ok:
        raise RuntimeError(f"every request failed, e.g. {results[0].error}")
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)

    def stats(values: list[float]) -> dict:
        ms = np.array(values or [float("nan")]) * 1000
        return {"mean": round(float(ms.mean()), 2), "p50": round(float(np.percentile(ms, 50)), 2),
                "p90": round(float(np.percentile(ms, 90)), 2), "p99": round(float(np.percentile(ms, 99)), 2)}

    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": round(duration, 3), "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(out_tokens / duration, 2),
        "total_token_throughput": round((in_tokens + out_tokens) / duration, 2),
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]),
        "itl_ms": stats([gap for r in ok for gap in r.itl]),
        "e2el_ms": stats([r.latency for r in ok]),
    }


def server_metrics(base_url: str, headers: dict[str, str]) -> dict:
    """A few server-side gauges and counters from /metrics, for context (KV pool, preemptions, prefix cache)."""
    wanted = ("kv_cache_total_blocks", "num_preemptions_total", "prefix_cache_hit_rate", "generation_tokens_total")
    found = {}
    for line in httpx.get(base_url + "/metrics", headers=headers).text.splitlines():
        for name in wanted:
            if line.startswith(f"quantkit:{name}{{"):
                found[name] = float(line.rsplit(" ", 1)[1])
    return found


class LaunchedServer:
    """`quantkit serve ARGS` on a free loopback port, stopped with SIGTERM (a graceful shutdown) afterwards."""

    def __init__(self, args: str, log_path: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.command = [sys.executable, "-m", "quantkit.cli", "serve", *shlex.split(args), "--port", str(self.port)]
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LaunchedServer:
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.startup_s = self._wait_ready(time.perf_counter())
        return self

    def _wait_ready(self, start: float, timeout: float = 900.0) -> float:
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {timeout} s")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def device_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (FileNotFoundError, subprocess.TimeoutExpired):
        pass
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def load_requests(args: argparse.Namespace) -> list[BenchRequest]:
    if args.dataset != "sharegpt":
        return [BenchRequest(**r) for r in json.loads(Path(args.dataset).read_text())][:args.num_prompts]
    from transformers import AutoTokenizer

    from quantkit.checkpoint.resolve import resolve_model
    from quantkit.harness.workload import sharegpt_requests
    source = resolve_model(args.tokenizer)
    if source.path is None:
        raise ValueError(f"--tokenizer {args.tokenizer!r} has no tokenizer files")
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    requests = sharegpt_requests(tokenizer, args.num_prompts, args.seed, max_prompt_len=args.max_prompt_len,
                                 max_output_len=args.max_output_len)
    if args.dump_requests:
        Path(args.dump_requests).write_text(json.dumps([asdict(r) for r in requests]))
    return requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="a running server (else --launch)")
    ap.add_argument("--model", default=None, help="served model name (default: the server's first model)")
    ap.add_argument("--launch", action="append", default=[],
                    help="LABEL=quantkit serve arguments; repeat to compare servers on the same requests")
    ap.add_argument("--api-key", default=os.environ.get("QUANTKIT_API_KEY"))
    ap.add_argument("--dataset", default="sharegpt", help="'sharegpt', or a JSON file written by --dump-requests")
    ap.add_argument("--dump-requests", default=None, help="write the built requests (token ids) to this file")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer that turns ShareGPT text into ids")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-prompt-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=None, help="cap the reference reply lengths")
    ap.add_argument("--request-rates", default="inf", help="comma-separated requests/s; inf = all at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON report path")
    ap.add_argument("--log-dir", default=tempfile.gettempdir(), help="where launched servers write their logs")
    args = ap.parse_args()
    if bool(args.base_url) == bool(args.launch):
        ap.error("give exactly one of --base-url and --launch")
    rates = [float(r) for r in args.request_rates.split(",")]
    if any(r <= 0 for r in rates):
        ap.error("--request-rates must be > 0")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    requests = load_requests(args)
    load_before = os.getloadavg()[0]
    runs = {}

    def bench(key: str, url: str, rate: float, extra: dict) -> None:
        model = args.model or httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]
        results, duration = asyncio.run(run_load(url, model, requests, rate, args.seed, headers))
        runs[key] = {**extra, "request_rate": rate, **summarize(results, duration),
                     "server_metrics": server_metrics(url, headers)}
        print(json.dumps({key: runs[key]}, indent=2), flush=True)

    for rate in rates:
        if args.base_url:
            bench(f"server@{rate:g}", args.base_url.rstrip("/"), rate, {"server": args.base_url})
        for spec in args.launch:  # a fresh server per rate: no prefix cache carried over from the last run
            label, _, serve_args = spec.partition("=")
            with LaunchedServer(serve_args, Path(args.log_dir) / f"serve-{label}.log") as server:
                bench(f"{label}@{rate:g}", server.url, rate, {"server_command": "quantkit serve " + serve_args,
                                                             "startup_s": round(server.startup_s, 1)})
    report = {
        "benchmark": "online serving (vLLM benchmark_serving methodology): ShareGPT, streaming /v1/completions, "
                     "ignore_eos, greedy",
        "device": device_name(), "date": datetime.date.today().isoformat(),
        # 1-minute load average of the machine before and after: other work on a shared CPU skews the numbers
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "num_prompts": len(requests), "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
        "output_tokens": sum(r.output_len for r in requests), "runs": runs,
    }
    labels = [spec.partition("=")[0] for spec in args.launch]
    if len(labels) > 1:
        report["output_throughput_ratio_vs_" + labels[0]] = {
            f"{label}@{rate:g}": round(runs[f"{label}@{rate:g}"]["output_throughput"]
                                       / runs[f"{labels[0]}@{rate:g}"]["output_throughput"], 3)
            for label in labels[1:] for rate in rates}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
