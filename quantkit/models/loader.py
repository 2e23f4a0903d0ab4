"""Builds a model on its device and fills it: checkpoint tensors streamed in, or dummy weights; then each
Linear's quant method post-processes its weights into the kernel format."""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.checkpoint.dummy import init_dummy_weights
from quantkit.checkpoint.hf import iterate_tensors
from quantkit.checkpoint.loader import load_weights
from quantkit.checkpoint.resolve import ModelSource
from quantkit.config import ModelConfig
from quantkit.layers.attention import select_attention_backend
from quantkit.layers.linear import Linear
from quantkit.models.registry import MODEL_CLASSES
from quantkit.quant.base import QuantConfig

logger = logging.getLogger(__name__)


def build_model(source: ModelSource, dtype: torch.dtype, device: torch.device, dummy: bool = False,
                quant_config: QuantConfig | None = None, seed: int = 0) -> nn.Module:
    """`model.num_kv_scaled_layers` tells how many attention layers took KV-cache scales from the checkpoint."""
    cfg = ModelConfig.from_hf(source.hf_config)
    if source.path is None and not dummy:
        raise ValueError(f"model {source.name!r} is a shape preset: pass load_format='dummy'")
    if quant_config is not None:
        quant_config.verify(cfg)  # everything the config can tell, before a single weight is read
    with torch.device(device):
        model = MODEL_CLASSES[cfg.architecture](cfg, dtype, quant_config, select_attention_backend(device))
    kv_scaled: set[str] = set()
    if dummy:
        init_dummy_weights(model, seed)
    else:
        kv_scaled = load_weights(model, iterate_tensors(source.path), str(source.path))
    if kv_scaled and len(kv_scaled) != cfg.num_hidden_layers:
        raise ValueError(f"{source.path}: the checkpoint carries KV-cache scales for {len(kv_scaled)} of "
                         f"{cfg.num_hidden_layers} attention layers; all or none must have them")
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_weights_after_loading(module)
    for module in model.modules():
        if hasattr(module, "fold_input_permutations"):
            module.fold_input_permutations()
    logger.info("loaded %s (%s, %s weights%s) on %s: %.3f GB of weights", source.name, cfg.architecture,
                "dummy" if dummy else "checkpoint", f", {quant_config.name}" if quant_config else "", device,
                weight_bytes(model) / 1e9)
    model.num_kv_scaled_layers = len(kv_scaled)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of parameters, buffers and what the layers' kernels derived from them at load (each storage
    counted once: tied weights, and kernel tensors that are the layer's own or views of them)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        plan = getattr(getattr(module, "quant_method", None), "kernels", None)
        if plan is not None:
            tensors += plan.resident_tensors()
    storages = {(t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
