"""compressed-tensors checkpoints (FORMATS.md §3): `config_groups` of {targets, weights, input_activations, format},
an `ignore` list, a top-level `format`, `kv_cache_scheme` and `quantization_status`. Each Linear is dispatched to one
scheme: int-/naive-quantized INT8 and float-quantized FP8 (per-tensor, per-channel or block weight scales; static
or dynamic activations; or weight-only) run on the W8A8 method, pack-quantized WNA16 on quantkit.quant.wna16.
Legacy spellings accepted: the `compression_config` key, `naive-quantized` format and `frozen` status."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from quantkit.quant.base import QuantConfig, QuantMethod, layer_skipped, matches_any
from quantkit.quant.w8a8 import FP8, INT8, W8A8LinearMethod, W8A8Scheme

_W8_FORMATS = ("naive-quantized", "int-quantized", "float-quantized")
_FORMATS = (*_W8_FORMATS, "pack-quantized")
_STATUSES = ("frozen", "compressed")
_LINEAR_CLASS_TARGETS = ("Linear",)  # class-name targets; every other target is a module name or 're:' regex


@dataclass(frozen=True)
class QuantArgs:
    """One `weights` / `input_activations` entry (compressed-tensors QuantizationArgs)."""
    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: str | None = None
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    dynamic: bool | str = False
    actorder: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantArgs:
        block = d.get("block_structure")
        actorder = d.get("actorder")
        if isinstance(actorder, bool):  # old configs: true meant "group"
            actorder = "group" if actorder else None
        return cls(int(d.get("num_bits", 8)), str(d.get("type", "int")), bool(d.get("symmetric", True)),
                   d.get("strategy"), d.get("group_size"), tuple(block) if block else None, d.get("dynamic", False),
                   actorder)


@dataclass(frozen=True)
class ConfigGroup:
    name: str
    targets: tuple[str, ...]
    weights: QuantArgs | None
    input_activations: QuantArgs | None
    has_output_activations: bool
    format: str

    def where(self) -> str:
        return f"compressed-tensors config group {self.name!r} (targets {list(self.targets)})"


@dataclass
class CompressedTensorsConfig(QuantConfig):
    name: ClassVar[str] = "compressed-tensors"
    groups: list[ConfigGroup] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    kv_cache_scheme: QuantArgs | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], on_the_fly: bool) -> CompressedTensorsConfig:
        if on_the_fly:
            raise ValueError("compressed-tensors is a checkpoint format: it cannot quantize an unquantized "
                             "checkpoint on the fly (use quantization='fp8' or 'int8')")
        config = config.get("compression_config") or config.get("quantization_config") or config  # legacy nesting
        status = str(config.get("quantization_status", "compressed"))
        if status not in _STATUSES:
            raise ValueError(f"compressed-tensors quantization_status={status!r}: only {list(_STATUSES)} checkpoints "
                             f"hold quantized weights")
        for key in ("sparsity_config", "transform_config"):
            if config.get(key):
                raise ValueError(f"compressed-tensors {key} is not supported (sparse or transformed weights)")
        top_format = config.get("format") or "naive-quantized"
        groups = [_parse_group(name, g, top_format) for name, g in (config.get("config_groups") or {}).items()]
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        kv = config.get("kv_cache_scheme")
        return cls(groups, list(config.get("ignore") or []), _check_kv_scheme(kv) if kv else None)

    def verify(self, model_config: Any) -> None:
        """Every group's scheme must be runnable, every name target must match a Linear, and no Linear may be
        matched by two groups."""
        for group in self.groups:
            _check_scheme(group)
        names = [n for n in _linear_module_names(model_config) if not matches_any(n, self.ignore)]
        for group in self.groups:
            for target in group.targets:
                if target not in _LINEAR_CLASS_TARGETS and not any(matches_any(n, [target]) for n in names):
                    raise ValueError(f"{group.where()}: target {target!r} matches no Linear layer of this model")
        for n in names:
            self._group_of(n)

    def get_method(self, layer: nn.Module, prefix: str) -> QuantMethod | None:
        if layer_skipped(layer, self.ignore):
            return None
        groups = {self._group_of(p) for p in layer.checkpoint_prefixes}
        if len(groups) > 1:
            raise ValueError(f"layer {prefix}: its merged modules {layer.checkpoint_prefixes} fall in different "
                             f"compressed-tensors config groups; they must be quantized alike")
        group = groups.pop()
        return None if group is None else _method_for(group)

    def _group_of(self, module_name: str) -> ConfigGroup | None:
        matched = [g for g in self.groups if any(t in _LINEAR_CLASS_TARGETS or matches_any(module_name, [t])
                                                 for t in g.targets)]
        if len(matched) > 1:
            raise ValueError(f"Linear {module_name!r} is matched by several compressed-tensors config groups: "
                             f"{[g.name for g in matched]}")
        return matched[0] if matched else None


def _parse_group(name: str, g: dict[str, Any], top_format: str) -> ConfigGroup:
    weights, inputs = g.get("weights"), g.get("input_activations")
    return ConfigGroup(name, tuple(g.get("targets") or ()), QuantArgs.from_dict(weights) if weights else None,
                       QuantArgs.from_dict(inputs) if inputs else None, bool(g.get("output_activations")),
                       g.get("format") or top_format)


def _check_scheme(group: ConfigGroup) -> None:
    """ValueError naming the group when no method here runs its scheme."""
    w, a, where = group.weights, group.input_activations, group.where()
    problems = []
    if group.format not in _FORMATS:
        problems.append(f"format {group.format!r} is not supported (supported: {list(_FORMATS)})")
    if w is None:
        problems.append("activation-only quantization (no `weights`) is not supported")
    if group.has_output_activations:
        problems.append("output_activations quantization is not supported")
    if problems or w is None:
        raise ValueError(f"{where}: " + "; ".join(problems))
    if group.format == "pack-quantized":
        if w.type != "int" or a is not None:
            problems.append("pack-quantized supports integer weight-only (WNA16) schemes")
    elif w.num_bits != 8:
        problems.append(f"{w.num_bits}-bit weights need format 'pack-quantized', not {group.format!r}")
    else:
        problems += _w8_problems(w, a)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))


def _w8_problems(w: QuantArgs, a: QuantArgs | None) -> list[str]:
    problems = []
    if w.type not in ("int", "float"):
        problems.append(f"weight type {w.type!r} is not 'int' or 'float'")
    if not w.symmetric:
        problems.append("asymmetric 8-bit weights are not supported")
    strategies = ("tensor", "channel", "block") if w.type == "float" else ("tensor", "channel")
    if w.strategy not in strategies:
        problems.append(f"{w.type} 8-bit weight strategy {w.strategy!r} is not supported (supported: {strategies})")
    if w.strategy == "block" and (not w.block_structure or len(w.block_structure) != 2):
        problems.append("block strategy needs block_structure [block_n, block_k]")
    if a is None:
        return problems
    if (a.type, a.num_bits) != (w.type, 8):
        problems.append(f"activations {a.type}{a.num_bits} with {w.type}8 weights are not supported")
    if not a.symmetric:
        problems.append("asymmetric activations (input_zero_point) are not supported")
    if a.dynamic is True:
        expected = "group" if w.strategy == "block" else "token"
        if a.strategy != expected:
            problems.append(f"dynamic activations with {w.strategy} weights must use strategy {expected!r}, "
                            f"got {a.strategy!r}")
        if w.strategy == "block" and w.block_structure and a.group_size != w.block_structure[1]:
            problems.append(f"activation group_size {a.group_size} must equal block_k {w.block_structure[1]}")
    elif a.dynamic is False:
        if a.strategy != "tensor" or w.strategy == "block":
            problems.append(f"static activations must be per tensor, with tensor or channel weights (got "
                            f"activations {a.strategy!r}, weights {w.strategy!r})")
    else:
        problems.append(f"activation dynamic={a.dynamic!r} is not supported")
    return problems


def _method_for(group: ConfigGroup) -> QuantMethod:
    _check_scheme(group)
    w, a = group.weights, group.input_activations
    if group.format == "pack-quantized":
        from quantkit.quant.wna16 import PackQuantizedMethod  # written alongside; imported only when needed
        return PackQuantizedMethod(w.num_bits, w.group_size, w.symmetric, w.actorder, w.strategy)
    return W8A8LinearMethod(W8A8Scheme(
        FP8 if w.type == "float" else INT8, w.strategy, static_input=a is not None and a.dynamic is False,
        weight_only=a is None, block=w.block_structure, requantize_fused=w.type == "float"))


def _check_kv_scheme(kv: dict[str, Any]) -> QuantArgs:
    args = QuantArgs.from_dict(kv)
    if (args.type, args.num_bits, args.strategy or "tensor", args.symmetric, args.dynamic) != \
            ("float", 8, "tensor", True, False):
        raise ValueError(f"compressed-tensors kv_cache_scheme {kv}: only static symmetric per-tensor FP8 "
                         f"(k_scale/v_scale) is supported")
    return args


def _linear_module_names(cfg: Any) -> list[str]:
    """The checkpoint module names of every Linear in a Llama-family model (the only family quantkit builds)."""
    names = ["lm_head"]
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return names
