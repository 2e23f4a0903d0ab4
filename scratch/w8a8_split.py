import sys, json, os, torch
sys.path.insert(0, "benchmarks")
import torch.nn.functional as F
from linear_kernels import time_calls, build_layer, layer_copies, bf16_copies, SHAPES_8B
from quantkit.kernels.triton_w8a8 import quantize_per_token, scaled_gemm8
dev = torch.device("cuda"); gen = torch.Generator().manual_seed(0)
l2 = torch.cuda.get_device_properties(dev).L2_cache_size
rows = []
for n, k in SHAPES_8B:
    w = bf16_copies(n, k, gen, dev, l2)
    layer = build_layer("fp8", n, k, gen, dev)[0]
    copies = layer_copies(layer, l2)
    for c in copies: c.w_scale = c.weight_scale.reshape(-1, 1).float().contiguous()
    for m in (1, 16):
        x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
        xq, xs = quantize_per_token(x, torch.float8_e4m3fn)
        bf16 = time_calls([(lambda t=t: F.linear(x, t)) for t in w])
        quant = time_calls([lambda: quantize_per_token(x, torch.float8_e4m3fn)] * len(copies))
        gemm = time_calls([(lambda c=c: scaled_gemm8(xq, c.weight, xs, c.w_scale, None, torch.bfloat16, split=True)) for c in copies])
        def both_call(c):
            q, s = quantize_per_token(x, torch.float8_e4m3fn)
            return scaled_gemm8(q, c.weight, s, c.w_scale, None, torch.bfloat16, split=True)
        both = time_calls([(lambda c=c: both_call(c)) for c in copies])
        r = dict(n=n, k=k, m=m, bf16_us=bf16*1e6, quant_us=quant*1e6, gemm_us=gemm*1e6, both_us=both*1e6,
                 speedup_both=bf16/both, speedup_gemm=bf16/gemm)
        rows.append(r); print({a: round(b, 2) for a, b in r.items()}, flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "w8a8_split.json"), "w"), indent=1)
