"""What calibration buys on the embedded SmolLM2-135M, on CPU: each method is run as `quantkit quantize` under
a sampler of its /proc status (wall time, peak RSS and peak anonymous RSS) and scored against the unquantized model on held-out ShareGPT windows
(perplexity, KL, top-1 agreement), in one invocation:
  W4 g64: RTN vs AWQ vs GPTQ;  W8A8 INT8: plain per-channel (alpha 0) vs SmoothQuant (alpha 0.5);  FP8, NF4.
A second part quantizes a larger random Llama (written to a temporary directory) to show the layer-by-layer
memory bound: peak RSS against the size of the model held whole in fp32.

  python benchmarks/quantize_embedded.py [--nsamples 32 --seqlen 256 --windows 16 --eval-seqlen 512]
  -> benchmarks/results/quantize_embedded.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

VARIANTS = {
    "rtn-w4g64": ["--method", "rtn", "--group-size", "64"],
    "awq-w4g64": ["--method", "awq", "--group-size", "64"],
    "gptq-w4g64": ["--method", "gptq", "--group-size", "64"],
    "rtn-w4g64-asym": ["--method", "rtn", "--group-size", "64", "--asym"],
    "gptq-w4g64-asym": ["--method", "gptq", "--group-size", "64", "--asym"],
    "int8-plain": ["--method", "int8", "--alpha", "0"],
    "int8-smoothquant": ["--method", "int8", "--alpha", "0.5"],
    "fp8-dynamic": ["--method", "fp8"],
    "fp8-static": ["--method", "fp8", "--activation-scheme", "static"],
    "nf4": ["--method", "nf4"],
}


def timed_quantize(model: str, out: Path, method_args: list[str], calib: list[str]) -> dict:
    """Runs `quantkit quantize` in a child process, sampling its /proc status every 0.1 s: peak RSS (VmHWM) and
    peak anonymous RSS. The difference is file-backed pages: safetensors reads through mmap, so every checkpoint
    page read stays mapped in RSS until memory pressure reclaims it; the anonymous peak is the memory the run
    really needs."""
    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", model, "--output", str(out), "--overwrite",
           *method_args, *calib]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0}
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            for key in peak:
                peak[key] = max(peak[key], int(status.split(key + ":")[1].split()[0]))
        except (FileNotFoundError, IndexError):
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    summary = json.loads((out / "quantkit_quantize.json").read_text())
    errors = [layer["relative_error"] for layer in summary["layers"] if layer["relative_error"] is not None]
    return {"wall_seconds": round(seconds, 1), "peak_rss_mb": round(peak["VmHWM"] / 1024),
            "peak_anon_rss_mb": round(peak["RssAnon"] / 1024), "mb_after": round(summary["bytes_after"] / 1e6, 1),
            "mean_layer_error": sum(errors) / len(errors) if errors else None}


def evaluate_all(model: str, checkpoints: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    from quantkit import LLM
    from quantkit.harness.eval import EvalConfig, eval_inputs, evaluate, load_or_compute_reference
    llm_kwargs = {"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": 0.25}
    config = EvalConfig(windows=args.windows, seqlen=args.eval_seqlen, chat_prompts=0)
    inputs = eval_inputs(LLM(model, **llm_kwargs).get_tokenizer(), config)
    reference = load_or_compute_reference(model, inputs, config, **llm_kwargs)
    results = {"fp32 (reference)": {"perplexity": reference.perplexity, "weight_bytes": reference.weight_bytes}}
    for name, path in tqdm(checkpoints.items(), desc="evaluate", unit="model"):
        metrics = evaluate(LLM(str(path), **llm_kwargs), inputs, config, reference)
        results[name] = {k: metrics[k] for k in ("perplexity", "perplexity_increase_pct", "kl_mean", "kl_p99",
                                                 "top1_agreement", "weight_bytes")}
    results["eval"] = config.describe()
    return results


def memory_bound(args: argparse.Namespace, work: Path) -> dict:
    """A random 16-layer Llama of TinyLlama's width (fp16 on disk, SmolLM2's tokenizer): the peak memory of a
    calibrated run (SmoothQuant: activations through every layer) against holding the model in fp32."""
    import transformers

    from quantkit.checkpoint.resolve import resolve_model
    path = work / "random-llama"
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).half()
    params = sum(p.numel() for p in model.parameters())
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    model.save_pretrained(str(path), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # calibration text goes through a real tokenizer
        (path / name).write_bytes((resolve_model("smollm2-135m").path / name).read_bytes())
    del model
    calib = work / "calib.txt"
    calib.write_text("\n\n".join(f"Record {i}: measured {i * 3} units on line {i % 17}." for i in range(3000)))
    run = timed_quantize(str(path), work / "random-int8", ["--method", "int8"],
                         ["--calib", str(calib), "--nsamples", "16", "--seqlen", "128"])
    return {"model": "random Llama, 16 layers, hidden 2048, intermediate 5632, vocab 49152, fp16 on disk",
            "params": params, "fp32_whole_model_mb": round(params * 4 / 2**20),
            "fp32_one_layer_mb": round(layer_params * 4 / 2**20), "fp16_file_mb": round(params * 2 / 2**20),
            "int8_smoothquant": run}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--out", default="benchmarks/results/quantize_embedded.json")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="quantize and evaluate only these (merged into an existing --out file)")
    p.add_argument("--parts", nargs="+", default=["quality", "memory"], choices=["quality", "memory"],
                   help="run only some parts (the others are kept from an existing --out file)")
    args = p.parse_args()
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    out = Path(args.out)
    partial = len(args.parts) < 2 or len(args.variants) < len(VARIANTS)
    result = json.loads(out.read_text()) if out.exists() and partial else {}
    with tempfile.TemporaryDirectory(prefix="quantkit-bench-") as tmp:
        work = Path(tmp)
        if "quality" in args.parts:
            runs, checkpoints = result.get("quantize", {}), {}
            for name in tqdm(args.variants, desc="quantize", unit="method"):
                checkpoints[name] = work / name
                runs[name] = timed_quantize(args.model, checkpoints[name], VARIANTS[name], calib)
            quality = {**result.get("quality", {}), **evaluate_all(args.model, checkpoints, args)}
            result.update(quantize=runs, quality=quality,
                          calibration=f"ShareGPT calibration split, {args.nsamples} x {args.seqlen} tokens, seed 0")
        if "memory" in args.parts:
            result["memory_bound"] = memory_bound(args, work)
    commands = result.pop("commands", [])  # every invocation that contributed to this file, in order
    result.update(device=f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                  date=datetime.date.today().isoformat(), commands=[*commands, " ".join(["python", *sys.argv])])
    out.write_text(json.dumps(result, indent=1) + "\n")
    runs, quality, memory = result["quantize"], result["quality"], result["memory_bound"]
    rows = [f"{'variant':18} {'ppl':>8} {'+%':>7} {'KL':>8} {'top1':>6} {'MB':>7} {'s':>6} {'RSS MB':>7}"]
    for name, q in quality.items():
        if name == "eval":
            continue
        r = runs.get(name, {})
        rows.append(f"{name:18} {q['perplexity']:8.3f} {q.get('perplexity_increase_pct', 0):7.2f} "
                    f"{q.get('kl_mean', 0):8.4f} {q.get('top1_agreement', 1):6.3f} {q['weight_bytes'] / 1e6:7.1f} "
                    f"{r.get('wall_seconds', 0):6.1f} {r.get('peak_rss_mb', 0):7d}")
    print("\n".join(rows))
    print(json.dumps(memory, indent=1))


if __name__ == "__main__":
    main()
