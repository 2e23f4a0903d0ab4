"""Peer engines run on quantkit's workload in the same process, same precision, same output lengths:

- `transformers`: `generate` with static batching (left-padded batches in arrival order; each batch runs until
  its longest output is done, the way vLLM's HF backend benchmark runs it),
- `transformers-cb`: transformers' continuous batching (the manager behind `generate_batch`, fed one request at
  a time so each keeps its own output length),
- `bnb-nf4`: bitsandbytes NF4 weights through transformers (`BitsAndBytesConfig(load_in_4bit=True)`), static
  batching as above.

A peer that cannot run here (no `generate_batch` in the installed transformers, bitsandbytes without 4-bit
support on this device, dummy weights for a peer that needs a checkpoint) or that fails reports
{"unavailable": reason} instead of failing the benchmark. Only the requested output tokens count towards a peer's throughput. Every
engine, quantkit included, gets one short untimed warm-up request first.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from quantkit.checkpoint.resolve import ModelSource
from quantkit.harness.workload import BenchRequest


@dataclass
class PeerTarget:
    """What a peer needs to load the same model: the checkpoint (or dummy shape), dtype and device."""
    source: ModelSource
    dtype: torch.dtype
    device: torch.device


class PeerUnavailable(Exception):
    """The peer cannot run in this environment; the message says why."""


def load_transformers(target: PeerTarget, quantization_config: Any = None) -> Any:
    """The same weights in transformers; dummy shapes get transformers' own random init on the device."""
    import transformers
    from transformers import AutoModelForCausalLM
    if target.source.path is None:
        if quantization_config is not None:
            raise PeerUnavailable("needs a checkpoint directory (dummy weights cannot be quantized on load)")
        hf = dict(target.source.hf_config)
        config = getattr(transformers, f"{hf['model_type'].capitalize()}Config")(**{
            k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")})
        with torch.device(target.device):
            return AutoModelForCausalLM.from_config(config, dtype=target.dtype).eval()
    kwargs: dict[str, Any] = {"dtype": target.dtype}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=str(target.device))
    model = AutoModelForCausalLM.from_pretrained(str(target.source.path), **kwargs).eval()
    return model if quantization_config is not None else model.to(target.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def static_batch_seconds(model: Any, requests: list[BenchRequest], batch_size: int, device: torch.device,
                         desc: str) -> float:
    pad = 0
    warm = torch.ones(1, 8, dtype=torch.long, device=device)  # first-call costs (CUDA/cuBLAS init) stay untimed
    model.generate(input_ids=warm, attention_mask=torch.ones_like(warm), do_sample=False, eos_token_id=None,
                   pad_token_id=pad, max_new_tokens=2)
    _sync(device)
    start = time.perf_counter()
    for i in tqdm(range(0, len(requests), batch_size), desc=desc, unit="batch"):
        batch = requests[i:i + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch],
                           device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids)
                             for r in batch], device=device)
        new = max(r.output_len for r in batch)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=None,
                             pad_token_id=pad, max_new_tokens=new, min_new_tokens=new)
        if out.shape[1] != width + new:
            raise RuntimeError(f"transformers generated {out.shape[1] - width} tokens instead of {new}")
    _sync(device)
    return time.perf_counter() - start


def _transformers(target: PeerTarget, requests: list[BenchRequest], config: Any) -> dict:
    model = load_transformers(target)
    return {"seconds": static_batch_seconds(model, requests, config.hf_batch_size, target.device,
                                            "transformers generate"),
            "batch_size": config.hf_batch_size}


def _transformers_cb(target: PeerTarget, requests: list[BenchRequest], config: Any) -> dict:
    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    model = load_transformers(target)
    if not hasattr(model, "init_continuous_batching"):
        raise PeerUnavailable(f"transformers {transformers.__version__} has no continuous batching (generate_batch)")
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.output_len for r in requests), eos_token_id=-1,
                           pad_token_id=0)
    # Its KV cache sized for the whole workload at once (its default takes most of free memory, which on CPU
    # means tens of seconds of allocation before the first token).
    block = 16
    blocks = sum(-(-(len(r.prompt_token_ids) + r.output_len) // block) for r in requests) + 8
    cb_config = ContinuousBatchingConfig(block_size=block, num_blocks=blocks, max_batch_tokens=2048)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config)
    manager.start()
    try:
        manager.add_request([1] * 8, request_id="warmup", max_new_tokens=2)  # untimed, like every engine here
        while (out := manager.get_result(timeout=60)) is None or not out.is_finished():
            if out is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching manager stopped during warm-up")
        _sync(target.device)
        start = time.perf_counter()
        ids = [manager.add_request(r.prompt_token_ids, request_id=f"req_{i}", max_new_tokens=r.output_len)
               for i, r in enumerate(requests)]
        results: dict[str, Any] = {}
        with tqdm(total=len(ids), desc="transformers continuous batching", unit="req") as bar:
            while len(results) < len(ids):
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    results[out.request_id] = out
                    bar.update(1)
                elif out is None and not manager.is_running():
                    raise RuntimeError("transformers' continuous batching manager stopped unexpectedly")
        _sync(target.device)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    got = [len(results[i].generated_tokens) for i in ids]
    if got != [r.output_len for r in requests]:
        raise RuntimeError("transformers continuous batching produced the wrong number of tokens")
    return {"seconds": seconds, "api": "init_continuous_batching (the manager behind generate_batch)"}


def _bnb_nf4(target: PeerTarget, requests: list[BenchRequest], config: Any) -> dict:
    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
        model = load_transformers(target, BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=target.dtype))
    except PeerUnavailable:
        raise
    except Exception as e:  # bitsandbytes builds differ in what they support per device: report, don't fail
        raise PeerUnavailable(f"bitsandbytes NF4 could not load on {target.device.type}: "
                              f"{type(e).__name__}: {e}") from e
    seconds = static_batch_seconds(model, requests, config.hf_batch_size, target.device, "bitsandbytes nf4")
    return {"seconds": seconds, "batch_size": config.hf_batch_size, "bitsandbytes": bitsandbytes.__version__,
            "weight_bytes": model.get_memory_footprint()}


PEERS: dict[str, Callable[[PeerTarget, list[BenchRequest], Any], dict]] = {
    "transformers": _transformers, "transformers-cb": _transformers_cb, "bnb-nf4": _bnb_nf4}


def run_peer(name: str, target: PeerTarget, requests: list[BenchRequest], config: Any) -> dict:
    """{"seconds": ..., details} or {"unavailable": why}."""
    try:
        return PEERS[name](target, requests, config)
    except PeerUnavailable as e:
        print(f"peer {name}: unavailable: {e}")
        return {"unavailable": str(e)}
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to report, not a reason to lose ours
        print(f"peer {name}: failed: {type(e).__name__}: {e}")
        return {"unavailable": f"failed: {type(e).__name__}: {e}"}
