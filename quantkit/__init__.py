"""quantkit: quantize, load, run and measure quantized LLMs."""
from quantkit.llm import LLM
from quantkit.outputs import CompletionOutput, Logprob, RequestOutput
from quantkit.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
