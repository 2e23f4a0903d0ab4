"""Quantized-linear kernels against their peers on one GPU, side by side in one run: bf16 cuBLAS, torch's int4
tinygemm (`_weight_int4pack_mm`), FP8 `_scaled_mm` (activations pre-quantized, as the issue measured it) and
`_int_mm`, then every quantkit kernel of each format (forced) and the automatic choice ("auto"), which is timed
again with programmatic dependent launch off ("auto_no_pdl"; kernels/pdl.py). Act-order layers are also timed as the
engine runs them ("auto_folded"): the op before each writes its input columns in the layer's order
(LlamaDecoderLayer.fold_input_permutations), so the layer gathers nothing; their goals are checked on that row,
"auto" being the layer alone on unpermuted input. Dynamic W8A8 layers are also timed as the engine runs them
("auto_fused"): RMSNorm (before qkv and gate_up) and SiLU-and-mul (before down) emit the activation already quantized
(models/llama.py), so those layers take codes and run no quant pass, and what quantizing adds to the op before them
(its time with quant minus without, `producer_quant_seconds`) is added to theirs; o_proj's input comes from
attention in 16 bits, so its row is the layer with its own quant pass ("auto"), as are all four at M = 1, where
the GEMM quantizes the row itself (quant/w8a8.py: input_quant_for). The W8A8 goals are checked on that row.
Shapes: the Llama-3-8B layers and the embedded model's; M in {1, 16, 64, 256, 1024, 4096}.

Timing: each measurement is a CUDA graph that calls the kernel over R copies of the weights (R * bytes > 3x L2,
so no call finds its weights in L2), replayed and timed with CUDA events; the median per call is reported, with
the speedup over bf16 and the bandwidth achieved (weight + activation + output bytes / time) as a fraction of the
measured device-to-device copy bandwidth. Goals (issue 7) are checked on "auto", geometric mean over the 8B shapes.

    python benchmarks/linear_kernels.py --out benchmarks/results/linear_kernels.json
    python benchmarks/linear_kernels.py --tune --ms 1,16,64   # launch-config sweep of the small-M split-K kernels
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit.config import ModelConfig
from quantkit.kernels import pdl, random_layers
from quantkit.kernels.select import PRIORITY, kernel_class, select_kernels
from quantkit.models.presets import PRESETS
from quantkit.quant.base import replace_param
from quantkit.quant.w8a8 import quantize_activation
from quantkit.quant.wna16 import llama_linear_specs

SHAPES_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 16, 64, 256, 1024, 4096]
# format -> {M: goal} (speedup over bf16 cuBLAS, geometric mean over SHAPES_8B, activation quant included)
GOALS = {
    "w4a16_gptq_actorder_g128": {1: 3.0, 16: 3.0, 64: 2.0, 256: 1.0, 1024: 0.9, 4096: 0.9},
    "w4a16_awq_g128": {1: 3.0, 16: 3.0, 64: 2.0, 256: 1.0, 1024: 0.9, 4096: 0.9},
    "fp8": {1: 1.6, 16: 1.6, 1024: 1.6, 4096: 1.6},
    "int8": {1: 1.6, 16: 1.6, 1024: 1.4, 4096: 1.4},
    "nf4_double_quant": {1: 2.5, 16: 1.5, 256: 0.9, 1024: 0.9, 4096: 0.9},
}
BANDWIDTH_GOAL = 0.7  # of the copy bandwidth, at M = 1


# The op before a Llama layer that can emit its output quantized per token for a dynamic W8A8 layer
# (models/llama.py); attention, before o_proj, cannot.
QUANTIZING_PRODUCER = {"qkv_proj": "rms_norm", "gate_up_proj": "rms_norm", "down_proj": "silu_and_mul"}


def shape_roles(preset: str) -> dict[tuple[int, int], str]:
    """(N, K) -> the decoder layer's linear of that shape (qkv_proj, o_proj, gate_up_proj, down_proj)."""
    cfg = ModelConfig.from_hf(PRESETS[preset])
    specs = [s for s in llama_linear_specs(cfg) if s.prefix.startswith("model.layers.0.")]
    return {(sum(s.output_sizes), s.input_size): s.prefix.rsplit(".", 1)[-1] for s in specs}


