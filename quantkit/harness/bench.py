"""Speed and memory of the engine: offline throughput, latency per batch size, weight/KV/peak memory.

Throughput follows vLLM's offline benchmark: every request of the workload is submitted at once, greedy, with
`ignore_eos` so each produces exactly its output length; requests/s, output tokens/s and total (prompt + output)
tokens/s over the wall time. Latency: for each batch size B, B fresh random prompts of `latency_input_len`
tokens decode `latency_output_len` tokens each; time to first token (TTFT), time per output token after the first
(TPOT) and end-to-end time are averaged over the B requests. One short warm-up request runs first each time.
"""
from __future__ import annotations

import random
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from quantkit.harness.workload import BenchRequest, sharegpt_requests
from quantkit.llm import LLM
from quantkit.sampling_params import SamplingParams

DATASETS = ("sharegpt", "random")
MODES = ("throughput", "latency")


@dataclass
class BenchConfig:
    """dataset 'sharegpt' (vLLM's sampling; max_output_len caps replies on CPU) or 'random' (fixed
    input_len/output_len, random token ids: what dummy weights without a tokenizer use)."""
    dataset: str = "sharegpt"
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    max_output_len: int | None = None
    max_prompt_len: int = 1024
    seed: int = 0
    modes: list[str] = field(default_factory=lambda: list(MODES))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    latency_input_len: int = 128
    latency_output_len: int = 32
    peers: list[str] = field(default_factory=list)
    hf_batch_size: int = 16

    def __post_init__(self) -> None:
        from quantkit.harness.peers import PEERS
        if self.dataset not in DATASETS:
            raise ValueError(f"bench dataset {self.dataset!r} is not one of {DATASETS}")
        for name in ("num_prompts", "input_len", "output_len", "max_prompt_len", "latency_input_len",
                     "latency_output_len", "hf_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"bench {name} must be a positive integer, got {value!r}")
        if self.max_output_len is not None and (not isinstance(self.max_output_len, int) or self.max_output_len < 1):
            raise ValueError(f"bench max_output_len must be a positive integer or null, got {self.max_output_len!r}")
        if unknown := [m for m in self.modes if m not in MODES]:
            raise ValueError(f"bench modes {unknown} are not among {MODES}")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise ValueError(f"bench batch_sizes must be positive integers, got {self.batch_sizes!r}")
        if unknown := [p for p in self.peers if p not in PEERS]:
            raise ValueError(f"bench peers {unknown} are not among {sorted(PEERS)}")


def random_requests(num: int, input_len: int, output_len: int, vocab: int, seed: int) -> list[BenchRequest]:
    """vLLM's 'random' dataset: uniform token ids (distinct prompts, so the prefix cache never hits)."""
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(vocab) for _ in range(input_len)], output_len) for _ in range(num)]


def workload(llm: LLM, config: BenchConfig) -> list[BenchRequest]:
    if config.dataset == "random":
        return random_requests(config.num_prompts, config.input_len, config.output_len,
                               llm.llm_engine.model_config.vocab_size, config.seed)
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("the sharegpt dataset needs a tokenizer (dummy weights have none): use dataset 'random'")
    return sharegpt_requests(tokenizer, config.num_prompts, config.seed, max_prompt_len=config.max_prompt_len,
                             max_output_len=config.max_output_len)


def throughput_metrics(seconds: float, requests: list[BenchRequest]) -> dict[str, float]:
    prompt = sum(len(r.prompt_token_ids) for r in requests)
    output = sum(r.output_len for r in requests)
    return {"seconds": round(seconds, 3), "requests_per_s": round(len(requests) / seconds, 3),
            "output_tokens_per_s": round(output / seconds, 2), "total_tokens_per_s": round((prompt + output) / seconds, 2)}


def _sync(llm: LLM) -> None:
    if llm.llm_engine.device.type == "cuda":
        torch.cuda.synchronize(llm.llm_engine.device)


def _warm_up(llm: LLM) -> None:
    llm.generate([{"prompt_token_ids": [1] * 16}], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)


