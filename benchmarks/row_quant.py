"""Per-token activation quant on thread-block clusters (csrc/row_quant.cu) against the Triton kernels it stands in
for, at Llama-3-8B widths: SiLU-and-mul + quant of 14336-wide rows (the down projection's input) and plain quant of
4096- and 14336-wide rows, FP8 and INT8, T in {1, 16, 64, 128, 256, 4096}, every cluster size that covers a row
(1-8 blocks per row) and the one kernels/cuda_row_quant.py picks ("auto_cluster"); "engine" is what the engine
runs at that shape (cluster kernel or Triton, cuda_row_quant.serves). Each cluster launch's codes and scales are
checked against the Triton kernel's on the same input before it is timed. Times: median CUDA-graph replay
(linear_kernels.time_calls) over enough input copies that no call finds its input in L2.

    python benchmarks/row_quant.py --out benchmarks/results/row_quant_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
from linear_kernels import copies_for, tensor_bytes, time_calls, write_report
from tqdm import tqdm

from quantkit.kernels import cuda_ext, cuda_row_quant, fused_ops
from quantkit.kernels.triton_w8a8 import quantize_per_token
from quantkit.quant.w8a8 import FP8, INT8, QuantizedActivation, W8Type

CASES = [("silu_and_mul", 14336), ("plain", 4096), ("plain", 14336)]
TOKENS = [1, 16, 64, 128, 256, 4096]
QUANT = {"fp8": FP8, "int8": INT8}


def quantize(op: str, x: torch.Tensor, qtype: W8Type) -> QuantizedActivation:
    """The op as its caller runs it (cluster kernel where cuda_row_quant allows it, else Triton)."""
    if op == "silu_and_mul":
        return fused_ops.silu_and_mul(x, qtype)
    return QuantizedActivation(*quantize_per_token(x, qtype.dtype), x.dtype)


def case_row(op: str, cols: int, t: int, qname: str, gen: torch.Generator, device: torch.device) -> dict:
    qtype = QUANT[qname]
    x = torch.randn(t, 2 * cols if op == "silu_and_mul" else cols, generator=gen).to(device, torch.bfloat16)
    sets = [x] + [x.clone() for _ in range(copies_for(tensor_bytes(x), torch.cuda.get_device_properties(device)
                                                      .L2_cache_size) - 1)]
    row = {"op": op, "cols": cols, "t": t, "quant": qname, "engine_runs": "cluster" if cuda_row_quant.serves(x, cols)
           else "triton"}
    with cuda_row_quant.use_cuda_row_quant(False):
        want = quantize(op, x, qtype)
        row["triton_us"] = round(time_calls([lambda i=i: quantize(op, i, qtype) for i in sets]) * 1e6, 2)
    row["engine_us"] = round(time_calls([lambda i=i: quantize(op, i, qtype) for i in sets]) * 1e6, 2)
    q, scale = torch.empty_like(want.q), torch.empty_like(want.scale)
    auto = cuda_row_quant.cluster_size(t, cols, device)
    for blocks in range(1, cuda_row_quant.MAX_CLUSTER + 1):
        if -(-cols // 8 // blocks) > cuda_row_quant.MAX_BLOCK_THREADS:
            continue
        torch.ops.quantkit.row_quant(x, q, scale, op == "silu_and_mul", blocks)
        codes_differ = (qtype.to_float(q) != qtype.to_float(want.q)).float().mean().item()
        if codes_differ > 0.01 or not torch.allclose(scale, want.scale, rtol=1e-2):
            raise AssertionError(f"{op} {qname} T={t}, {blocks} blocks per row: not the Triton kernel's quant "
                                 f"({codes_differ:.2%} of codes differ)")
        seconds = time_calls([lambda i=i: torch.ops.quantkit.row_quant(i, q, scale, op == "silu_and_mul", blocks)
                              for i in sets])
        row[f"cluster{blocks}_us"] = round(seconds * 1e6, 2)
    row["auto_cluster"] = auto
    row["auto_cluster_us"] = row.get(f"cluster{auto}_us")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/row_quant.json")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("row_quant.py needs a CUDA device with thread-block clusters (sm_90+)")
    ops, reason = cuda_ext.load()
    if ops is None:
        sys.exit(f"row_quant.py needs the csrc/ kernels: {reason}")
    start = time.perf_counter()
    device, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    cases = [(op, cols, int(t), q) for op, cols in CASES for t in args.tokens.split(",") for q in QUANT]
    rows = []
    for op, cols, t, qname in tqdm(cases, desc="row quant"):
        rows.append(case_row(op, cols, t, qname, gen, device))
        r = rows[-1]
        tqdm.write(f"{op:13s} {cols:6d} T={t:5d} {qname}: triton {r['triton_us']} us, engine ({r['engine_runs']}) "
                   f"{r['engine_us']} us, clusters " + ", ".join(f"{b}: {r[f'cluster{b}_us']}" for b in range(1, 9)
                                                                 if f"cluster{b}_us" in r))
    report = {"benchmark": "per-token activation quant: thread-block-cluster kernel vs Triton, CUDA-graph timed",
              "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "dtype": "bfloat16", "rows": rows}
    write_report(report, start, args.out)


if __name__ == "__main__":
    main()