ROLES = shape_roles("llama3-8b") | shape_roles("smollm2-135m")


def embedded_shapes() -> list[tuple[int, int]]:
    return list(shape_roles("smollm2-135m"))


def producer_quant_seconds(producer: str, m: int, k: int, qtype, gen: torch.Generator,
                           device: torch.device) -> float:
    """What emitting a [m, k] activation quantized adds to the op that makes it: the fused RMSNorm (with the
    residual add, as every decoder layer but the first runs it) or SiLU-and-mul, timed with and without quant."""
    from quantkit.kernels import fused_ops
    if producer == "rms_norm":
        x, res = (torch.randn(m, k, generator=gen).to(device, torch.bfloat16) for _ in range(2))
        w = torch.rand(k, generator=gen).to(device, torch.bfloat16)

        def call(quant):
            return fused_ops.rms_norm(x, w, 1e-5, res, quant)
    else:
        gate_up = torch.randn(m, 2 * k, generator=gen).to(device, torch.bfloat16)

        def call(quant):
            return fused_ops.silu_and_mul(gate_up, quant)
    reps = 20  # launches per graph: one producer launch is a few microseconds
    return time_calls([lambda: call(qtype)] * reps) - time_calls([lambda: call(None)] * reps)


def build_layer(fmt: str, n: int, k: int, gen: torch.Generator, device: torch.device):
    bf16 = torch.bfloat16
    if fmt == "w4a16_gptq_actorder_g128":
        return random_layers.wna16_layer(k, n, 4, 128, True, True, bf16, False, gen, device), "wna16"
    if fmt == "w4a16_awq_g128":
        return random_layers.wna16_layer(k, n, 4, 128, False, False, bf16, False, gen, device), "wna16"
    if fmt in ("fp8", "int8"):
        return random_layers.w8a8_layer(k, n, fmt == "fp8", False, bf16, False, gen, device), "w8a8"
    return random_layers.nf4_layer(k, [n], "nf4", True, bf16, False, gen, device), "nf4"


def time_calls(calls: list[Callable[[], object]], reps: int = 15) -> float:
    """Median seconds per call of one CUDA-graph replay of all `calls`."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    inner = max(1, int(1.0 / max(start.elapsed_time(end), 1e-3)))  # ~1 ms per timed sample
    for _ in range(100 * inner):  # ~0.1 s of work first: after an idle pause (a compile) the clocks ramp up again
        graph.replay()
    samples = []
    for _ in range(reps):
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner / len(calls))
    del graph
    return statistics.median(samples)


def copies_for(nbytes: int, l2_bytes: int) -> int:
    return max(1, min(16, math.ceil(3 * l2_bytes / max(nbytes, 1))))


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(layer) -> int:
    """Bytes a call reads from the layer's weight tensors (the bias is not counted)."""
    return tensor_bytes(*[p for name, p in layer.named_parameters() if name != "bias"])


def layer_copies(layer, l2_bytes: int) -> list:
    """`layer` and enough deep copies of it that calls cycling through them never find the weights in L2."""
    return [layer] + [copy.deepcopy(layer) for _ in range(copies_for(weight_bytes(layer), l2_bytes) - 1)]


