"""Configuration dataclasses. `LLM(**kwargs)`, the CLI and YAML recipes fill the same objects; every check raises
ValueError naming the field, never an assert."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from quantkit.kernels.select import check_kernel_name
from quantkit.layers.attention import check_attention_backend_name

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}


def parse_dtype(value: str | torch.dtype, name: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ValueError(f"{name}={value!r} is not one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[value]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on GPU (fp16 overflows in some models) and fp32 on CPU (the exact reference path)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


@dataclass
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "RopeConfig":
        """Reads transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling` pair."""
        params = dict(hf.get("rope_parameters") or {})
        scaling = dict(hf.get("rope_scaling") or {})
        params = {**scaling, **params}
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        return cls(theta=float(theta), rope_type=rope_type, factor=float(params.get("factor", 1.0)),
                   low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                   # transformers falls back to max_position_embeddings when the key is absent
                   original_max_position_embeddings=int(params.get(
                       "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))))


@dataclass
class ModelConfig:
    """The architecture facts our Llama-family decoder needs, read from a Hugging Face config.json."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer, None = full attention
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    quantization_config: dict[str, Any] | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}: quantkit runs "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"config.json lacks required fields {missing}")
        heads = int(hf["num_attention_heads"])
        layers = int(hf["num_hidden_layers"])
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=RopeConfig.from_hf(hf),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_windows=_sliding_windows(hf, arch, layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            quantization_config=hf.get("quantization_config"),
        )


def _sliding_windows(hf: dict[str, Any], arch: str, layers: int) -> list[int | None]:
    """Per-layer window: `layer_types` when present (transformers 5), else the family's own rule."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if arch == "MistralForCausalLM":
        return [window] * layers
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        first = int(hf.get("max_window_layers", layers))
        return [window if i >= first else None for i in range(layers)]
    return [None] * layers


KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}


@dataclass
class EngineConfig:
    """Everything `LLM(...)` accepts (vLLM's names), validated once."""
    model: str
    quantization: str | None = None
    quantization_config: dict[str, Any] | None = None  # on-the-fly settings, e.g. {"bits": 4, "group_size": 64}
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_gb: float = 1.0       # the KV budget on CPU, where no device memory can be profiled
    num_kv_blocks: int | None = None      # overrides both budgets (tests, reproducible benchmarks)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    load_format: str = "auto"
    device: str = "auto"
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    calculate_kv_scales: bool = False      # FP8 KV: calibrate k/v scales with a short pass when not in the checkpoint
    linear_kernel: str | None = None       # force one quantized-linear kernel (kernels/select.py KERNELS), benchmarks
    attention_backend: str | None = None   # force "torch" or "triton" (layers/attention.py); None: Triton on CUDA
    enforce_eager: bool = False            # no CUDA graphs: every step runs the model layer by layer
    async_scheduling: bool = True          # schedule step N+1 while step N runs (llm_engine.py); outputs lag a step

    def __post_init__(self) -> None:
        checks = [
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization", "must be in (0, 1]"),
            (self.kv_cache_memory_gb > 0, "kv_cache_memory_gb", "must be > 0"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", "must be >= 1"),
            (self.block_size in (8, 16, 32, 64, 128), "block_size", "must be one of 8, 16, 32, 64, 128"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1"),
            (self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1, "max_num_batched_tokens",
             "must be >= 1"),
            (self.tensor_parallel_size == 1, "tensor_parallel_size", "must be 1 (tensor parallelism is not built yet)"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"must be one of {list(KV_CACHE_DTYPES)}"),
            (isinstance(self.async_scheduling, bool), "async_scheduling", "must be True or False"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        check_kernel_name(self.linear_kernel)
        check_attention_backend_name(self.attention_backend)
        resolve_device(self.device)
