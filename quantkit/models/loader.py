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
    cfg = ModelConfig.from_hf(source.hf_config)
    if source.path is None and not dummy:
        raise ValueError(f"model {source.name!r} is a shape preset: pass load_format='dummy'")
    with torch.device(device):
        model = MODEL_CLASSES[cfg.architecture](cfg, dtype, quant_config, select_attention_backend(device))
    if dummy:
        init_dummy_weights(model, seed)
    else:
        load_weights(model, iterate_tensors(source.path), str(source.path))
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_weights_after_loading(module)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("loaded %s (%s, %s weights) on %s: %.2f GB", source.name, cfg.architecture,
                "dummy" if dummy else "checkpoint", device, n_bytes / 1e9)
    return model.eval()
