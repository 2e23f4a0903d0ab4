"""The engine on a GPU with dummy weights: start-up (weights, profiled KV sizing) and decode speed of the
current torch-reference path, as a baseline for the GPU issues.

    python benchmarks/engine_gpu_smoke.py --model llama3-8b --out benchmarks/results/engine_gpu_smoke.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import torch

from quantkit import LLM, SamplingParams


def timed_generate(llm: LLM, batch: int, prompt_len: int, output_len: int) -> float:
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    if any(len(o.outputs[0].token_ids) != output_len for o in outs):
        raise RuntimeError("wrong output length")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/engine_gpu_smoke.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    start = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096)
    startup = time.perf_counter() - start
    engine = llm.llm_engine
    timed_generate(llm, 1, 16, 4)  # warm-up
    runs = {}
    for batch in map(int, args.batches.split(",")):
        seconds = timed_generate(llm, batch, args.prompt_len, args.output_len)
        runs[f"batch_{batch}"] = {"seconds": round(seconds, 3),
                                  "output_tokens_per_s": round(batch * args.output_len / seconds, 2)}
    report = {
        "benchmark": "engine smoke on GPU, dummy weights, torch reference attention and linears",
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv), "model": args.model, "dtype": str(engine.dtype),
        "startup_seconds": round(startup, 2),
        "kv_capacity_tokens": engine.scheduler.kv.num_blocks * engine.config.block_size,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "prompt_len": args.prompt_len, "output_len": args.output_len, "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
