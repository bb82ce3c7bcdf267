"""Peak bytes of tensors allocated inside a block of code: ``torch.cuda.max_memory_allocated`` for any device.

On a GPU the caching allocator keeps peak statistics; on the CPU nothing does, and a process's peak RSS
mixes in the allocator's own caching. `LiveTensorPeak` counts what the CUDA statistic counts for the
tensors a block creates: every storage an operator returns is added when it first appears and removed
when its last tensor dies (a finalizer on the storage), and the running maximum is kept. Storages that
existed before the block (weights, inputs) are not counted, so the figure is the block's own peak. It does
not see the allocator's rounding or the kernels' private workspaces (cuBLAS, attention), and CPU kernels
and CPU autocast are not CUDA's, so a CPU figure models a GPU figure; it does not reproduce it.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveTensorPeak(TorchDispatchMode):
    """``with LiveTensorPeak() as probe: ...``, then ``probe.peak_bytes``: the block's peak of live tensor bytes.

    Autograd's backward runs under the mode too, so gradients and everything saved for backward count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Storages the inputs had before the call: an op that resizes one (``out=``, ``resize_``) moves it.
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if _is_dense(t)}
        if func in _LIFTS:  # torch.tensor / as_tensor: the new tensor arrives as the op's input
            inputs = set()
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not _is_dense(tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key in self._seen or key in inputs or storage.nbytes() == 0:
                continue  # an in-place result, or a view of an input (a weight's transpose, a slice)
            self._seen.add(key)
            self.live_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


_LIFTS = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


def _is_dense(tensor: object) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and tensor.device.type != "meta"


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def resident_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the parameters and buffers of ``modules`` (each storage once; ``None`` entries skipped).

    Added to a `LiveTensorPeak` of a training block, this gives what ``torch.cuda.max_memory_allocated``
    reports for the same block on a GPU: the models that exist before it plus the block's own peak.
    """
    storages: dict[int, int] = {}
    for module in filter(None, modules):
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())
