"""`quantkit serve MODEL [...]`: the engine options of every other command plus the server's own. Nothing here
imports FastAPI or uvicorn until the command runs, so the rest of the CLI works without the [serve] extra."""
from __future__ import annotations

import argparse
import logging
import os
import signal
from collections import Counter
from typing import Any

from quantkit.config import EngineConfig

logger = logging.getLogger("quantkit.serve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: loopback only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model` (default: MODEL)")
    p.add_argument("--api-key", default=os.environ.get("QUANTKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $QUANTKIT_API_KEY)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests that may wait for a running slot; beyond it the server answers 503")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may finish after SIGTERM/SIGINT before they are aborted")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory when the model has none")
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="no tokenizer: prompts must be token ids, outputs carry token ids (dummy weights)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="fix the KV pool size (overrides budgets)")
    p.add_argument("--calculate-kv-scales", action="store_true", help="FP8 KV: calibrate k/v scales at start")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])


def describe(engine: Any) -> dict[str, Any]:
    """What the start-up log reports: the kernels each layer kind got, and the KV pool."""
    from quantkit.engine.kv_cache import attention_layers
    from quantkit.layers.linear import Linear
    def kernel(method: Any) -> str:
        plan = getattr(method, "kernels", None)  # quantized methods hold a KernelPlan (kernels/base.py)
        names = sorted({k.name for k in plan.kernels}) if plan is not None else []
        return type(method).__name__ + (f"[{'/'.join(names)}]" if names else "")
    linear = Counter(kernel(m.quant_method) for m in engine.model.modules() if isinstance(m, Linear))
    return {
        "attention": attention_layers(engine.model)[0].backend.name,
        "linear": ", ".join(f"{name} x{count}" for name, count in linear.most_common()),
        "kv_cache_dtype": engine.config.kv_cache_dtype,
        "kv_blocks": engine.scheduler.kv.num_blocks,
        "kv_tokens": engine.kv_capacity_tokens,
    }


def serve(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> None:
    try:
        from quantkit.server.app import make_server
    except ImportError as e:
        raise ValueError(f"quantkit serve needs the server extra ({e.name} is missing): "
                         "pip install 'quantkit[serve]'") from e
    from quantkit.engine.async_engine import AsyncLLMEngine
    from quantkit.engine.llm_engine import LLMEngine
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    config = EngineConfig(model=args.model, tokenizer=args.tokenizer, skip_tokenizer_init=args.skip_tokenizer_init,
                          num_kv_blocks=args.num_kv_blocks, calculate_kv_scales=args.calculate_kv_scales,
                          enable_prefix_caching=args.enable_prefix_caching, **engine_kwargs)
    engine = AsyncLLMEngine(LLMEngine(config), max_queue=args.max_queue)
    name = args.served_model_name or args.model
    info = describe(engine.engine)
    quantization = config.quantization or (engine.engine.model_config.quantization_config or {}).get(
        "quant_method", "none")
    logger.info("serving %s (%s) at http://%s:%d/v1 - quantization=%s, dtype=%s, device=%s", name, args.model,
                args.host, args.port, quantization, engine.engine.dtype, engine.engine.device)
    logger.info("kernels: attention=%s; linear: %s; KV cache %s: %d blocks = %d tokens; max_model_len=%d, "
                "max_num_seqs=%d, max_queue=%d, api key %s", info["attention"], info["linear"],
                info["kv_cache_dtype"], info["kv_blocks"], info["kv_tokens"], engine.engine.max_model_len,
                config.max_num_seqs, args.max_queue, "required" if args.api_key else "not required")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logger.warning("binding %s without --api-key: anyone who can reach this address can use the model",
                       args.host)
    server = make_server(engine, name, args.host, args.port, args.api_key, args.shutdown_timeout,
                         args.uvicorn_log_level)
    # uvicorn re-raises the signal that stopped it once it is done; after a graceful shutdown that should not
    # turn into a kill by SIGTERM or a KeyboardInterrupt, so the process exits 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    logger.info("server stopped")
