"""Random weights of the right shapes and a sensible scale, so large models run with no checkpoint."""
import torch
from torch import nn


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Norms = 1; embeddings and biases ~ N(0, 0.02); linear weights ~ U(+-1/sqrt(in_features)) so activations
    keep their scale through depth; integer (already-quantized) tensors uniform over their code range.
    Random numbers are drawn on each parameter's own device, so a GPU model initialises in seconds."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in model.named_parameters():
        data = param.data
        gen = generators.setdefault(data.device, torch.Generator(device=data.device).manual_seed(seed))
        # In place: full-size temporaries cost seconds per GB on CPU and several GB of GPU memory on large models.
        if not data.dtype.is_floating_point:
            info = torch.iinfo(data.dtype)
            data.random_(info.min, info.max, generator=gen)
        elif name.endswith("norm.weight"):
            data.fill_(1.0)
        elif data.dim() < 2 or "embed" in name:
            data.normal_(0.0, 0.02, generator=gen)
        else:
            bound = data.shape[-1] ** -0.5
            data.uniform_(-bound, bound, generator=gen)
