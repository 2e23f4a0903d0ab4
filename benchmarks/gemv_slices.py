"""K-slice sweep of the CUDA GEMVs (quantkit/kernels/cuda_gemv.py) on the Llama-3-8B shapes: time per call for
several blocks-per-multiprocessor targets (how finely K is cut), next to bf16 cuBLAS, to choose
the kernels' BLOCKS_PER_SM. Timed like linear_kernels.py (CUDA graphs over enough weight copies to defeat L2).

    python benchmarks/gemv_slices.py --ms 1,4,8,16 --out /tmp/gemv_slices.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from linear_kernels import SHAPES_8B, bf16_copies, build_layer, geomean, layer_copies, time_calls

from quantkit.kernels.cuda_gemv import MAX_M, CudaNF4Gemv, CudaWNA16Gemv, k_slices
from quantkit.kernels.triton_common import num_sms

FORMATS = {"w4a16_awq_g128": CudaWNA16Gemv, "w4a16_gptq_actorder_g128": CudaWNA16Gemv,
           "nf4_double_quant": CudaNF4Gemv}
TARGETS = (0.75, 1, 1.5, 2, 3, 4)


def sweep(ms: list[int], device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    rows = []
    for n, k in SHAPES_8B:
        w = bf16_copies(n, k, gen, device, l2)
        for fmt, cls in FORMATS.items():
            layer = build_layer(fmt, n, k, gen, device)[0]
            copies = layer_copies(layer, l2)
            kernels = [cls(c, c.quant_method) for c in copies]
            steps = -(-k // cls.STEP_K)
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
                bf16 = time_calls([(lambda t=t: F.linear(x, t)) for t in w], reps=7)
                for target in TARGETS:
                    slices = k_slices(kernels[0].tiles(m), steps, cls.MAX_STEPS, num_sms(device), target)
                    for kern in kernels:
                        kern.slices = [slices] * MAX_M
                    us = time_calls([(lambda kern=kern, c=c: kern.apply(c, x, None))
                                     for kern, c in zip(kernels, copies)], reps=7) * 1e6
                    rows.append({"format": fmt, "n": n, "k": k, "m": m, "blocks_per_sm": target, "slices": slices,
                                 "us": round(us, 2), "speedup": round(bf16 * 1e6 / us, 3)})
            del layer, copies, kernels
        del w
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,4,8,16")
    ap.add_argument("--out", default="/tmp/gemv_slices.json")
    args = ap.parse_args()
    rows = sweep([int(m) for m in args.ms.split(",")], torch.device("cuda"))
    for fmt in FORMATS:
        for m in sorted({r["m"] for r in rows}):
            sel = [r for r in rows if r["format"] == fmt and r["m"] == m]
            by_target = {t: geomean([r["speedup"] for r in sel if r["blocks_per_sm"] == t]) for t in TARGETS}
            best = max(by_target, key=by_target.get)
            print(f"{fmt:26s} M={m:2d}: geomean speedup by blocks/SM " +
                  " ".join(f"{t}:{v:.2f}" for t, v in by_target.items()) +
                  f" -> best {best} (current {FORMATS[fmt].BLOCKS_PER_SM[m > 1]})")
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
