"""Where a decode step's time goes: host time per phase (schedule, prepare, forward launch, sample launch, wait for
the sampled ids, update) against the GPU's busy time, with and without CUDA graphs and async scheduling, on dummy
weights at a fixed decode batch.

Two passes per mode over the same steps: host phases timed with perf_counter and no profiler (whose per-op
recording would inflate host time), then torch.profiler with CUDA activity only, for the GPU busy time (the
union of kernel and copy intervals) and the launches per step; `busy_of_step` is that busy time over the first
pass's step time. `wait` is the host waiting for the GPU: the copy of the sampled ids is the step's only sync.
Synchronous steps wait for the step just launched; async scheduling waits for the one before it, so there `wait`
shrinks as the host work hides the GPU's.

    python benchmarks/step_profile.py                       # llama3-8b on GPU, graphs vs eager
    python benchmarks/step_profile.py --device cpu          # smollm2-135m shape on CPU, eager
    python benchmarks/step_profile.py --device cpu --host-only --batch 256   # the engine's host work alone
    python benchmarks/step_profile.py --device cpu --host-only --batch 64 --output-kinds FINAL_ONLY,CUMULATIVE
    python benchmarks/step_profile.py --model smollm2-135m --batch 64 --modes cuda_graphs \
        --async-scheduling on,off,on,off                   # async scheduling against synchronous steps

--host-only replaces the model's forward and logits with preallocated tensors (a small vocabulary), so a step
costs only the host work around the model: scheduling, staging, the sampler's Python side, update and output
processing. That is the part CUDA graphs cannot hide.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType

from quantkit import LLM, RequestOutputKind, SamplingParams
from quantkit.config import EngineConfig
from quantkit.harness.runner import provenance, write_json
from quantkit.kernels import pdl

PHASES = ("schedule", "prepare", "forward", "sample", "wait", "update")


class PhaseTimer:
    """Host seconds per phase, accumulated by wrapping the methods that make up a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._active: set[str] = set()
        self.enabled = False

    def wrap(self, owner: object, name: str, phase: str) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.enabled or phase in self._active:  # nested calls count once
                return method(*args, **kwargs)
            self._active.add(phase)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self._active.discard(phase)
        setattr(owner, name, timed)

    @contextmanager
    def timing(self) -> Iterator[None]:
        self.seconds.clear()
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False


def instrument(llm: LLM) -> PhaseTimer:
    engine = llm.llm_engine
    runner = engine.runner
    timer = PhaseTimer()
    timer.wrap(engine, "step", "total")
    timer.wrap(engine.scheduler, "schedule", "schedule")
    timer.wrap(runner, "_stage", "prepare")
    timer.wrap(runner.model, "forward", "forward")
    if runner.graphs is not None:
        timer.wrap(runner.graphs, "run", "forward")
    timer.wrap(runner, "_prompt_logprobs", "sample")
    timer.wrap(runner, "_sample", "sample")
    timer.wrap(runner, "wait", "wait")
    timer.wrap(engine.scheduler, "update", "update")
    timer.wrap(engine.output_processor, "process", "update")
    return timer


