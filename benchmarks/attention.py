"""Triton paged attention on one GPU, side by side in one run (issue 8 targets):

- decode, batch 32-128 x context 4k-32k, Llama-3-8B heads (32 q, 8 kv, 128 dim), pages of 16 in shuffled order:
  KV bytes read per second against the measured device-to-device copy bandwidth (bytes read + written), and the
  FP8 (E4M3) pool's speedup over the bf16 pool;
- prefill of 2k-8k tokens: causal TFLOP/s of the paged kernel (whole prompt, and the second half of a prompt whose
  first half is a cached prefix) against torch SDPA's flash backend on contiguous tensors of the whole prompt;
- end to end: greedy tokens of llama3-8b with dummy weights, Triton vs the torch reference backend, 16-bit and FP8 KV.

Each kernel time is the median of CUDA-graph replays (linear_kernels.time_calls), so the backend is also shown to
run under graph capture with no host sync.

    python benchmarks/attention.py --out benchmarks/results/attention.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from linear_kernels import copy_bandwidth, time_calls
from torch.nn.attention import SDPBackend, sdpa_kernel

from quantkit import LLM, SamplingParams
from quantkit.engine.kv_cache import attention_layers
from quantkit.kernels.attention_torch import TorchAttentionBackend
from quantkit.kernels.attention_triton import DecodeLaunch, TritonAttentionBackend
from quantkit.layers.attention import Attention, AttentionMetadata

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
KV_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}


def paged_step(layer: Attention, seqs: list[tuple[int, int]], gen: torch.Generator) -> tuple:
    """(q, k, v, meta) for sequences (cached tokens, new tokens) over shuffled pages of the layer's pool."""
    num_blocks = layer.kv_cache.shape[1]
    perm = torch.randperm(num_blocks, generator=gen)
    starts, lens, slots, tables, used = [0], [], [], [], 0
    width = max(-(-(c + n) // PAGE) for c, n in seqs)
    for cached, new in seqs:
        nb = -(-(cached + new) // PAGE)
        blocks = perm[used:used + nb]
        used += nb
        pos = torch.arange(cached, cached + new)
        slots.append(blocks[pos // PAGE] * PAGE + pos % PAGE)
        tables.append(F.pad(blocks, (0, width - nb)))
        starts.append(starts[-1] + new)
        lens.append(cached + new)
    if used > num_blocks:
        raise ValueError(f"the pool has {num_blocks} pages, the batch needs {used}")
    dev = layer.kv_cache.device
    meta = AttentionMetadata(torch.tensor(starts, dtype=torch.int32, device=dev),
                             torch.tensor(lens, dtype=torch.int32, device=dev), starts, lens,
                             torch.cat(slots).to(dev), torch.stack(tables).to(dev, torch.int32))
    t = starts[-1]
    q = torch.randn(t, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(t, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
    return q, k, v, meta


def make_layer(num_tokens: int, kv_dtype: torch.dtype, launch: DecodeLaunch | None = None) -> Attention:
    layer = Attention(HEADS, HEAD_DIM, KV_HEADS, None, TritonAttentionBackend(launch)).cuda()
    pool = torch.empty(2, -(-num_tokens // PAGE), PAGE, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    layer.kv_cache = pool.uniform_(-2, 2).to(kv_dtype) if kv_dtype != torch.bfloat16 else pool.uniform_(-2, 2)
    return layer


def bench_decode(batches: list[int], contexts: list[int], copy_bw: float, gen: torch.Generator) -> list[dict]:
    rows = []
    for name, kv_dtype in KV_DTYPES.items():
        layer = make_layer(max(batches) * (max(contexts) + PAGE), kv_dtype)
        for batch in batches:
            for ctx in contexts:
                q, k, v, meta = paged_step(layer, [(ctx - 1, 1)] * batch, gen)
                seconds = time_calls([partial(layer, q, k, v, meta)])
                kv_bytes = batch * ctx * 2 * KV_HEADS * HEAD_DIM * layer.kv_cache.element_size()
                rows.append({"kv": name, "batch": batch, "context": ctx, "us": round(seconds * 1e6, 1),
                             "kv_gb_per_s": round(kv_bytes / seconds / 1e9, 1),
                             "fraction_of_copy_bw": round(kv_bytes / seconds / copy_bw, 3)})
                print(rows[-1], flush=True)
        del layer
        torch.cuda.empty_cache()
    bf16 = {(r["batch"], r["context"]): r["us"] for r in rows if r["kv"] == "bf16"}
    for r in rows:
        r["speedup_over_bf16"] = round(bf16[(r["batch"], r["context"])] / r["us"], 2)
    return rows


def tune_decode(batches: list[int], contexts: list[int], gen: torch.Generator) -> list[dict]:
    """Decode launch settings swept per KV dtype; prints the fastest per (dtype, batch, context)."""
    launches = [DecodeLaunch(t, w, st, seg) for t in (64, 128, 256) for w in (4, 8) for st in (3, 4)
                for seg in (1, 2)]
    rows = []
    for name, kv_dtype in KV_DTYPES.items():
        layer = make_layer(max(batches) * (max(contexts) + PAGE), kv_dtype)
        steps = {(b, c): paged_step(layer, [(c - 1, 1)] * b, gen) for b in batches for c in contexts}
        for launch in launches:
            layer.backend = TritonAttentionBackend(launch)
            for (b, c), (q, k, v, meta) in steps.items():
                rows.append({"kv": name, "batch": b, "context": c, **asdict(launch),
                             "us": round(time_calls([partial(layer, q, k, v, meta)]) * 1e6, 1)})
        del layer, steps
        torch.cuda.empty_cache()
    for key in sorted({(r["kv"], r["batch"], r["context"]) for r in rows}):
        best = min((r for r in rows if (r["kv"], r["batch"], r["context"]) == key), key=lambda r: r["us"])
        print("best", best, flush=True)
    return rows


def causal_flops(cached: int, new: int) -> float:
    """Useful multiply-adds x2 of QK^T and PV: query at position p sees p + 1 keys."""
    visible = sum(range(cached + 1, cached + new + 1))
    return 4.0 * HEADS * HEAD_DIM * visible


def bench_prefill(lengths: list[int], gen: torch.Generator) -> list[dict]:
    rows = []
    layer = make_layer(max(lengths) + PAGE, torch.bfloat16)
    for n in lengths:
        q = torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = time_calls([partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)])
        row = {"tokens": n, "sdpa_flash_tflops": round(causal_flops(0, n) / sdpa / 1e12, 1)}
        for label, cached in (("paged", 0), ("paged_half_cached", n // 2)):
            args = paged_step(layer, [(cached, n - cached)], gen)
            seconds = time_calls([partial(layer, *args)])
            row[f"{label}_tflops"] = round(causal_flops(cached, n - cached) / seconds / 1e12, 1)
            row[f"{label}_vs_sdpa"] = round(row[f"{label}_tflops"] / row["sdpa_flash_tflops"], 3)
        rows.append(row)
        print(row, flush=True)
    del layer
    torch.cuda.empty_cache()
    return rows


def end_to_end(tokens: int) -> dict:
    """One engine per KV dtype; the torch backend is swapped in on the same weights (no prefix caching, so the
    second run recomputes every key)."""
    prompts = [[(13 * i + 7 * j) % 5000 + 100 for j in range(n)] for i, n in enumerate([17, 300, 1000, 64])]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    result = {}
    for kv in ("auto", "fp8_e4m3"):
        llm = LLM("llama3-8b", load_format="dummy", skip_tokenizer_init=True, attention_backend="triton",
                  kv_cache_dtype=kv, num_kv_blocks=1024, max_model_len=4096, enable_prefix_caching=False)
        runs = {}
        for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
            for layer in attention_layers(llm.llm_engine.model):
                layer.backend = backend
            runs[backend.name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        same = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                for a, b in zip(runs["triton"], runs["torch"])]
        result[kv] = {"tokens_per_prompt": tokens, "identical_prefix_lengths": same,
                      "all_identical": runs["triton"] == runs["torch"], "triton": runs["triton"],
                      "torch": runs["torch"]}
        print(kv, result[kv]["identical_prefix_lengths"], flush=True)
        del llm
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="32,64,128")
    ap.add_argument("--contexts", default="4096,8192,16384,32768")
    ap.add_argument("--prefill", default="2048,4096,8192")
    ap.add_argument("--e2e-tokens", type=int, default=16, help="0 skips the end-to-end check")
    ap.add_argument("--tune", action="store_true", help="sweep decode launch settings instead (writes --out)")
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    gen = torch.Generator().manual_seed(0)
    if args.tune:
        rows = tune_decode([int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")], gen)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
                                              "date": datetime.date.today().isoformat(), "tune": rows}, indent=1))
        return
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    decode = bench_decode([int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")],
                          copy_bw, gen)
    prefill = bench_prefill([int(n) for n in args.prefill.split(",")], gen)
    report = {
        "benchmark": "Triton paged attention (issue 8)", "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
        "heads": {"q": HEADS, "kv": KV_HEADS, "dim": HEAD_DIM, "page": PAGE},
        "copy_gb_per_s_read_plus_write": round(copy_bw / 1e9, 1),
        "decode": decode, "prefill": prefill,
        "goals": {
            "decode_min_fraction_of_copy_bw": min(r["fraction_of_copy_bw"] for r in decode),
            "decode_fp8_min_speedup_ctx_ge_8k": min(r["speedup_over_bf16"] for r in decode
                                                    if r["kv"] != "bf16" and r["context"] >= 8192),
            "prefill_min_vs_sdpa": min(min(r["paged_vs_sdpa"], r["paged_half_cached_vs_sdpa"]) for r in prefill),
            "targets": {"decode_fraction": 0.75, "fp8_speedup": 1.7, "prefill_vs_sdpa": 0.6},
        },
    }
    if args.e2e_tokens:
        report["end_to_end_llama3_8b_dummy"] = end_to_end(args.e2e_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["goals"], indent=1))


if __name__ == "__main__":
    main()