def quantkit_throughput(llm: LLM, requests: list[BenchRequest]) -> float:
    """Seconds to finish every request; checks that each produced exactly its output length."""
    _warm_up(llm)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    _sync(llm)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    _sync(llm)
    elapsed = time.perf_counter() - start
    if [len(o.outputs[0].token_ids) for o in outputs] != [r.output_len for r in requests]:
        raise RuntimeError("quantkit produced the wrong number of tokens")
    return elapsed


def quantkit_latency(llm: LLM, config: BenchConfig) -> list[dict[str, float]]:
    """TTFT / TPOT / end-to-end (mean over the batch, milliseconds) for each batch size."""
    engine = llm.llm_engine
    _warm_up(llm)
    rows = []
    for i, batch in enumerate(tqdm(config.batch_sizes, desc="latency (batch sizes)", unit="batch")):
        prompts = random_requests(batch, config.latency_input_len, config.latency_output_len,
                                  engine.model_config.vocab_size, config.seed + 1 + i)
        params = SamplingParams(temperature=0.0, max_tokens=config.latency_output_len, ignore_eos=True)
        start = time.perf_counter()
        ids = [engine.add_request({"prompt_token_ids": p.prompt_token_ids}, params) for p in prompts]
        first, done = {}, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                now = time.perf_counter()
                first.setdefault(out.request_id, now)
                if out.finished:
                    done[out.request_id] = now
        ttft = [first[r] - start for r in ids]
        e2e = [done[r] - start for r in ids]
        tpot = [(done[r] - first[r]) / max(config.latency_output_len - 1, 1) for r in ids]
        rows.append({"batch_size": batch, "ttft_ms": 1e3 * sum(ttft) / batch, "tpot_ms": 1e3 * sum(tpot) / batch,
                     "e2e_ms": 1e3 * sum(e2e) / batch,
                     "output_tokens_per_s": batch * config.latency_output_len / max(e2e)})
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def memory(llm: LLM) -> dict[str, Any]:
    """Weight bytes and KV capacity from the engine; the peak is the device's allocation peak on GPU, the
    process's peak resident set on CPU (everything the process holds, tokenizer and dataset included)."""
    engine = llm.llm_engine
    out: dict[str, Any] = {"weight_bytes": engine.weight_bytes, "kv_capacity_tokens": engine.kv_capacity_tokens,
                           "kv_cache_dtype": engine.config.kv_cache_dtype}
    if engine.device.type == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(engine.device)
    else:
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def bench(llm_kwargs: dict[str, Any], config: BenchConfig) -> dict[str, Any]:
    """Every mode of `config` for LLM(**llm_kwargs), then the peers on the same workload with the ratio
    quantkit / peer. The engine is freed before the peers load (on GPU its KV pool holds most of the memory)."""
    from quantkit.harness.peers import PeerTarget, run_peer
    llm = LLM(**llm_kwargs)
    engine = llm.llm_engine
    target = PeerTarget(engine.source, engine.dtype, engine.device)
    result: dict[str, Any] = {"bench": asdict(config)}
    requests: list[BenchRequest] = []
    if "throughput" in config.modes:
        requests = workload(llm, config)
        result["workload"] = {"num_prompts": len(requests),
                              "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
                              "output_tokens": sum(r.output_len for r in requests)}
        result["throughput"] = {"quantkit": throughput_metrics(quantkit_throughput(llm, requests), requests)}
    if "latency" in config.modes:
        result["latency"] = quantkit_latency(llm, config)
    result["memory"] = memory(llm)
    del llm, engine
    free_device_memory(target.device)
    ours = result.get("throughput", {}).get("quantkit")
    for name in config.peers if ours else []:
        peer = run_peer(name, target, requests, config)
        if "seconds" in peer:
            peer = {**throughput_metrics(peer.pop("seconds"), requests), **peer}
            peer["quantkit_speedup"] = round(peer["seconds"] / ours["seconds"], 3)
        result["throughput"][name] = peer
        free_device_memory(target.device)
    return result


def free_device_memory(device: torch.device) -> None:
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
