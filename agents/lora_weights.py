"""LoRA without copies of the LM's weights: a policy that shares the reference's frozen base, and a merged save
built on the host.

Under LoRA the policy's base weights never change, so they are the reference's weights: holding them twice
(the env's reference plus the policy's base, as a ``copy.deepcopy`` of the reference gives) spends one whole
model of device memory for nothing, 14 GB for a 7B model in bf16. TRL avoids the second copy by running the
reference as the policy with its adapters disabled; that switches a flag on every adapted module between two
forwards, which compiled decode steps would have to guard against. Here the two are separate module trees
that hold the same weight tensors: nothing switches, and nothing is copied.

Saving a LoRA policy as a plain LM means merging the adapters into the base weights. peft's
``merge_and_unload`` merges in place, so the run used to merge a deep copy, which for a moment held a second
model on the device. `save_merged_lora` instead merges one adapted matrix at a time into a host copy.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agents.checkpoint import tensor_identity


def shared_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters hold ``model``'s own weight tensors (no weight is copied).

    Each parameter is a new ``nn.Parameter`` over the same storage, so the copy's ``requires_grad`` flags and
    module structure (peft's adapters, say) are its own, while an in-place change to a weight shows in both:
    use it only where those weights stay frozen, as a LoRA base does. Weights tied within ``model`` stay tied
    in the copy; buffers (small: rotary frequencies, masks) are copied.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _plain_lora_layers(base: nn.Module) -> dict[str, nn.Module] | None:
    """The adapted modules of a peft model's base (name -> LoRA layer), or None if some adapter is not plain
    LoRA (a variant such as DoRA, a trained bias, several active adapters): `save_merged_lora` leaves those
    to peft."""
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    for layer in layers.values():
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        variant = (getattr(layer, "lora_variant", {}) or any(getattr(layer, "lora_bias", {}).values())  # peft >= 0.16
                   or any(getattr(layer, "use_dora", {}).values()) or len(getattr(layer, "lora_magnitude_vector", ())))  # fmt: skip
        if len(adapters) != 1 or layer.merged or variant or not hasattr(layer.get_base_layer(), "weight"):
            return None
    return layers


def save_merged_lora(peft_lm: nn.Module, folder: str | Path) -> None:
    """Save a peft LoRA model as a plain LM folder with its adapters merged in, leaving ``peft_lm`` as it was.

    The merged weights are built on the host, one adapted matrix at a time (``W + B @ A * alpha / r``, summed
    in float32 and rounded once to ``W``'s dtype, as peft's own merge does), so the device holds no second
    model; the folder loads with ``from_pretrained`` like any checkpoint of the base architecture.
    """
    layers = _plain_lora_layers(peft_lm.get_base_model())
    if layers is None:  # adapters this function does not merge: peft merges a copy (a second model for a moment)
        copy.deepcopy(peft_lm).merge_and_unload().save_pretrained(folder)
        return
    plain = shared_weights_copy(peft_lm).unload()  # the base's module tree without adapters, sharing its weights
    on_host: dict[Any, torch.Tensor] = {}  # one host copy per tensor: a tied matrix is not copied twice
    state = {}
    for name, tensor in plain.state_dict().items():
        key = tensor_identity(name, tensor)
        if key not in on_host:
            on_host[key] = tensor.detach().to("cpu", copy=True)
        state[name] = on_host[key]
    for name, layer in layers.items():
        adapter = next(a for a in layer.active_adapters if a in layer.lora_A)
        weight = state[f"{name}.weight"]
        with torch.no_grad():
            delta = layer.get_delta_weight(adapter).to("cpu", torch.float32)
        state[f"{name}.weight"] = (weight.float() + delta).to(weight.dtype)
    plain.save_pretrained(folder, state_dict=state)
