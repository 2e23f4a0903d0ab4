"""K-slice sweep of the CUDA GEMVs (quantkit/kernels/cuda_gemv.py) on the Llama-3-8B shapes: the time per call at
each slice count from a fraction of a wave of blocks to several waves, next to bf16 cuBLAS, and how far the count
that `k_slices` picks is from the fastest one. Timed like linear_kernels.py (CUDA graphs over enough weight copies
to defeat L2).

    python benchmarks/gemv_slices.py --ms 1,16,32,64 --out benchmarks/results/gemv_slices_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from linear_kernels import SHAPES_8B, bf16_copies, build_layer, geomean, layer_copies, time_calls

from quantkit.kernels.cuda_gemv import MAX_M, CudaNF4Gemv, CudaWNA16Gemv, block_rows, k_cut
from quantkit.kernels.triton_common import num_sms

FORMATS = {"w4a16_awq_g128": CudaWNA16Gemv, "nf4_double_quant": CudaNF4Gemv}
MAX_COUNTS = 16  # slice counts timed per (shape, M), spread over the range


def slice_counts(tiles: int, steps: int, max_steps: int, slots: int) -> dict[int, int]:
    """{slices: steps per slice} for the distinct cuts from 0.4 to 7 waves of `slots` blocks."""
    cuts = dict(k_cut(steps, -(-steps // per)) for per in range(1, max_steps + 1))
    cuts = {s: per for s, per in cuts.items() if 0.4 * slots <= tiles * s <= 7 * slots or s == 1}
    counts = sorted(cuts)
    if len(counts) > MAX_COUNTS:
        counts = [counts[round(i * (len(counts) - 1) / (MAX_COUNTS - 1))] for i in range(MAX_COUNTS)]
    return {c: cuts[c] for c in counts}


def sweep(ms: list[int], formats: list[str], device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    rows = []
    for n, k in SHAPES_8B:
        w = bf16_copies(n, k, gen, device, l2)
        for fmt in formats:
            cls = FORMATS[fmt]
            layer = build_layer(fmt, n, k, gen, device)[0]
            copies = layer_copies(layer, l2)
            kernels = [cls(c, c.quant_method) for c in copies]
            steps = -(-k // cls.STEP_K)
            chosen_by_m = list(kernels[0].slices)  # the sweep overwrites them
            for m in ms:
                x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
                bf16 = time_calls([(lambda t=t: F.linear(x, t)) for t in w], reps=7)
                chosen = chosen_by_m[m - 1]
                tiles = kernels[0].tiles(m)
                slots = num_sms(device) * cls.BLOCKS_PER_SM[block_rows(m, cls.MAX_ROWS)]
                max_steps = cls.max_steps(block_rows(m, cls.MAX_ROWS), device)
                cuts = slice_counts(tiles, steps, max_steps, slots) | {chosen[0]: chosen[1]}
                for slices, per in sorted(cuts.items()):
                    for kern in kernels:
                        kern.slices = [(slices, per)] * MAX_M
                    us = time_calls([(lambda kern=kern, c=c: kern.apply(c, x, None))
                                     for kern, c in zip(kernels, copies)], reps=7) * 1e6
                    rows.append({"format": fmt, "n": n, "k": k, "m": m, "tiles": tiles, "slots": slots,
                                 "slices": slices, "steps_per_slice": per, "blocks": tiles * slices,
                                 "chosen": (slices, per) == chosen, "us": round(us, 2),
                                 "speedup": round(bf16 * 1e6 / us, 3)})
            del layer, copies, kernels
        del w
        torch.cuda.empty_cache()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (format, shape, M): the chosen count's time over the fastest count's."""
    out = []
    for key in dict.fromkeys((r["format"], r["n"], r["k"], r["m"]) for r in rows):
        sel = [r for r in rows if (r["format"], r["n"], r["k"], r["m"]) == key]
        best = min(sel, key=lambda r: r["us"])
        chosen = next(r for r in sel if r["chosen"])
        out.append({"format": key[0], "n": key[1], "k": key[2], "m": key[3], "chosen_slices": chosen["slices"],
                    "best_slices": best["slices"], "chosen_over_best": round(chosen["us"] / best["us"], 3),
                    "chosen_speedup": chosen["speedup"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1,16,32,64")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--out", default="/tmp/gemv_slices.json")
    args = ap.parse_args()
    if unknown := set(args.formats.split(",")) - set(FORMATS):
        ap.error(f"--formats: unknown {sorted(unknown)} (known: {', '.join(FORMATS)})")
    start = time.time()
    device = torch.device("cuda")
    rows = sweep([int(m) for m in args.ms.split(",")], args.formats.split(","), device)
    summary = summarize(rows)
    for s in summary:
        print(f"{s['format']:18s} {s['n']:5d}x{s['k']:<5d} M={s['m']:2d}: chosen {s['chosen_slices']:3d} slices "
              f"({s['chosen_speedup']:.2f}x bf16), fastest {s['best_slices']:3d}, chosen/fastest "
              f"{s['chosen_over_best']:.3f}")
    report = {"benchmark": "CUDA GEMV K-slice sweep", "device": torch.cuda.get_device_name(device),
              "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
              "torch": torch.__version__,
              "geomean_chosen_over_best": round(geomean([s["chosen_over_best"] for s in summary]), 3),
              "summary": summary, "rows": rows, "seconds": round(time.time() - start, 1)}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
