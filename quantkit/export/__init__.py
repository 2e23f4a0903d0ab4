"""Checkpoint writers: quantized Linears -> Hugging Face directories in the formats the ecosystem produces
(GPTQ v1, AutoAWQ GEMM, compressed-tensors pack-/int-/float-quantized, bitsandbytes 4-bit), and the RTN
export that feeds them."""
from quantkit.export.bnb import bnb_config, bnb_tensors
from quantkit.export.rtn import FORMATS, quantize_model_rtn
from quantkit.export.w8a8 import W8Weights, w8_quantize, w8a8_config
from quantkit.export.wna16 import (
    IntWeights,
    awq_config,
    awq_tensors,
    gptq_config,
    gptq_tensors,
    pack_quantized_config,
    pack_quantized_tensors,
    rtn_quantize,
)
from quantkit.export.writers import compressed_tensors_config, write_checkpoint

__all__ = ["FORMATS", "IntWeights", "W8Weights", "awq_config", "awq_tensors", "bnb_config", "bnb_tensors",
           "compressed_tensors_config", "gptq_config", "gptq_tensors", "pack_quantized_config",
           "pack_quantized_tensors", "quantize_model_rtn", "rtn_quantize", "w8_quantize", "w8a8_config",
           "write_checkpoint"]
