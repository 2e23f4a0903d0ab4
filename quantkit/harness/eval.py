"""Accuracy of a model against its unquantized reference: perplexity, KL divergence of next-token
distributions, top-1 agreement and greedy exact match.

Windows. Held-out ShareGPT conversations (never calibrated on, `heldout_windows`) or a user's text file, cut by
the calibration window rule: documents joined with EOS and cut into consecutive non-overlapping windows of
`seqlen` tokens (stride = seqlen). Each window is scored on its own from an empty context; the first token has no
prediction, so a window contributes seqlen - 1 scored tokens.

KV cache. Windows run through the engine's paged KV cache, not a cache-free prefill: each window is fed in chunks
of `chunk_size` tokens (chunked prefill); every chunk writes its K/V into the pool in the cache dtype (FP8 with its
per-layer scales when `kv_cache_dtype` is fp8) and attends over what the pool holds, so later tokens read earlier
ones exactly as a served request would. (The torch reference backend reads even the current chunk's K/V back
from the pool, so with an FP8 cache every attention read is FP8.)

Reference. The unquantized model (the engine's dtype: float32 on CPU, bf16 on GPU) with a 16-bit KV cache. Its
top-k next-token log-probabilities per position and its greedy outputs are cached on disk, keyed by the reference
model's identity, the window tokens and the prompts, so a sweep computes them once.

KL(reference || model) per position is computed over the reference's top-k tokens plus one bucket holding the rest
of the vocabulary: sum_top-k p (log p - log q) + p_rest (log p_rest - log q_rest). Grouping can only lower a KL
(log-sum inequality), so this is a lower bound that is exact when the rest carries no mass; the mean mass outside
the top-k is reported as `reference_tail_mass` so the bound's slack is visible.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from quantkit.checkpoint.resolve import cache_dir
from quantkit.layers.attention import AttentionMetadata
from quantkit.llm import LLM
from quantkit.sampling_params import SamplingParams

REFERENCE_FORMAT = 1  # bump when the cached reference's contents change


@dataclass
class EvalConfig:
    """windows x seqlen held-out tokens (or the first windows of `text_file`), fed in chunks of chunk_size through
    the paged KV cache; top_k reference log-probs kept per position; chat_prompts greedy generations of
    max_tokens each for exact match (0 = skip)."""
    windows: int = 8
    seqlen: int = 256
    seed: int = 0
    text_file: str | None = None
    chunk_size: int = 128
    top_k: int = 64
    chat_prompts: int = 8
    max_tokens: int = 32
    max_prompt_len: int = 256

    def __post_init__(self) -> None:
        for name in ("windows", "seqlen", "chunk_size", "top_k", "max_tokens", "max_prompt_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"eval {name} must be a positive integer, got {value!r}")
        if self.seqlen < 2:
            raise ValueError(f"eval seqlen must be >= 2 (a window scores seqlen - 1 tokens), got {self.seqlen}")
        if isinstance(self.chat_prompts, bool) or not isinstance(self.chat_prompts, int) or self.chat_prompts < 0:
            raise ValueError(f"eval chat_prompts must be a non-negative integer, got {self.chat_prompts!r}")

    def describe(self) -> str:
        source = f"text file {self.text_file}" if self.text_file else "held-out ShareGPT"
        greedy = (f"; greedy exact match over {self.chat_prompts} chat prompts x {self.max_tokens} tokens"
                  if self.chat_prompts else "")
        return (f"{source}: {self.windows} windows x {self.seqlen} tokens (stride {self.seqlen}, chunked prefill "
                f"{self.chunk_size} through the paged KV cache), KL over reference top-{self.top_k} + rest{greedy}")


@dataclass
class EvalInputs:
    """What every model of a comparison is scored on: windows [N, seqlen] and chat prompts as token ids."""
    windows: torch.Tensor
    prompts: list[list[int]]

    def digest(self) -> str:
        h = hashlib.sha256(self.windows.numpy().tobytes())
        h.update(json.dumps(self.prompts).encode())
        return h.hexdigest()[:16]


def eval_inputs(tokenizer: Any, config: EvalConfig) -> EvalInputs:
    return EvalInputs(_windows(tokenizer, config), _chat_prompts(tokenizer, config))


def _windows(tokenizer: Any, config: EvalConfig) -> torch.Tensor:
    from quantkit.calibrate.data import file_documents, heldout_windows, token_windows
    if config.text_file is None:
        return heldout_windows(tokenizer, config.windows, config.seqlen, config.seed).input_ids
    path = Path(config.text_file).expanduser()
    docs = file_documents(tokenizer, path)  # file order: a user's text is scored as written
    total = sum(len(ids) + 1 for ids in tokenizer([d.text for d in docs], add_special_tokens=False).input_ids)
    n = min(config.windows, total // config.seqlen)
    if n == 0:
        raise ValueError(f"{path} holds {total} tokens, fewer than one window of seqlen={config.seqlen}")
    return token_windows(tokenizer, docs, n, config.seqlen, f"text file {str(path)!r}").input_ids


def _chat_prompts(tokenizer: Any, config: EvalConfig) -> list[list[int]]:
    """First user turns of held-out ShareGPT conversations, rendered through the chat template."""
    if not config.chat_prompts:
        return []
    from quantkit.calibrate.data import sharegpt_messages, sharegpt_split
    pool = sharegpt_split()[1]
    random.Random(config.seed).shuffle(pool)
    prompts = []
    for record in pool:
        messages = sharegpt_messages(record)
        if not messages or messages[0]["role"] != "user" or not messages[0]["content"].strip():
            continue
        text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= config.max_prompt_len:
            prompts.append(ids)
        if len(prompts) == config.chat_prompts:
            return prompts
    raise ValueError(f"the held-out pool has only {len(prompts)} chat prompts within max_prompt_len="
                     f"{config.max_prompt_len}")


@torch.inference_mode()
def window_logprobs(llm: LLM, ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Next-token log-probabilities [len(ids), vocab] (float32) of one window, run as a chunked prefill through
    the engine's paged KV cache (blocks borrowed from the engine's pool and given back)."""
    engine = llm.llm_engine
    if engine.has_unfinished_requests():
        raise ValueError("window_logprobs needs an idle engine")
    pool, bs, device = engine.scheduler.kv.block_pool, engine.config.block_size, engine.device
    n = len(ids)
    if n > engine.max_model_len:
        raise ValueError(f"eval seqlen={n} exceeds the engine's max_model_len={engine.max_model_len}")
    blocks = pool.get_new_blocks(-(-n // bs))
    try:
        table = torch.tensor([[b.block_id for b in blocks]], dtype=torch.int32, device=device)
        slots = torch.tensor([blocks[p // bs].block_id * bs + p % bs for p in range(n)], device=device)
        out = []
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            meta = AttentionMetadata(
                query_start_loc=torch.tensor([0, end - start], dtype=torch.int32, device=device),
                seq_lens=torch.tensor([end], dtype=torch.int32, device=device),
                query_start_loc_cpu=[0, end - start], seq_lens_cpu=[end],
                slot_mapping=slots[start:end], block_tables=table)
            hidden = engine.model(ids[start:end].to(device), torch.arange(start, end, device=device), meta)
            out.append(torch.log_softmax(engine.model.compute_logits(hidden).float(), -1).cpu())
        return torch.cat(out)
    finally:
        pool.free_blocks(blocks)


def greedy_outputs(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    if not prompts:
        return []
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@dataclass
class Reference:
    """The reference's top-k log-probs [positions, k] (float32) and token ids (int64) over every scored
    position of every window, its own metrics, and its greedy outputs."""
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor
    greedy: list[list[int]]
    perplexity: float
    weight_bytes: int

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"format": REFERENCE_FORMAT, "top_logprobs": self.top_logprobs, "top_ids": self.top_ids,
                    "greedy": self.greedy, "perplexity": self.perplexity, "weight_bytes": self.weight_bytes}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Reference | None:
        """None when the file is missing, unreadable or of another format (it is then recomputed)."""
        try:
            data = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != REFERENCE_FORMAT:
            return None
        return cls(data["top_logprobs"], data["top_ids"], data["greedy"], data["perplexity"], data["weight_bytes"])


def _scored(logprobs: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the positions that have a next token [seqlen-1, V], those next tokens [seqlen-1])."""
    return logprobs[:-1], window[1:]


def model_identity(model: str, **llm_kwargs: Any) -> dict:
    """What makes a reference's numbers, known without loading it: the checkpoint files (name, size, mtime),
    dtype and device type (a dummy preset: its name and seed)."""
    from quantkit.checkpoint.resolve import resolve_model
    from quantkit.config import resolve_device, resolve_dtype
    source = resolve_model(model, llm_kwargs.get("load_format", "auto"))
    device = resolve_device(llm_kwargs.get("device", "auto"))
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.path.iterdir() if f.is_file()) \
        if source.path is not None else [source.name, llm_kwargs.get("seed", 0)]
    return {"model": str(source.path or source.name), "files": files,
            "dtype": str(resolve_dtype(llm_kwargs.get("dtype", "auto"), device)), "device": device.type}


def reference_path(identity: dict, inputs: EvalInputs, config: EvalConfig, root: Path | None = None) -> Path:
    key = json.dumps({"model": identity, "inputs": inputs.digest(), "top_k": config.top_k,
                      "chunk": config.chunk_size, "max_tokens": config.max_tokens, "format": REFERENCE_FORMAT},
                     sort_keys=True)
    return (root or cache_dir() / "eval") / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def compute_reference(llm: LLM, inputs: EvalInputs, config: EvalConfig) -> Reference:
    logps, ids, nll = [], [], []
    for window in tqdm(inputs.windows, desc="reference windows", unit="win"):
        lp, targets = _scored(window_logprobs(llm, window, config.chunk_size), window)
        top = lp.topk(min(config.top_k, lp.shape[-1]), dim=-1)
        logps.append(top.values)
        ids.append(top.indices)
        nll.append(-lp.gather(-1, targets[:, None])[:, 0])
    return Reference(torch.cat(logps), torch.cat(ids), greedy_outputs(llm, inputs.prompts, config.max_tokens),
                     torch.cat(nll).mean().exp().item(), llm.llm_engine.weight_bytes)


def load_or_compute_reference(model: str, inputs: EvalInputs, config: EvalConfig, root: Path | None = None,
                              **llm_kwargs: Any) -> Reference:
    """The reference of `model` (unquantized, 16-bit KV cache) from the on-disk cache, else computed with
    LLM(model, **llm_kwargs) and cached."""
    path = reference_path(model_identity(model, **llm_kwargs), inputs, config, root)
    cached = Reference.load(path)
    if cached is not None and cached.top_ids.shape[0] == inputs.windows.shape[0] * (inputs.windows.shape[1] - 1):
        return cached
    ref = compute_reference(LLM(model, **llm_kwargs), inputs, config)
    ref.save(path)
    return ref


def kl_top_k(ref_logp: torch.Tensor, ref_ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || model) over the reference's top-k tokens plus a 'rest' bucket (see the
    module docstring); ref_logp/ref_ids [P, k], logp [P, V] the model's full log-probs."""
    p = ref_logp.exp()
    q_logp = logp.gather(-1, ref_ids)
    head = (p * (ref_logp - q_logp)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - q_logp.exp().sum(-1)).clamp_min(torch.finfo(torch.float32).tiny)
    return head + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()


def evaluate(llm: LLM, inputs: EvalInputs, config: EvalConfig, reference: Reference | None) -> dict:
    """Metrics of `llm` on `inputs`; the comparison metrics need `reference` (None: perplexity only)."""
    start = time.perf_counter()
    nll, kl, agree, tail = [], [], [], []
    offset = 0
    for window in tqdm(inputs.windows, desc="eval windows", unit="win"):
        lp, targets = _scored(window_logprobs(llm, window, config.chunk_size), window)
        nll.append(-lp.gather(-1, targets[:, None])[:, 0])
        if reference is not None:
            rows = slice(offset, offset + len(targets))
            ref_logp, ref_ids = reference.top_logprobs[rows], reference.top_ids[rows]
            kl.append(kl_top_k(ref_logp, ref_ids, lp))
            agree.append((lp.argmax(-1) == ref_ids[:, 0]).float())
            tail.append(1.0 - ref_logp.exp().sum(-1))
        offset += len(targets)
    engine = llm.llm_engine
    result: dict[str, Any] = {
        "perplexity": torch.cat(nll).mean().exp().item(),
        "tokens_scored": offset,
        "weight_bytes": engine.weight_bytes,
        "kv_capacity_tokens": engine.kv_capacity_tokens,
    }
    if reference is not None:
        kl_all = torch.cat(kl)
        result.update({
            "kl_mean": kl_all.mean().item(), "kl_p99": torch.quantile(kl_all.double(), 0.99).item(),
            "top1_agreement": torch.cat(agree).mean().item(),
            "reference_perplexity": reference.perplexity, "reference_weight_bytes": reference.weight_bytes,
            "perplexity_increase_pct": 100.0 * (torch.cat(nll).mean().exp().item() / reference.perplexity - 1.0),
            "reference_tail_mass": torch.cat(tail).mean().item(),
        })
        if inputs.prompts:
            outputs = greedy_outputs(llm, inputs.prompts, config.max_tokens)
            result["greedy_exact_match"] = sum(o == r for o, r in zip(outputs, reference.greedy)) / len(outputs)
            result["greedy_prefix_match"] = sum(_common_prefix(o, r) / max(len(r), 1)
                                                for o, r in zip(outputs, reference.greedy)) / len(outputs)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["eval"] = asdict(config)
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
