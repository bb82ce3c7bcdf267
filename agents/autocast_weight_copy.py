"""A rollout copy of the policy that holds the bf16 matmul weights autocast would make, refreshed once per batch.

Under bf16 autocast (PPO's ``bf16`` on CUDA) the policy keeps float32 weights, which AdamW needs, and every
matmul converts its float32 weight to bf16 before it runs. Autocast keeps a conversion only until its
``with`` block ends, and a decode step compiled under autocast converts inside the compiled graph at every
call. A rollout runs one forward per token between two updates, so it converts every matmul weight once per
token:
- for GPT-2 small that is 0.5 GB read and 0.25 GB written per step, about 0.25 ms on an H100 (an estimate);
- on the CPU it was most of the step (docs/benchmarks.md, "Autocast weight copy").

`AutocastWeightCopy` makes those conversions once per batch instead. The copy is the policy's module tree in
which the weights and biases of the matmul layers (`nn.Linear`, transformers' `Conv1D`) are bf16 tensors,
made once and overwritten in place by `refresh` as each batch starts (PPO's link calls it at every env reset). Every other tensor is the policy's own:
embeddings, norms and buffers. Under the same autocast each matmul is then handed the bf16 operands it would
have made itself, so eager forwards give the same outputs bit for bit. Compiled forwards did too on the
CPU. On a GPU, inductor may fuse the float32 path's bias conversion into the add after it and skip that
bf16 rounding (``emulate_precision_casts`` is off by default), so the two compiled steps may differ in
the last bits there. The refresh writes in place, so the addresses stay where a CUDA graph recorded them.

A model may run some matmul outside autocast (a float32 router, say); its copy would then differ. So the
copy is checked once when it is made, on a prefill of two rows (one left-padded) and a cached step: if its
logits differ from the model's, the rollout keeps the model itself, with a warning. The copy costs memory: half of the float32 matmul weights, 0.25 GB
for GPT-2 small or 14 GB for a 7B model (``PPOConfig(rollout_weight_copy=False)`` turns it off).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

MATMUL_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
"""Layers whose ``weight`` and ``bias`` reach autocast's lower-precision ops (``linear``, ``addmm``)."""


def autocast_dtype(autocast: Callable[[], AbstractContextManager], device_type: str) -> torch.dtype | None:
    """The dtype ``autocast()`` runs ``device_type``'s matmuls in, or None if it does not autocast there."""
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4: no per-device query; keep per-forward casts
        return None
    with autocast():
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _cast_by_autocast(tensor: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` converts this operand: floating, not float64, not already ``dtype``."""
    return tensor is not None and tensor.is_floating_point() and tensor.dtype not in (dtype, torch.float64)


class AutocastWeightCopy:
    """``model``'s module tree with its matmul weights held in ``autocast``'s dtype, for forwards run in it.

    :param model: the policy LM (float32 weights, trained elsewhere). Its weights are read, never written.
    :param autocast: the context the copy's forwards will run in (PPO's bf16 autocast). Without autocast on
        ``model``'s device, or without a weight it would convert, there is nothing to hold:
        `module` is ``model`` itself and `refresh` does nothing.

    `module` is what to run, `refresh` brings it up to date with ``model``'s weights. The copy stays in eval
    mode and needs no gradients.
    """

    def __init__(self, model: nn.Module, autocast: Callable[[], AbstractContextManager]) -> None:
        self.source = model
        self.module: nn.Module = model
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (copy's tensor, model's tensor)
        self._parameters: list[nn.Parameter] = []  # the model's parameters the copy was made from
        device = next(model.parameters()).device
        dtype = autocast_dtype(autocast, device.type)
        if dtype is None:
            return
        module, pairs = self._copy(model, dtype)
        if not pairs:
            return
        if not self._same_logits(model, module, autocast, device):
            warnings.warn(
                f"{type(model).__name__} with bf16 copies of its matmul weights did not give the logits it gives under "
                "autocast (some matmul runs outside autocast, or the check's short forward failed), so its rollouts "
                "convert the float32 weights at every forward instead (PPOConfig(rollout_weight_copy=False) skips the "
                "copy and this check)",
                stacklevel=3,
            )
            return
        self.module, self._pairs, self._parameters = module, pairs, list(model.parameters())

    @property
    def active(self) -> bool:
        """Whether `module` is a copy (False: ``model`` itself, with nothing to hold or a failed check)."""
        return bool(self._pairs)

    @torch.no_grad()
    def refresh(self) -> None:
        """Write ``model``'s current weights into the copy (in place: one conversion per weight).

        In-place changes to the weights (an optimizer step, a restored checkpoint) are what it follows. A
        parameter replaced by a new object (``load_state_dict(assign=True)``, ``resize_token_embeddings``)
        is not, and the copy would run the old one unseen, so that raises instead.
        """
        if not self._pairs:
            return
        current = list(self.source.parameters())
        if len(current) != len(self._parameters) or any(a is not b for a, b in zip(current, self._parameters, strict=True)):
            raise RuntimeError(
                "the policy's parameters were replaced (load_state_dict(assign=True), resize_token_embeddings, ...) "
                "after its bf16 rollout copy was made, which would run the old ones: change weights in place, or "
                "build the agent again"
            )
        for held, source in self._pairs:
            held.copy_(source)

    @staticmethod
    def _copy(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The module tree sharing every parameter with ``model`` but the matmul layers' weights and biases,
        which are ``dtype`` copies: one per distinct tensor, so a weight tied between two matmul layers stays
        tied, while an embedding tied to the LM head keeps the float32 original for its lookups."""
        # Share every parameter and buffer (the same objects: no requires_grad_ here, it would freeze the model's
        # own), then replace the matmul layers' parameters below.
        memo: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
        module = copy.deepcopy(model, memo).eval()
        held: dict[int, nn.Parameter] = {}
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        copied_layers = dict(module.named_modules())
        for name, layer in model.named_modules():
            if not isinstance(layer, MATMUL_LAYERS):
                continue
            for attribute in ("weight", "bias"):
                tensor = getattr(layer, attribute, None)
                if not isinstance(tensor, nn.Parameter) or not _cast_by_autocast(tensor, dtype):
                    continue
                if id(tensor) not in held:
                    held[id(tensor)] = nn.Parameter(tensor.detach().to(dtype), requires_grad=False)
                    pairs.append((held[id(tensor)], tensor))
                setattr(copied_layers[name], attribute, held[id(tensor)])
        return module, pairs

    @staticmethod
    @torch.no_grad()
    def _same_logits(
        model: nn.Module, module: nn.Module, autocast: Callable[[], AbstractContextManager], device: torch.device
    ) -> bool:
        """Whether ``model`` and its copy give the same logits bit for bit, in eval mode, on a short prefill of two
        rows (one left-padded) and one cached decode step after it (5 positions: any LM has room). A forward that
        fails counts as a difference (a matmul outside autocast handed a float32 input and a bf16 weight, say)."""
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            ids = torch.arange(8, device=device).view(2, 4) % model.config.vocab_size
            mask = torch.ones_like(ids)
            mask[1, :2] = 0
            step = {"input_ids": ids[:, :1], "attention_mask": torch.cat([mask, torch.ones_like(mask[:, :1])], 1)}
            logits = []
            with autocast():
                for lm in (model, module):
                    first = lm(input_ids=ids, attention_mask=mask, use_cache=True)
                    logits.append((first.logits, lm(**step, past_key_values=first.past_key_values).logits))
            (a, b), (c, d) = logits
            return torch.equal(a, c) and torch.equal(b, d)
        except Exception:
            return False
        finally:
            for m, training in modes.items():
                m.training = training
