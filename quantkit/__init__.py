"""quantkit: quantize, load, run and measure quantized LLMs."""
from quantkit.llm import LLM
from quantkit.outputs import CompletionOutput, Logprob, RequestOutput
from quantkit.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
