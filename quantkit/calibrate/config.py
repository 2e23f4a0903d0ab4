"""QuantizeConfig: everything one `quantkit quantize` run needs, validated up front so a bad argument fails before
any weight is read. The CLI, recipes and the Python API all fill this one dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("awq", "gptq", "int8", "fp8", "nf4", "fp4", "rtn")
RTN_FORMATS = ("gptq", "awq", "pack-quantized")
KV_CACHE_DTYPES = ("fp8_e4m3", "fp8_e5m2")
# Weight bits each method can write, its default first (int8/fp8 are 8-bit, AWQ GEMM and bitsandbytes 4-bit).
METHOD_BITS = {"awq": (4,), "gptq": (4, 2, 3, 8), "rtn": (4, 2, 3, 8), "int8": (8,), "fp8": (8,), "nf4": (4,),
               "fp4": (4,)}


@dataclass
class QuantizeConfig:
    """model: alias, HF directory or .gguf; output: the directory to write (atomically).
    bits None = the method's natural width (4 for awq/gptq/rtn/nf4/fp4, 8 for int8/fp8); sym None = the
    method's default (asymmetric for awq, symmetric otherwise).
    format: rtn's checkpoint format (gptq | awq | pack-quantized); the other methods have one each.
    activation_scheme (fp8): 'dynamic' per-token, or 'static' per-tensor scales calibrated here.
    smoothquant_alpha (int8): migration strength; 0 = plain per-channel INT8 (no smoothing).
    kv_cache_dtype: also calibrate per-layer FP8 KV-cache scales and write them into the checkpoint.
    ignore: module names (or suffixes) left unquantized; lm_head is never quantized by these writers."""
    model: str
    method: str
    output: str | Path
    bits: int | None = None
    group_size: int = 128
    sym: bool | None = None
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    format: str = "gptq"
    activation_scheme: str = "dynamic"
    smoothquant_alpha: float = 0.5
    calibration: str | Path = "sharegpt"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    kv_cache_dtype: str | None = None
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    device: str = "cpu"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {METHODS}")
        if self.sym is None:
            self.sym = self.method != "awq"  # AutoAWQ's default is zero-point (asymmetric) quantization
        if self.bits is None:
            self.bits = METHOD_BITS[self.method][0]
        if self.bits not in METHOD_BITS[self.method]:
            raise ValueError(f"--method {self.method} writes {METHOD_BITS[self.method]} bits, not {self.bits}")
        if self.group_size != -1 and (self.group_size < 1 or isinstance(self.group_size, bool)):
            raise ValueError(f"group_size must be a positive integer or -1 (per channel), got {self.group_size!r}")
        if self.format not in RTN_FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {RTN_FORMATS}")
        if self.activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"activation_scheme must be 'dynamic' or 'static', got {self.activation_scheme!r}")
        if self.activation_scheme == "static" and self.method != "fp8":
            raise ValueError("activation_scheme='static' applies to --method fp8 only")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must lie in [0, 1], got {self.smoothquant_alpha}")
        if not 0.0 < self.damp_percent < 1.0:
            raise ValueError(f"damp_percent must lie in (0, 1), got {self.damp_percent}")
        if self.desc_act and self.method not in ("gptq", "rtn"):
            raise ValueError(f"desc_act (act-order) applies to gptq and rtn, not {self.method}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES}")
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def needs_activations(self) -> bool:
        """Whether the run must push calibration tokens through the model (else weights are quantized alone)."""
        smoothing = self.method == "int8" and self.smoothquant_alpha > 0
        return self.method in ("awq", "gptq") or smoothing or self.activation_scheme == "static" \
            or self.kv_cache_dtype is not None
