"""Launch-config sweeps of the W4A16 paths past the decode sizes, on the Llama-3-8B layer shapes, each config side
by side with bf16 cuBLAS in one run (timing as in linear_kernels.py: CUDA graphs over enough weight copies to
miss L2):

- wgmma: the wgmma GEMM's block height (128 / 256 rows of M) x K slices (1-4), with the one the selection rule
  picks (kernels/cuda_gemm.py: wgmma_tile_rows, MIN_SLICES) marked, and its geomean against the best per shape.
- dequant: the tile of the W4A16 and NF4 dequantize kernels (dequantize + cuBLAS serves W4A16 past M = 1024 and
  NF4 past M = 64), in GB/s moved.

    python benchmarks/large_m_configs.py --out benchmarks/results/wgmma_tiles_h100.json
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from linear_kernels import (SHAPES_8B, bf16_copies, build_layer, geomean, layer_copies, time_calls,  # noqa: E402
                            write_report)

from quantkit.kernels import triton_nf4, triton_wna16  # noqa: E402
from quantkit.kernels.cuda_gemm import CudaWNA16Wgmma  # noqa: E402
from quantkit.kernels.cuda_gemv import k_cut  # noqa: E402

FORMAT = "w4a16_awq_g128"
DEQUANT_TILES = {  # name -> (module, layer format, its DEQUANT_* names, candidate tiles; the current one is added)
    "w4a16": (triton_wna16, FORMAT, ("DEQUANT_BK", "DEQUANT_BN", "DEQUANT_WARPS"),
              [(32, 128, 4), (16, 256, 4), (32, 256, 4), (16, 512, 4), (8, 512, 4)]),
    "nf4": (triton_nf4, "nf4_double_quant", ("DEQUANT_BN", "DEQUANT_BK", "DEQUANT_WARPS"),
            [(32, 128, 4), (16, 128, 4), (64, 128, 4), (16, 256, 4), (32, 256, 4), (64, 64, 4), (32, 128, 8),
             (8, 256, 4)]),
}


def sweep_wgmma(ms: list[int], device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    rows_out, chosen_ratio, best_ratio = [], {m: [] for m in ms}, {m: [] for m in ms}
    for n, k in SHAPES_8B:
        layers = layer_copies(build_layer(FORMAT, n, k, gen, device)[0], l2)
        kernels = [CudaWNA16Wgmma(c, c.quant_method) for c in layers]
        weights = bf16_copies(n, k, gen, device, l2)
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
            bf16 = time_calls([lambda w=w: F.linear(x, w) for w in weights])
            rule = (kernels[0].tile_rows(m), kernels[0].split(m)[0])
            results = {}
            for rows in CudaWNA16Wgmma.TILE_ROWS:
                for slices in range(1, 5):
                    cut, per = k_cut(kernels[0].stages, slices)
                    if cut != slices:
                        continue
                    for kern in kernels:
                        kern.tile_rows = lambda _m, r=rows: r
                        kern._splits[m] = (slices, per)
                    seconds = time_calls([lambda c=c, kern=kern: kern.apply(c, x, None)
                                          for c, kern in zip(layers, kernels)])
                    results[(rows, slices)] = round(bf16 / seconds, 3)
            for kern in kernels:  # back to the rule
                del kern.tile_rows
                kern._splits.clear()
            best = max(results, key=results.get)
            chosen_ratio[m].append(results[rule])
            best_ratio[m].append(results[best])
            rows_out.append({"n": n, "k": k, "m": m, "bf16_us": round(bf16 * 1e6, 2), "rule": list(rule),
                             "best": list(best), "speedup": {f"{r}x{s}": v for (r, s), v in results.items()}})
            print(rows_out[-1], flush=True)
        del layers, kernels, weights
        torch.cuda.empty_cache()
    summary = {m: {"rule_geomean": round(geomean(chosen_ratio[m]), 3), "best_geomean": round(geomean(best_ratio[m]), 3)}
               for m in ms}
    print("wgmma rule vs best per shape:", summary)
    return {"rows": rows_out, "summary": summary}


def sweep_dequant(device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    out = []
    for name, (module, fmt, names, tiles) in DEQUANT_TILES.items():
        default = tuple(getattr(module, a) for a in names)
        for n, k in SHAPES_8B:
            layers = layer_copies(build_layer(fmt, n, k, gen, device)[0], l2)
            calls = [dequantize_call(name, c, k) for c in layers]
            moved = k * n * 2 + sum(t.numel() * t.element_size() for t in calls[0][1])
            for tile in dict.fromkeys([default, *tiles]):
                for attr, value in zip(names, tile):
                    setattr(module, attr, value)
                seconds = time_calls([fn for fn, _ in calls])
                out.append({"format": name, "n": n, "k": k, "tile": dict(zip(names, tile)), "default": tile == default,
                            "us": round(seconds * 1e6, 2), "GBps": round(moved / seconds / 1e9, 1)})
                print(out[-1], flush=True)
            for attr, value in zip(names, default):
                setattr(module, attr, value)
            del layers, calls
    return out


def dequantize_call(name: str, layer, k: int) -> tuple:
    """(call, the tensors it reads) of a layer's dequantize kernel."""
    if name == "w4a16":
        return (lambda: triton_wna16.wna16_dequantize(layer.qweight, layer.qzeros, layer.scales, 4, 128, k,
                                                      torch.bfloat16),
                (layer.qweight, layer.qzeros, layer.scales))
    c = layer.quant_method.config
    weights = triton_nf4.NF4Weights(layer, c.quant_type, c.blocksize, c.double_quant)
    return lambda: triton_nf4.nf4_dequantize(weights, torch.bfloat16), (weights.packed, weights.absmax)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/wgmma_tiles.json")
    ap.add_argument("--ms", default="256,512,1024")
    ap.add_argument("--parts", default="wgmma,dequant")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("large_m_configs.py needs a CUDA device")
    device, start = torch.device("cuda"), time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "format": FORMAT}
    parts = args.parts.split(",")
    if "wgmma" in parts:
        report["wgmma"] = sweep_wgmma([int(m) for m in args.ms.split(",")], device)
    if "dequant" in parts:
        report["dequant"] = sweep_dequant(device)
    write_report(report, start, args.out)


if __name__ == "__main__":
    main()