def bf16_copies(n: int, k: int, gen: torch.Generator, device: torch.device, l2_bytes: int) -> list[torch.Tensor]:
    """A random bf16 weight [n, k] and enough clones to defeat L2 alike (the cuBLAS baseline)."""
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device, torch.bfloat16)
    return [w] + [w.clone() for _ in range(copies_for(tensor_bytes(w), l2_bytes) - 1)]


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    a = torch.randn(256 * 2 ** 20, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    seconds = time_calls([lambda: b.copy_(a)])
    return 2 * tensor_bytes(a) / seconds


def peers(n: int, k: int, gen: torch.Generator, device: torch.device) -> dict[str, tuple]:
    """name -> (weights tuple, fn(weights, x) -> out) for the torch/cuBLAS peers, built once per shape."""
    w = (torch.randn(n, k, generator=gen) * 0.05).to(device, torch.bfloat16)
    out: dict[str, tuple] = {"bf16_cublas": ((w,), lambda ws, x: F.linear(x, ws[0]))}
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32).to(device)
    try:
        packed = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), 8)
        sz = torch.rand(k // 128, n, 2, generator=gen).to(device, torch.bfloat16)
        out["torch_int4pack_mm"] = ((packed, sz), lambda ws, x: torch._weight_int4pack_mm(x, ws[0], 128, ws[1]))
    except RuntimeError as e:
        logging.warning("tinygemm peer unavailable: %s", e)
    wq = (w.float() / w.float().abs().amax(1, keepdim=True) * 448).to(torch.float8_e4m3fn)
    ws = torch.rand(1, n, generator=gen).to(device)
    out["torch_scaled_mm_fp8"] = ((wq, ws), "fp8")
    wi = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
    out["torch_int_mm"] = ((wi,), "int8")
    return out


def peer_call(name: str, weights: tuple, fn, x: torch.Tensor, xq: dict) -> Callable[[], object] | None:
    if fn == "fp8":
        q, s = xq["fp8"]
        return lambda: torch._scaled_mm(q, weights[0].t(), scale_a=s, scale_b=weights[1], out_dtype=torch.bfloat16)
    if fn == "int8":
        if x.shape[0] <= 16:  # _int_mm needs M > 16
            return None
        return lambda: torch._int_mm(xq["int8"], weights[0].t())
    return lambda: fn(weights, x)


def run(shapes: list[tuple[int, int]], ms: list[int], formats: list[str], device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    copy_bw = copy_bandwidth()
    rows = []
    for n, k in shapes:
        peer_set = {}
        for name, (weights, fn) in peers(n, k, gen, device).items():
            reps = copies_for(tensor_bytes(*weights), l2)
            peer_set[name] = ([weights] + [tuple(t.clone() for t in weights) for _ in range(reps - 1)], fn)
        layers = {}
        for fmt in formats:
            layer, kfmt = build_layer(fmt, n, k, gen, device)
            layers[fmt] = (layer_copies(layer, l2), kfmt)
        for m in ms:
            x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
            amax = x.float().abs().amax(1, keepdim=True)
            xq = {"fp8": ((x.float() / amax * 448).to(torch.float8_e4m3fn), (amax / 448).contiguous()),
                  "int8": (x.float() / amax * 127).round().to(torch.int8)}
            io = tensor_bytes(x) + m * n * 2
            base = None
            for name, (copies, fn) in peer_set.items():
                if peer_call(name, copies[0], fn, x, xq) is None:
                    continue
                nbytes = tensor_bytes(*copies[0])
                seconds = time_calls([peer_call(name, c, fn, x, xq) for c in copies])
                base = base or seconds
                rows.append(_row("peer", name, n, k, m, seconds, base, nbytes + io, copy_bw))
            for fmt, (copies, kfmt) in layers.items():
                layer = copies[0]
                nbytes = weight_bytes(layer)
                folds = [] if getattr(layer, "perm", None) is None else ["auto_folded"]
                fused = ["auto_fused"] if getattr(layer.quant_method, "input_quant", None) is not None else []
                qtype = layer.quant_method.input_quant_for(m, x.dtype) if fused else None
                producer = QUANTIZING_PRODUCER.get(ROLES.get((n, k), "")) if qtype else None
                timed = {}
                for kname in [kn for kn in PRIORITY[kfmt] if kn != "torch"] + ["auto", "auto_no_pdl"] + folds + fused:
                    if kname.startswith("auto"):
                        kernels = [select_kernels(c, c.quant_method, kfmt) for c in copies]
                    else:
                        cls = kernel_class(kname)
                        if not cls.can_implement(layer, layer.quant_method, device)[0]:
                            continue
                        kernels = [cls(c, c.quant_method) for c in copies]
                    extra = {}
                    if kname == "auto_fused" and producer is None:
                        seconds = timed["auto"]  # its input comes in 16 bits: the layer quantizes it itself
                    elif kname == "auto_fused":
                        xa = quantize_activation(x, qtype)
                        delta = producer_quant_seconds(producer, m, k, qtype, gen, device)
                        seconds = time_calls([(lambda kern=kern, c=c: kern.apply(c, xa, None))
                                              for kern, c in zip(kernels, copies)]) + delta
                        extra = {"producer": producer, "producer_quant_us": round(delta * 1e6, 2)}
                    else:
                        calls = [(lambda kern=kern, c=c: kern.apply(c, x, None)) for kern, c in zip(kernels, copies)]
                        pdl.set_enabled(kname != "auto_no_pdl")
                        with input_order_folded(copies) if kname == "auto_folded" else nullcontext():
                            seconds = time_calls(calls)
                        pdl.set_enabled(True)
                    timed[kname] = seconds
                    row = _row(fmt, kname, n, k, m, seconds, base, nbytes + io, copy_bw) | extra
                    if kname.startswith("auto"):
                        row["auto_kernel"] = kernels[0].kernel_for(m).name
                    rows.append(row)
            print(f"N={n} K={k} M={m}: " + ", ".join(f"{r['format']}/{r['kernel']} {r['speedup']:.2f}x"
                                                    for r in rows if (r["n"], r["k"], r["m"]) == (n, k, m)
                                                    and r["kernel"] in ("auto", "auto_fused", "torch_int4pack_mm",
                                                                        "torch_scaled_mm_fp8", "torch_int_mm")),
                  flush=True)
        del layers, peer_set
        torch.cuda.empty_cache()
    return {"copy_bandwidth_GBps": round(copy_bw / 1e9, 1), "rows": rows}


@contextmanager
def input_order_folded(layers: list) -> Iterator[None]:
    """Act-order layers as the engine runs them: their input arrives in their order, so they gather nothing."""
    perms = [lay.take_input_permutation() for lay in layers]
    try:
        yield
    finally:
        for lay, perm in zip(layers, perms):
            replace_param(lay, "perm", perm)


def _row(fmt: str, kernel: str, n: int, k: int, m: int, seconds: float, base: float, nbytes: int,
         copy_bw: float) -> dict:
    return {"format": fmt, "kernel": kernel, "n": n, "k": k, "m": m, "us": round(seconds * 1e6, 2),
            "speedup": round(base / seconds, 3), "GBps": round(nbytes / seconds / 1e9, 1),
            "bw_fraction": round(nbytes / seconds / copy_bw, 4)}


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(rows: list[dict]) -> tuple[dict, list[dict]]:
    """Geometric-mean speedups over the 8B shapes per (format, kernel, M), and each goal's pass/miss."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        if (r["n"], r["k"]) in SHAPES_8B:
            table.setdefault(r["format"], {}).setdefault(r["kernel"], {}).setdefault(r["m"], []).append(r)
    summary = {f: {kn: {m: round(geomean([r["speedup"] for r in rs]), 3) for m, rs in by_m.items()
                        if len(rs) == len(SHAPES_8B)} for kn, by_m in kernels.items()}
               for f, kernels in table.items()}
    goals = []
    for fmt, by_m in GOALS.items():
        kname = next((kn for kn in ("auto_folded", "auto_fused") if kn in summary.get(fmt, {})), "auto")
        auto = summary.get(fmt, {}).get(kname, {})
        for m, goal in by_m.items():
            if m in auto:
                goals.append({"goal": f"{fmt} M={m} >= {goal}x", "kernel": kname, "measured": auto[m],
                              "pass": auto[m] >= goal, "short_by": round(max(0.0, goal - auto[m]), 3)})
        ones = table.get(fmt, {}).get(kname, {}).get(1, [])
        if len(ones) == len(SHAPES_8B):
            frac = geomean([r["bw_fraction"] for r in ones])
            goals.append({"goal": f"{fmt} M=1 bandwidth >= {BANDWIDTH_GOAL:.0%} of copy", "kernel": kname,
                          "measured": round(frac, 3),
                          "pass": frac >= BANDWIDTH_GOAL, "short_by": round(max(0.0, BANDWIDTH_GOAL - frac), 3),
                          "per_shape": {f"{r['n']}x{r['k']}": r["bw_fraction"] for r in ones}})
    return summary, goals


def _wna16_configs(m: int, n: int, k: int, device: torch.device) -> list:
    """Candidate launches of the small-M W4A16 kernel: tiles x warps x stages x programs per multiprocessor."""
    if m == 1:
        tiles = [(1, bn, rows * 8, w, 1) for bn, rows, w in
                 ((64, 32, 4), (128, 32, 4), (128, 16, 4), (128, 64, 8), (256, 32, 8), (64, 64, 4), (32, 64, 4))]
    else:
        bm = 16 if m <= 16 else 64
        tiles = [(bm, bn, 128, w, st) for bn, w, st in
                 ((64, 4, 2), (128, 4, 2), (64, 4, 4), (32, 4, 3), (128, 8, 3), (256, 8, 2))]
    return _with_splits(tiles, m, n, k, device)


def _w8a8_configs(m: int, n: int, k: int, device: torch.device) -> list:
    """Candidate launches of the small-M W8A8 split-K GEMM."""
    bm = 16 if m <= 16 else 64
    tiles = [(bm, bn, bk, w, st) for bn in (64, 128, 256) for bk in (128, 256) for w, st in ((4, 3), (4, 4), (8, 3))]
    return _with_splits(tiles, m, n, k, device)


def _with_splits(tiles: list[tuple], m: int, n: int, k: int, device: torch.device) -> list:
    from quantkit.kernels.triton_common import TileConfig, num_sms
    out = []
    for bm, bn, bk, w, st in tiles:
        for per_sm in (2, 4, 8):
            split = max(1, min(-(-per_sm * num_sms(device) // (-(-m // bm) * -(-n // bn))), k // bk))
            out.append(TileConfig(bm, bn, bk, split, w, st))
    return list(dict.fromkeys(out))


def _tunable(fmt: str, m: int, n: int, k: int, device: torch.device):
    """(default config, candidate configs, call(layer, x, config)) of a format's small-M split-K kernel."""
    if fmt.startswith("w4a16"):
        from quantkit.kernels.triton_wna16 import splitk_config, wna16_splitk_matmul
        return (splitk_config(m, n, k, 4, 128, device), _wna16_configs(m, n, k, device),
                lambda c, x, cfg: wna16_splitk_matmul(x, c.qweight, c.qzeros, c.scales, c.perm, None, 4, 128,
                                                      config=cfg))
    from quantkit.kernels.triton_w8a8 import TritonW8A8SplitK, default_config
    kernels: dict[int, TritonW8A8SplitK] = {}  # per layer copy, made by the warm-up calls before any capture

    def call(c, x, cfg):
        if id(c) not in kernels:
            kernels[id(c)] = TritonW8A8SplitK(c, c.quant_method)
        return kernels[id(c)].matmul(c, x, None, config=cfg)
    return default_config(m, n, k, device, True), _w8a8_configs(m, n, k, device), call


def tune(device: torch.device, ms: list[int], formats: list[str]) -> list[dict]:
    """Times launch configs of the small-M split-K kernels (W4A16 `wna16_splitk_matmul`, W8A8 `TritonW8A8SplitK`) on
    the 8B shapes against bf16 cuBLAS and the default config; prints the best config per (format, M, shape)."""
    gen = torch.Generator().manual_seed(0)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    out = []
    for n, k in SHAPES_8B:
        w = bf16_copies(n, k, gen, device, l2)
        for fmt in formats:
            layer = build_layer(fmt, n, k, gen, device)[0]
            copies = layer_copies(layer, l2)
            for m in [m for m in ms if m <= 64]:
                x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
                bf16 = time_calls([(lambda t=t: F.linear(x, t)) for t in w], reps=7)
                default, configs, run = _tunable(fmt, m, n, k, device)
                for cfg in [None] + configs:
                    calls = [(lambda c=c, cfg=cfg: run(c, x, cfg)) for c in copies]
                    try:
                        us = round(time_calls(calls, reps=7) * 1e6, 2)
                    except Exception as e:  # a config the compiler rejects (shared memory, registers)
                        logging.warning("%s M=%d %s: %s", fmt, m, cfg, e)
                        continue
                    out.append({"format": fmt, "n": n, "k": k, "m": m, "config": (cfg or default).__dict__,
                                "default": cfg is None, "us": us, "speedup": round(bf16 * 1e6 / us, 3)})
            del layer, copies
        del w
        torch.cuda.empty_cache()
    for (fmt, m) in dict.fromkeys((r["format"], r["m"]) for r in out):
        rows = [r for r in out if (r["format"], r["m"]) == (fmt, m)]
        base = [r["speedup"] for r in rows if r["default"]]
        best = {}
        for r in rows:
            key = (r["n"], r["k"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
        print(f"{fmt} M={m}: default geomean {geomean(base):.2f}x, best-per-shape geomean "
              f"{geomean([r['speedup'] for r in best.values()]):.2f}x")
        for r in best.values():
            print(f"   {r['n']}x{r['k']}: best {r['config']} {r['us']} us {r['speedup']}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/linear_kernels.json")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", choices=("all", "8b", "embedded"), default="all")
    ap.add_argument("--formats", default=",".join(GOALS))
    ap.add_argument("--tune", action="store_true", help="sweep Triton tile configs instead (writes --out)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        sys.exit("linear_kernels.py needs a CUDA device")
    device = torch.device("cuda")
    start = time.perf_counter()
    meta = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
            "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
            "triton": __import__("triton").__version__}
    if args.tune:
        tuned = [f for f in args.formats.split(",") if f.startswith("w4a16") or f in ("fp8", "int8")]
        report = {**meta, "tune": tune(device, [int(m) for m in args.ms.split(",")], tuned)}
    else:
        shapes = {"8b": SHAPES_8B, "embedded": embedded_shapes(), "all": SHAPES_8B + embedded_shapes()}[args.shapes]
        result = run(shapes, [int(m) for m in args.ms.split(",")], args.formats.split(","), device)
        summary, goals = summarize(result["rows"])
        report = {**meta, "benchmark": "quantized linear kernels vs bf16 cuBLAS and torch peers, CUDA-graph timed",
                  "dtype": "bfloat16", "copy_bandwidth_GBps": result["copy_bandwidth_GBps"],
                  "geomean_speedup_8b": summary, "goals": goals, "rows": result["rows"]}
        print(f"\ncopy bandwidth {result['copy_bandwidth_GBps']} GB/s; geomean speedup over bf16 (8B shapes):")
        for fmt, kernels in summary.items():
            for kname, by_m in kernels.items():
                print(f"  {fmt:28s} {kname:22s} " + " ".join(f"M={m}:{v:.2f}" for m, v in sorted(by_m.items())))
        print_goals(goals)
    write_report(report, start, args.out)


def print_goals(goals: list[dict]) -> None:
    for g in goals:
        print(f"  {'PASS' if g['pass'] else 'MISS'} {g['goal']}: {g['measured']}"
              + ("" if g["pass"] else f" (short by {g['short_by']})"))


def write_report(report: dict, start: float, out: str) -> None:
    """The report with its run time, as JSON at `out`."""
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
