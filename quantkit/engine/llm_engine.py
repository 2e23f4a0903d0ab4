"""The step-level engine: add_request / step / abort / has_unfinished. One step = schedule -> launch -> update.

With async scheduling (EngineConfig.async_scheduling) a step's results are processed by the next call, after that
call has scheduled and launched its own step: the host's scheduling, input staging, updates, stop checks and
detokenization overlap the device's forward instead of alternating with it."""
from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from quantkit.checkpoint.resolve import ModelSource, resolve_model
from quantkit.config import KV_CACHE_DTYPES, EngineConfig, ModelConfig, resolve_device, resolve_dtype
from quantkit.engine.kv_cache import allocate_kv_cache, attention_layers, bytes_per_block
from quantkit.engine.kv_cache_manager import KVCacheManager
from quantkit.engine.model_runner import LaunchedStep, ModelRunner
from quantkit.engine.output_processor import OutputProcessor
from quantkit.engine.request import Request, RequestStatus
from quantkit.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from quantkit.kernels.select import use_linear_kernel
from quantkit.layers.attention import use_attention_backend
from quantkit.models.loader import build_model, weight_bytes
from quantkit.outputs import RequestOutput
from quantkit.quant.kv_cache import CALIBRATION_TEXT, FP8_MAX, calibrate_kv_scales
from quantkit.quant.registry import get_quant_config
from quantkit.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A launched step whose results have not been processed yet."""
    scheduled: SchedulerOutput
    launched: LaunchedStep
    overlappable: bool  # the next step may be scheduled before this one's tokens are on the host


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.source: ModelSource = resolve_model(config.model, config.load_format)
        self.model_config = ModelConfig.from_hf(self.source.hf_config)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.max_model_len = self._max_model_len()
        quant_config = get_quant_config(config.quantization, self.model_config.quantization_config,
                                        config.quantization_config, dummy=config.load_format == "dummy")
        with use_linear_kernel(config.linear_kernel), use_attention_backend(config.attention_backend):
            self.model = build_model(self.source, self.dtype, self.device, config.load_format == "dummy",
                                     quant_config, config.seed)
        self.tokenizer = None if config.skip_tokenizer_init else self._load_tokenizer()
        self.eos_token_ids = frozenset(self._eos_ids())
        kv_dtype = KV_CACHE_DTYPES[config.kv_cache_dtype] or self.dtype
        backend = attention_layers(self.model)[0].backend
        if kv_dtype != self.dtype and kv_dtype not in backend.kv_cache_dtypes:
            raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} is not supported by the {backend.name} "
                             f"attention backend")
        self._prepare_kv_scales(kv_dtype)
        batched = config.max_num_batched_tokens or max(self.max_model_len if not config.enable_chunked_prefill
                                                       else 0, 2048)
        num_blocks = self._num_kv_blocks(kv_dtype, batched)
        allocate_kv_cache(self.model, num_blocks, config.block_size, kv_dtype, self.device)
        kv_bytes = num_blocks * bytes_per_block(self.model, config.block_size, kv_dtype)
        logger.info("memory: weights %.2f GB, KV cache %.2f GB (%s) = %d tokens in %d blocks of %d",
                    self.weight_bytes / 1e9, kv_bytes / 1e9, str(kv_dtype).removeprefix("torch."),
                    num_blocks * config.block_size, num_blocks, config.block_size)
        scheduler_config = SchedulerConfig(
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=batched, max_model_len=self.max_model_len,
            enable_chunked_prefill=config.enable_chunked_prefill, block_size=config.block_size)
        self.scheduler = Scheduler(scheduler_config,
                                   KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching))
        self.runner = ModelRunner(self.model, scheduler_config, self.device, config.seed)
        if self.device.type == "cuda":
            if config.enforce_eager:
                logger.info("CUDA graphs: off (enforce_eager)")
            elif not backend.cuda_graphs:
                logger.info("CUDA graphs: off (the %s attention backend is not graph-safe)", backend.name)
            else:
                self.runner.init_decode_graphs(capture=True)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self.num_computed_tokens_total = 0
        self._in_flight: _InFlight | None = None
        if self.device.type == "cuda":
            self._compile_kernels()
        logger.info("async scheduling: %s", "on" if config.async_scheduling else "off")

    # ---- start-up ---------------------------------------------------------------------------------------

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        wanted = self.config.max_model_len or limit
        if wanted > limit:
            raise ValueError(f"max_model_len={wanted} exceeds the model's max_position_embeddings={limit}")
        return wanted

    def _load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer
        path = self.config.tokenizer or (str(self.source.path) if self.source.path else None)
        if path is None:
            raise ValueError(f"model {self.source.name!r} has no tokenizer: pass tokenizer=PATH or "
                             "skip_tokenizer_init=True and give prompts as token ids")
        return AutoTokenizer.from_pretrained(path)

    def _eos_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        gen = self.source.path / "generation_config.json" if self.source.path else None
        if gen is not None and gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _prepare_kv_scales(self, kv_dtype: torch.dtype) -> None:
        """FP8 KV needs per-layer scales: from the checkpoint, a calibration pass, or 1.0 — always said."""
        layers = self.model_config.num_hidden_layers
        if kv_dtype not in FP8_MAX:
            if self.config.calculate_kv_scales:
                raise ValueError("calculate_kv_scales=True needs kv_cache_dtype fp8/fp8_e4m3/fp8_e5m2")
            return
        if self.model.num_kv_scaled_layers:
            logger.info("FP8 KV cache: k/v scales loaded from the checkpoint for %d/%d layers",
                        self.model.num_kv_scaled_layers, layers)
        elif self.config.calculate_kv_scales:
            if self.tokenizer is None:
                raise ValueError("calculate_kv_scales needs a tokenizer for its calibration text")
            calibrate_kv_scales(self.model, self.tokenizer(CALIBRATION_TEXT).input_ids, kv_dtype)
            logger.info("FP8 KV cache: k/v scales calibrated for %d/%d layers (amax / %g)", layers, layers,
                        FP8_MAX[kv_dtype])
        else:
            logger.warning("FP8 KV cache: the checkpoint has no k/v scales; using 1.0 for all %d layers "
                           "(pass calculate_kv_scales=True to calibrate them)", layers)

    def _num_kv_blocks(self, kv_dtype: torch.dtype, batched_tokens: int) -> int:
        per_block = bytes_per_block(self.model, self.config.block_size, kv_dtype)
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, int(self.config.kv_cache_memory_gb * 1e9) // per_block)
        return self._profile_gpu_blocks(per_block, batched_tokens)

    @torch.inference_mode()
    def _profile_gpu_blocks(self, per_block: int, batched_tokens: int) -> int:
        """Run one forward at the largest step size with no cache, then give the KV pool what is left of
        gpu_memory_utilization after weights and that peak."""
        from quantkit.layers.attention import AttentionMetadata
        from quantkit.layers.sampler import Sampler, SamplingBatch
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = min(batched_tokens, self.max_model_len)
        ids = torch.zeros(tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, torch.arange(tokens, device=self.device),
                            AttentionMetadata.for_prefill([tokens], self.device))
        rows = min(tokens, self.config.max_num_seqs)
        # The sampler's worst case too: every row with top-k, top-p, penalties and logprobs.
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1, logprobs=5)
        Sampler()(self.model.compute_logits(hidden[-rows:]),
                  SamplingBatch(params=[params] * rows, generators=[None] * rows, prompt_token_ids=[[0]] * rows,
                                output_token_ids=[[0]] * rows, eos_token_ids=[frozenset()] * rows))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        _, total = torch.cuda.mem_get_info(self.device)
        budget = total * self.config.gpu_memory_utilization - peak
        torch.cuda.empty_cache()  # the profile's activations back to the device, for the decode graphs' own pool
        if budget < per_block:
            raise ValueError(f"no memory left for the KV cache: weights + activations peak at {peak / 1e9:.2f} GB "
                             f"of {total / 1e9:.2f} GB x gpu_memory_utilization={self.config.gpu_memory_utilization}")
        return int(budget // per_block)

    @torch.inference_mode()
    def _compile_kernels(self) -> None:
        """Runs throwaway requests through the step shapes serving meets (full prefill chunks, mixed prefill and
        decode steps, uncaptured batches) so that the Triton kernels compile their variants here, not inside the
        first requests: the first engine of a process on an H100 compiled for 2.6 s here (Llama-3-8B dummy, bf16),
        time that used to land in its first timed run. The prefix cache and the counters start clean afterwards."""
        start = time.perf_counter()
        batched = self.scheduler.config.max_num_batched_tokens
        cap = min(self.max_model_len, self.kv_capacity_tokens) - 4  # one prompt must fit the pool alone
        # Lengths even and odd: Triton compiles a kernel apart for integer arguments divisible by 16 or not.
        long, short = max(1, min(batched, cap)), max(1, min(64, cap))
        prompts = [long, max(1, long - 1)] + [max(1, short - i % 2)
                                               for i in range(min(self.config.max_num_seqs, 2 * batched // short))]
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        for i, n in enumerate(prompts):
            self.add_request([1 + i % 97] * n, params, request_id=f"warm-up {i}")
        while self.has_unfinished_requests():
            self.step()
        self.step()  # drops a step still in flight
        self.scheduler.kv.block_pool.reset_prefix_cache()
        self.num_computed_tokens_total = 0
        logger.info("kernels compiled and warmed up by %d throwaway requests in %.1f s", len(prompts),
                    time.perf_counter() - start)

    # ---- requests ---------------------------------------------------------------------------------------

    def tokenize(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt", "")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; this engine was built with skip_tokenizer_init")
            return prompt, self.tokenizer(prompt).input_ids
        ids = list(prompt)
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {vocab})")
        return None, ids

    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Validates everything before any state changes; raises ValueError naming the problem."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(ids)} tokens leaves no room to generate "
                             f"within max_model_len={self.max_model_len}")
        params = replace(params)  # the engine annotates its copy, never the caller's object
        sequences = [Request(request_id if params.n == 1 else f"{request_id}#{i}", ids, params,
                             eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len, index=i,
                             parent_id=request_id) for i in range(params.n)]
        sequences[0].pending_forks = sequences[1:]
        self.scheduler.add_request(sequences[0])
        self.output_processor.add(request_id, text, sequences)
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        """Frees the requests' KV blocks at once; returns their final (aborted) outputs."""
        outputs = []
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            seq_ids = self.output_processor.sequence_ids(rid)
            self.scheduler.finish_requests(seq_ids, RequestStatus.FINISHED_ABORTED)
            for seq_id in seq_ids:
                self.runner.forget(seq_id)
            out = self.output_processor.finish_aborted(rid)
            if out is not None:
                outputs.append(out)
        return outputs

    def step(self) -> list[RequestOutput]:
        """Schedules and launches a step. Synchronous: returns its outputs. Async: returns the outputs of the step
        launched by the previous call, processed while this call's step runs on the device; a step whose tokens
        the next schedule needs on the host (see `_overlappable`) is processed first instead."""
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and not self._in_flight.overlappable:
            outputs = self._process(self._take_in_flight())
        out = self.scheduler.schedule()
        launched = None
        if not out.is_empty:
            launched = _InFlight(out, self.runner.launch(out), self._overlappable(out))
            self.num_computed_tokens_total += out.num_batched_tokens
        if self._in_flight is not None:
            outputs = self._process(self._take_in_flight())
        self._in_flight = launched
        if launched is not None and not self.config.async_scheduling:
            outputs = self._process(self._take_in_flight())
        return outputs

    def _overlappable(self, out: SchedulerOutput) -> bool:
        """Whether the step after `out` may be scheduled and launched before `out`'s tokens reach the host. Not
        when `out` forks n > 1 children (they take their parent's block table when the tokens arrive, which the
        next schedule could preempt away) or a request's next sampling reads its output tokens (penalties,
        min_tokens): such a step is processed before the next is scheduled."""
        if not self.config.async_scheduling:
            return False
        for s in out.scheduled:
            if s.sample and (s.forks or s.request.sampling_reads_outputs()):
                return False
        return True

    def _take_in_flight(self) -> _InFlight:
        step, self._in_flight = self._in_flight, None
        return step

    def _process(self, step: _InFlight) -> list[RequestOutput]:
        """Waits for the step's tokens, then updates the requests, checks stops and builds the outputs."""
        runner_out = self.runner.wait(step.launched)
        if runner_out.prompt_logprobs:  # not of requests aborted while the step ran: their state is gone
            live = {s.request.request_id for s in step.scheduled.scheduled if not s.request.is_finished}
            runner_out.prompt_logprobs = {rid: v for rid, v in runner_out.prompt_logprobs.items() if rid in live}
        updated = self.scheduler.update(step.scheduled, runner_out.sampled)
        outputs, stopped = self.output_processor.process(updated, runner_out)
        self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        for seq in updated:
            if seq.is_finished or seq.request_id in stopped:
                self.runner.forget(seq.request_id)
        return outputs

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.scheduler.kv.num_blocks * self.config.block_size

    def has_unfinished_requests(self) -> bool:
        """Step until False and no output is lost: a request whose tokens are in flight is unfinished until they
        are processed. A step still in flight after that holds only finished requests (stopped while it ran, or
        aborted): the next step() drops it."""
        return self.scheduler.has_unfinished_requests()

    def get_tokenizer(self) -> Any:
        return self.tokenizer
