"""Copies between the host and a GPU that do not stall the host on the GPU's queue.

A rollout step must hand the Gymnasium API host arrays (rewards, flags, observations), so one
device-to-host read per step is unavoidable. Every other transfer should be asynchronous, or the host
waits for all queued GPU work at each of them and cannot queue the next forward meanwhile:

- a plain ``tensor.cpu()`` waits for the queue; several of them per step add several waits;
- a copy *to* the GPU from pageable (ordinary) host memory synchronises the stream before it starts
  (CUDA's documented behaviour for pageable ``cudaMemcpyAsync``).

`to_host` issues all reads of a step into pinned buffers and waits once; `to_device` stages host data in
pinned memory so its copy is queued like a kernel. On the CPU both are plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """NumPy copies of ``tensors``, read from the device with one wait for all of them."""
    devices = {t.device for t in tensors if t.device.type == "cuda"}
    if not devices:
        return [t.detach().cpu().numpy().copy() for t in tensors]
    pinned = []
    for t in tensors:
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t.detach(), non_blocking=True)  # queued on the current stream of t's device
        pinned.append(buffer)
    for device in devices:  # the engine's GPU need not be the current one (device="cuda:1")
        torch.cuda.current_stream(device).synchronize()
    return [buffer.numpy() for buffer in pinned]


def to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``data`` on ``device``: queued asynchronously (through pinned memory) when that is a GPU.

    The result never shares memory with a NumPy ``data``, so the caller may change the array afterwards.
    """
    tensor = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
    if tensor.device == device:
        return tensor.clone() if not isinstance(data, torch.Tensor) else tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        # Staged in a fresh pinned buffer: ``pin_memory()`` hands back memory that is pinned already (the arrays
        # `to_host` returns are) as it is, and the caller could change it before the queued copy has read it.
        staged = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        staged.copy_(tensor)
        return staged.to(device, non_blocking=True)
    return tensor.to(device)


def index_on(rows: Sequence[int], device: torch.device) -> torch.Tensor:
    """Row indices as an int64 tensor on ``device``, copied like `to_device` (no wait on the GPU's queue)."""
    return to_device(np.asarray(rows, dtype=np.int64), device)
