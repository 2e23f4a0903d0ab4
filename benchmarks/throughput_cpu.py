"""Offline throughput of the engine on CPU for the embedded model beside transformers' static-batch generate,
on the same ShareGPT requests in the same run (same precision, same output lengths). A thin program over the
harness (`quantkit bench` does the same with every option).

    python benchmarks/throughput_cpu.py --num-prompts 32 --max-output-len 64
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantkit.harness.bench import BenchConfig, bench
from quantkit.harness.runner import provenance, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-output-len", type=int, default=64)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peers", nargs="*", default=["transformers"], help="transformers, transformers-cb, bnb-nf4")
    ap.add_argument("--out", default="benchmarks/results/throughput_cpu.json")
    args = ap.parse_args()
    config = BenchConfig(num_prompts=args.num_prompts, max_output_len=args.max_output_len,
                         max_prompt_len=args.max_prompt_len, seed=args.seed, modes=["throughput"],
                         peers=args.peers, hf_batch_size=args.hf_batch_size)
    result = bench({"model": "smollm2-135m", "device": "cpu", "dtype": "float32", "max_num_seqs": args.max_num_seqs}, config)
    report = {"benchmark": "offline throughput, CPU, embedded SmolLM2-135M-Instruct fp32, ShareGPT (vLLM sampling)",
              **provenance("cpu"), **result}
    write_json(Path(args.out), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
