"""Small host <-> device transfers that never wait for the device.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronizes the stream, and `.tolist()`
of a device tensor waits for it too: the host would stall until every kernel already queued has run. With async
scheduling a whole step is queued ahead of the one being prepared, so the per-step transfers go through pinned
memory with non-blocking copies instead. On CPU both are plain tensors: nothing runs ahead."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (nested) list of numbers as a tensor on `device`, queued behind the stream's work on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    # The caching host allocator keeps the pinned block until the copy has run, so it may be dropped at once.
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Starts copying `tensor` into pinned host memory behind the stream's work; the result may be read once an
    event recorded after this call has completed. A CPU tensor is returned as it is."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
