"""End-to-end engine speed on one GPU with dummy weights, quantkit beside the transformers peers in one invocation
(issue 9). Parts, each optional:

- decode: batch-1 decode tokens/s of `llama3-8b` for every quantization method, against the memory-bandwidth
  roofline (bytes of weights read per token / measured device copy bandwidth) and as a ratio to bf16.
- throughput: offline throughput, vLLM-style (all requests at once, greedy, ignore_eos): fixed 128-in/128-out
  (1000 prompts) and ShareGPT-shaped (500 and 1000 prompts; lengths from benchmarks/data/sharegpt_lengths.json,
  random token ids), bf16; transformers `generate` (static batches) and continuous batching on the 128/128 set.
- quantized: the 128/128 set for each quantization method at full batch, as a ratio to bf16.
- longctx: FP8 E4M3 KV cache against bf16 KV with the same KV bytes (so twice the tokens), long prompts.

    python benchmarks/e2e_gpu.py --parts decode,quantized --out benchmarks/results/e2e_gpu_decode.json
    python benchmarks/e2e_gpu.py --parts throughput,longctx --out benchmarks/results/e2e_gpu_throughput.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from linear_kernels import copy_bandwidth  # noqa: E402

from quantkit import LLM, SamplingParams  # noqa: E402
from quantkit.checkpoint.resolve import resolve_model  # noqa: E402
from quantkit.harness.bench import (BenchConfig, free_device_memory, quantkit_throughput,  # noqa: E402
                                    random_requests, throughput_metrics)
from quantkit.harness.peers import PeerTarget, run_peer  # noqa: E402
from quantkit.harness.runner import provenance, write_json  # noqa: E402
from quantkit.harness.workload import BenchRequest  # noqa: E402
from quantkit.kernels import pdl  # noqa: E402
from quantkit.models.presets import PRESETS  # noqa: E402

PARTS = ("decode", "throughput", "quantized", "longctx")
# name -> LLM kwargs; dummy awq/gptq are round-to-nearest in their kernel format (quant/registry.py)
METHODS: dict[str, dict[str, Any]] = {
    "bf16": {},
    "awq": {"quantization": "awq"},
    "gptq-actorder": {"quantization": "gptq", "quantization_config": {"desc_act": True}},
    "fp8": {"quantization": "fp8"},
    "int8": {"quantization": "int8"},
    "nf4": {"quantization": "nf4"},
}
SHAREGPT_LENGTHS = Path(__file__).parent / "data" / "sharegpt_lengths.json"


def with_engine(measure_fn: Callable[[LLM], dict], model: str, max_model_len: int, **kwargs: Any) -> dict:
    """measure_fn(engine) on a fresh engine, which is gone (its GPU memory back with the allocator) on return."""
    start = time.perf_counter()
    llm = LLM(model, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=max_model_len,
              **kwargs)
    load_s = time.perf_counter() - start
    try:
        return {**measure_fn(llm), "load_seconds": round(load_s, 1)}
    finally:
        del llm
        free_device_memory(torch.device("cuda"))


def streamed_bytes(llm: LLM) -> int:
    """Weight bytes one decode step reads: every parameter and buffer but the input embedding (one row of it is
    read per token) and the rotary cache; a tied lm_head is read once as the head."""
    model = llm.llm_engine.model
    embed = model.model.embed_tokens.weight
    tied = model.config.tie_word_embeddings
    seen: dict[int, torch.Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "cos_sin_cache" in name or (t is embed and not tied):
            continue
        seen[id(t)] = t
    return sum(t.numel() * t.element_size() for t in seen.values())


def decode_speed(llm: LLM, prompt_len: int, output_len: int) -> dict[str, float]:
    """Batch 1: tokens/s over the decode steps (time after the first token), median of 3 runs."""
    engine_ = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([[5] * 16], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    rates = []
    for run in range(3):
        engine_.add_request({"prompt_token_ids": [(7 * run + j) % 1000 + 10 for j in range(prompt_len)]}, params)
        first = None
        while engine_.has_unfinished_requests():
            engine_.step()
            if first is None:
                torch.cuda.synchronize()
                first = time.perf_counter()
        torch.cuda.synchronize()
        rates.append((output_len - 1) / (time.perf_counter() - first))
    return {"tokens_per_s": round(sorted(rates)[1], 2), "runs": [round(r, 2) for r in rates]}


def part_decode(args: argparse.Namespace, copy_bw: float) -> dict:
    def measure_decode(llm: LLM) -> dict:
        nbytes = streamed_bytes(llm)
        speed = decode_speed(llm, args.decode_prompt_len, args.decode_output_len)
        roofline = copy_bw / nbytes
        return {**speed, "streamed_weight_GB": round(nbytes / 1e9, 3), "roofline_tokens_per_s": round(roofline, 1),
                "fraction_of_roofline": round(speed["tokens_per_s"] / roofline, 3)}

    rows: dict[str, dict] = {}
    for name in args.methods:
        if args.pdl_ab:  # the same method with programmatic dependent launch off, just before
            pdl.set_enabled(False)
            off = with_engine(measure_decode, args.model, 4096, max_num_seqs=16, **METHODS[name])
            pdl.set_enabled(True)
        rows[name] = with_engine(measure_decode, args.model, 4096, max_num_seqs=16, **METHODS[name])
        if args.pdl_ab:
            rows[name]["no_pdl"] = {k: off[k] for k in ("tokens_per_s", "runs", "fraction_of_roofline")}
            rows[name]["pdl_speedup"] = round(rows[name]["tokens_per_s"] / off["tokens_per_s"], 3)
        print(f"decode {name}: {rows[name]}", flush=True)
    base = rows.get("bf16", {}).get("tokens_per_s")
    for row in rows.values():
        if base:
            row["ratio_to_bf16"] = round(row["tokens_per_s"] / base, 3)
    return {"prompt_len": args.decode_prompt_len, "output_len": args.decode_output_len, "methods": rows}


def sharegpt_shaped(num: int, vocab: int, seed: int) -> list[BenchRequest]:
    lengths = json.loads(SHAREGPT_LENGTHS.read_text())
    gen = torch.Generator().manual_seed(seed)
    return [BenchRequest(torch.randint(vocab, (p,), generator=gen).tolist(), o)
            for p, o in zip(lengths["prompt_lens"][:num], lengths["output_lens"][:num])]


def measure(llm: LLM, requests: list[BenchRequest]) -> dict:
    return throughput_metrics(quantkit_throughput(llm, requests), requests)


def vocab_size(model: str) -> int:
    return PRESETS[model]["vocab_size"]


def part_throughput(args: argparse.Namespace) -> dict:
    vocab = vocab_size(args.model)
    workloads = {"random_128_128_x1000": random_requests(1000, 128, 128, vocab, 0),
                 "sharegpt_x500": sharegpt_shaped(500, vocab, 1), "sharegpt_x1000": sharegpt_shaped(1000, vocab, 1)}
    measured = with_engine(lambda llm: {w: measure(llm, reqs) for w, reqs in workloads.items()}, args.model, 2048)
    result: dict[str, dict] = {w: {"quantkit": measured[w]} for w in workloads}
    for w, r in result.items():
        print(f"throughput {w}: quantkit {r['quantkit']}", flush=True)
    target = PeerTarget(resolve_model(args.model, "dummy"), torch.bfloat16, torch.device("cuda"))
    fixed = workloads["random_128_128_x1000"]
    ours = result["random_128_128_x1000"]["quantkit"]
    peers = [("transformers", BenchConfig(hf_batch_size=b)) for b in args.hf_batch_sizes]
    peers.append(("transformers-cb", BenchConfig()))
    for name, config in peers:
        key = name if name == "transformers-cb" else f"{name}_static_batch_{config.hf_batch_size}"
        peer = run_peer(name, target, fixed, config)
        if "seconds" in peer:
            peer = {**throughput_metrics(peer.pop("seconds"), fixed), **peer}
            peer["quantkit_speedup"] = round(peer["seconds"] / ours["seconds"], 3)
        result["random_128_128_x1000"][key] = peer
        print(f"throughput 128/128: {key} {peer}", flush=True)
        free_device_memory(target.device)
    return result


def part_quantized(args: argparse.Namespace) -> dict:
    rows: dict[str, dict] = {}
    requests = random_requests(1000, 128, 128, vocab_size(args.model), 0)
    for name in args.methods:
        rows[name] = with_engine(lambda llm: measure(llm, requests), args.model, 2048, **METHODS[name])
        print(f"quantized {name}: {rows[name]}", flush=True)
    base = rows.get("bf16", {}).get("output_tokens_per_s")
    for row in rows.values():
        if base:
            row["ratio_to_bf16"] = round(row["output_tokens_per_s"] / base, 3)
    return {"workload": "random 128 in / 128 out, 1000 prompts", "methods": rows}


def part_longctx(args: argparse.Namespace) -> dict:
    """Same KV bytes for both caches: bf16 holds `longctx_seqs` full sequences, FP8 twice as many tokens."""
    total = args.longctx_input + args.longctx_output
    bf16_blocks = args.longctx_seqs * -(-total // 16)
    requests = random_requests(args.longctx_prompts, args.longctx_input, args.longctx_output,
                               vocab_size(args.model), 2)
    rows = {}
    for kv, blocks in (("auto", bf16_blocks), ("fp8_e4m3", 2 * bf16_blocks)):
        rows[kv] = with_engine(lambda llm: {**measure(llm, requests),
                                            "kv_capacity_tokens": llm.llm_engine.kv_capacity_tokens},
                               args.model, total + 16, kv_cache_dtype=kv, num_kv_blocks=blocks)
        print(f"longctx kv={kv}: {rows[kv]}", flush=True)
    rows["fp8_e4m3"]["ratio_to_bf16_kv"] = round(rows["fp8_e4m3"]["output_tokens_per_s"] /
                                                 rows["auto"]["output_tokens_per_s"], 3)
    return {"workload": f"{args.longctx_prompts} prompts, {args.longctx_input} in / {args.longctx_output} out, "
                        f"KV pool of {bf16_blocks} bf16 blocks (same bytes for FP8)", "kv": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--decode-prompt-len", type=int, default=128)
    ap.add_argument("--decode-output-len", type=int, default=256)
    ap.add_argument("--pdl-ab", action="store_true",
                    help="decode: also run each method with programmatic dependent launch off (kernels/pdl.py)")
    ap.add_argument("--hf-batch-sizes", default="128", help="static batch sizes of transformers generate")
    ap.add_argument("--longctx-prompts", type=int, default=64)
    ap.add_argument("--longctx-seqs", type=int, default=16, help="full sequences the bf16 KV pool holds")
    ap.add_argument("--longctx-input", type=int, default=4096)
    ap.add_argument("--longctx-output", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/e2e_gpu.json")
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    args.hf_batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    if unknown := set(args.methods) - set(METHODS):
        sys.exit(f"unknown methods {sorted(unknown)} (known: {list(METHODS)})")
    parts = args.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        sys.exit(f"unknown parts {sorted(unknown)} (known: {list(PARTS)})")
    if not torch.cuda.is_available():
        sys.exit("e2e_gpu.py needs a CUDA device")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    report: dict[str, Any] = {"benchmark": "end-to-end engine speed, dummy weights, quantkit vs transformers",
                              **provenance("cuda"), "model": args.model, "torch": torch.__version__}
    copy_bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = round(copy_bw / 1e9, 1)
    runners = {"decode": lambda: part_decode(args, copy_bw), "throughput": lambda: part_throughput(args),
               "quantized": lambda: part_quantized(args), "longctx": lambda: part_longctx(args)}
    for part in parts:
        report[part] = runners[part]()
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_json(Path(args.out), report)  # after every part: a later failure keeps what was measured
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