def stub_model(llm: LLM, vocab: int = 256) -> None:
    """Forward returns rows of one preallocated hidden state and compute_logits rows of fixed random logits:
    no model compute left in the step. Token ids stay in [0, vocab), valid for any model. One CPU thread: the
    sampler's few small ops then cost what they cost, not a thread-pool wake-up that varies by milliseconds."""
    torch.set_num_threads(1)
    engine = llm.llm_engine
    model, config = engine.runner.model, engine.scheduler.config
    device = engine.runner.device
    hidden = torch.zeros(config.max_num_batched_tokens, engine.model_config.hidden_size, device=device)
    logits = torch.randn(config.max_num_batched_tokens, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    model.forward = lambda input_ids, positions, meta: hidden[:input_ids.shape[0]]
    model.compute_logits = lambda h: logits[:h.shape[0]]


def kernel_times(prof: torch.profiler.profile, steps: int, top: int = 15) -> dict[str, dict[str, float]]:
    """The `top` kernels (and copies) by GPU time: microseconds per step and the launches of each per step."""
    total, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            total[e.name] += e.time_range.end - e.time_range.start
            count[e.name] += 1
    ranked = sorted(total, key=total.get, reverse=True)[:top]
    return {name[:100]: {"us": round(total[name] / steps, 1), "launches": round(count[name] / steps, 1)}
            for name in ranked}


def gpu_busy(prof: torch.profiler.profile) -> tuple[float, int]:
    """(seconds some kernel or copy ran, number of them) from a CUDA-activity profile."""
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for lo, hi in intervals:
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    return busy / 1e6, len(intervals)


def run_steps(llm: LLM, steps: int, sync: Callable[[], None]) -> float:
    engine = llm.llm_engine
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    return time.perf_counter() - start


def profile_mode(args: argparse.Namespace, enforce_eager: bool, output_kind: RequestOutputKind,
                 async_scheduling: bool) -> dict:
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    # On CPU the KV pool is sized for the run (the default budget would preempt a large batch mid-measurement).
    tokens_per_seq = args.prompt_len + args.warmup + 2 * args.steps + 2
    options = ({"gpu_memory_utilization": args.gpu_memory_utilization} if cuda
               else {"num_kv_blocks": args.batch * (-(-tokens_per_seq // EngineConfig.block_size) + 1)})
    llm = LLM(args.model, load_format="dummy", skip_tokenizer_init=True, device=args.device,
              max_model_len=args.max_model_len, max_num_seqs=args.batch, enforce_eager=enforce_eager,
              async_scheduling=async_scheduling, quantization=args.quantization, **options)
    if args.host_only:
        stub_model(llm)
    timer = instrument(llm)
    engine = llm.llm_engine
    # No output cap: the batch must not shrink while it is measured (max_model_len stops it long after).
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True, output_kind=output_kind)
    vocab = engine.model_config.vocab_size
    for i in range(args.batch):
        engine.add_request([(31 * i + j) % (vocab - 10) + 10 for j in range(args.prompt_len)], params)
    while engine.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()  # prefills
    if max(r.num_tokens for r in engine.scheduler.running) + args.warmup + 2 * args.steps >= args.max_model_len:
        raise ValueError("--max-model-len leaves too little room for the measured steps")
    run_steps(llm, args.warmup, sync)
    with timer.timing():
        wall = run_steps(llm, args.steps, sync)
    host = dict(timer.seconds)
    result = {
        "mode": "eager" if enforce_eager or not cuda else "cuda_graphs",
        "output_kind": output_kind.name,
        "async_scheduling": async_scheduling,
        "step_ms": round(1e3 * wall / args.steps, 3),
        "host_ms_per_step": {p: round(1e3 * host.get(p, 0.0) / args.steps, 3) for p in ("total", *PHASES)},
        "decode_tokens_per_s": round(args.batch * args.steps / wall, 1),
    }
    graphs = engine.runner.graphs
    result["graph_steps"] = graphs.num_steps if graphs is not None else 0
    if cuda:
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            wall = run_steps(llm, args.steps, sync)
        busy, launches = gpu_busy(prof)
        result["gpu"] = {"busy_ms_per_step": round(1e3 * busy / args.steps, 3),
                         "busy_fraction": round(busy / wall, 3),
                         "kernels_and_copies_per_step": round(launches / args.steps, 1)}
        # The measure: the GPU's busy time against the step time of the unprofiled pass (busy_fraction
        # divides by the profiled pass's wall time, which the profiler's host overhead stretches).
        result["gpu"]["busy_of_step"] = round(1e3 * busy / args.steps / result["step_ms"], 3)
        result["gpu"]["top_kernels_per_step"] = kernel_times(prof, args.steps)
        if args.trace:
            scheduling = "async" if async_scheduling else "sync"
            prof.export_chrome_trace(str(Path(args.out).with_suffix(f".{result['mode']}.{scheduling}.trace.json")))
    del llm, engine, graphs, timer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--model", default=None, help="dummy preset (default: llama3-8b on cuda, smollm2-135m on cpu)")
    ap.add_argument("--quantization", default=None,
                    help="a method quantizing the dummy weights at load (awq, nf4, ...)")
    ap.add_argument("--batch", type=int, default=32, help="decode batch (also max_num_seqs)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default: 512 on cuda, 64 on cpu")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20, help="decode steps per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--modes", default=None, help="comma list of cuda_graphs,eager (default: both on cuda)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    ap.add_argument("--host-only", action="store_true", help="stub the model out: time the host work alone")
    ap.add_argument("--output-kinds", default="FINAL_ONLY",
                    help="comma list of FINAL_ONLY (what LLM.generate asks for), CUMULATIVE (streaming)")
    ap.add_argument("--async-scheduling", default="on",
                    help="comma list of on (the engine's default), off (synchronous steps); alternate to compare")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch plainly: with programmatic dependent launch a kernel's profiled time includes its "
                         "wait for the one before, so only plain launches give per-kernel times that add up")
    ap.add_argument("--trace", action="store_true", help="also write a chrome trace per run beside --out")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.model = args.model or ("llama3-8b" if args.device == "cuda" else "smollm2-135m")
    args.prompt_len = args.prompt_len or (512 if args.device == "cuda" else 64)
    args.out = args.out or f"benchmarks/results/step_profile_{args.device}.json"
    modes = (args.modes or ("cuda_graphs,eager" if args.device == "cuda" else "eager")).split(",")
    if unknown := set(modes) - {"cuda_graphs", "eager"}:
        raise ValueError(f"--modes: unknown {sorted(unknown)} (known: cuda_graphs, eager)")
    if "cuda_graphs" in modes and args.device != "cuda":
        raise ValueError("--modes cuda_graphs needs --device cuda")
    pdl.set_enabled(not args.no_pdl)
    kinds = args.output_kinds.split(",")
    if unknown := set(kinds) - set(RequestOutputKind.__members__):
        raise ValueError(f"--output-kinds: unknown {sorted(unknown)} "
                         f"(known: {', '.join(RequestOutputKind.__members__)})")
    schedulings = args.async_scheduling.split(",")
    if unknown := set(schedulings) - {"on", "off"}:
        raise ValueError(f"--async-scheduling: unknown {sorted(unknown)} (known: on, off)")
    report = {"benchmark": "decode step profile, dummy weights, greedy, fixed batch", **provenance(args.device),
              "model": args.model, "quantization": args.quantization, "pdl": not args.no_pdl,
              "host_only": args.host_only, "batch": args.batch, "prompt_len": args.prompt_len,
              "max_model_len": args.max_model_len, "steps": args.steps,
              "runs": [profile_mode(args, mode == "eager", RequestOutputKind[kind], scheduling == "on")
                       for mode in modes for kind in kinds for scheduling in schedulings]}
    write_json(Path(args.out), report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
