"""Offline throughput of the engine on CPU for the embedded model, beside transformers' static-batch generate on
the same requests in the same run (same precision, same output lengths).

    python benchmarks/throughput_cpu.py --num-prompts 32 --max-output-len 64
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from quantkit import LLM, SamplingParams
from quantkit.harness.workload import sharegpt_requests


def run_quantkit(llm: LLM, requests) -> float:
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    if [len(o.outputs[0].token_ids) for o in outputs] != [r.output_len for r in requests]:
        raise RuntimeError("quantkit produced the wrong number of tokens")
    return elapsed


def run_transformers(model_dir: str, requests, batch_size: int) -> float:
    """Static batching: left-padded batches in arrival order, each runs until its longest output is done."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = time.perf_counter()
    for i in tqdm(range(0, len(requests), batch_size), desc="transformers"):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in batch])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0,
                           max_new_tokens=max(r.output_len for r in batch))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-output-len", type=int, default=64)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/throughput_cpu.json")
    args = ap.parse_args()

    llm = LLM("smollm2-135m", device="cpu", dtype="float32", max_num_seqs=args.max_num_seqs)
    requests = sharegpt_requests(llm.get_tokenizer(), args.num_prompts, args.seed,
                                 max_prompt_len=args.max_prompt_len, max_output_len=args.max_output_len)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    output_tokens = sum(r.output_len for r in requests)
    results = {"quantkit": run_quantkit(llm, requests)}
    if not args.skip_transformers:
        results["transformers_static_batch"] = run_transformers(str(llm.llm_engine.source.path), requests,
                                                                args.hf_batch_size)
    report = {
        "benchmark": "offline throughput, CPU, embedded SmolLM2-135M-Instruct fp32, ShareGPT (vLLM sampling)",
        "device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "num_prompts": len(requests), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "engines": {name: {"seconds": round(t, 3), "requests_per_s": round(len(requests) / t, 3),
                           "output_tokens_per_s": round(output_tokens / t, 2),
                           "total_tokens_per_s": round((prompt_tokens + output_tokens) / t, 2)}
                    for name, t in results.items()},
    }
    if "transformers_static_batch" in results:
        report["speedup_vs_transformers"] = round(results["transformers_static_batch"] / results["quantkit"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
