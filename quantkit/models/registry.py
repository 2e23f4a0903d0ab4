"""Hugging Face architecture name -> model class (all supported families share the Llama decoder)."""
from torch import nn

from quantkit.config import SUPPORTED_ARCHITECTURES
from quantkit.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}
