"""An update's statistics, kept on the device and read once at its end.

A ``.item()`` (or ``float(tensor)``) is a wait on the GPU's queue: the host stops until the GPU has finished
everything queued so far, and only then launches the next micro-batch's forward, so the GPU idles while
that launch starts. PPO read six statistics per micro-batch that way (96 waits per iteration in the batch-256
benchmark: 4 epochs × 4 minibatches of one micro-batch), the policy-gradient update five per minibatch. `UpdateStats`
keeps each value as a 0-d tensor and reads all of them with one wait (`textenv.host_transfer.to_host`),
so textenv's own update code waits on the GPU only where a decision needs a value (PPO's ``target_kl``
early stop). (transformers' SDPA mask creation still checks the padding mask on the host, about twice per
forward.) The means are those of the per-micro-batch values, as before, in float64 on the host.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from textenv.host_transfer import to_host


class UpdateStats:
    """Per-micro-batch statistics of one update, by name; `means` reads them all in one transfer."""

    def __init__(self, names: Iterable[str]) -> None:
        self._values: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def add(self, name: str, value: torch.Tensor) -> None:
        """Record one value (detached: keeping a loss must not keep its autograd graph alive)."""
        self._values[name].append(value.detach().float().reshape(()))

    def means(self, **extra: torch.Tensor) -> dict[str, float]:
        """The mean of each statistic (0.0 for one never recorded), and the ``extra`` 0-d tensors, read at once."""
        names = [name for name, values in self._values.items() if values]
        stacked = [torch.stack(self._values[name]) for name in names] + [v.detach().float().reshape(1) for v in extra.values()]
        host = to_host(*stacked) if stacked else []
        out = {name: 0.0 for name in self._values}
        out.update({name: float(np.mean(a.astype(np.float64))) for name, a in zip([*names, *extra], host, strict=True)})
        return out
