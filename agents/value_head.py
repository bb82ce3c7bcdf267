"""A causal LM with a scalar value head on its shared trunk: the PPO actor-critic for text.

Sharing the trunk (as in Ziegler et al. 2019 and TRL) costs one extra ``Linear(hidden, 1)`` instead of a
second transformer, so the rollout reads the value from the same forward that produced the logits. The
head starts at zero so the untrained critic predicts 0 and does not perturb the first updates.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from agents.lora_weights import shared_weights_copy
from textenv.models import position_ids_from_mask


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: PPO's ratio must compare the same function twice."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def check_lora_rank(lora_r: int) -> None:
    """Refuse a negative LoRA rank, and a positive one without peft (an optional extra), naming the fix.

    `PolicyWithValueHead` checks on construction; the main job checks before its stages 1-2 spend minutes.
    """
    if lora_r < 0:
        raise ValueError(f"lora_r must be >= 0 (0: train every weight), got {lora_r}")
    if lora_r > 0 and importlib.util.find_spec("peft") is None:
        raise ImportError('lora_r > 0 needs peft, an optional dependency: pip install -e ".[lora]"')


def warn_on_half_precision_weights(policy: nn.Module) -> None:
    """Warn if ``policy`` trains bf16 or fp16 weights. Adam's steps are about ``lr`` each, and bf16 cannot hold
    a change smaller than about 1/256 of a weight (at ``lr`` 1e-5, every weight above about 0.003 rounds back),
    so a policy loaded in bf16 (transformers loads a bf16 checkpoint as bf16 unless asked otherwise) silently
    learns little. Frozen weights (a LoRA base, a frozen reference) may be half precision: they take no steps."""
    half = sorted({str(p.dtype).removeprefix("torch.") for p in policy.parameters()
                   if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)})  # fmt: skip
    if half:
        warnings.warn(
            f"the policy trains {'/'.join(half)} weights, in which small optimizer steps round away: load the LM in "
            "float32 (load_causal_lm(..., dtype=torch.float32)), with bf16 autocast for speed where the agent has "
            "it (PPOConfig(bf16=True)), or train LoRA adapters on the half-precision base "
            "(PolicyWithValueHead(lm, lora_r=8))",
            stacklevel=3,
        )


def refuse_adapters_on_tied_embeddings(lm: PreTrainedModel, config: Any) -> None:
    """Raise if a LoRA ``config`` targets an embedding that ``lm`` ties to its LM head (GPT-2's ``wte``).

    Training sees the adapter on one of the two uses of the shared matrix; merging it for the saved policy
    writes it into the matrix, so into both uses: the saved model would not be the one trained. peft's default
    targets never include embeddings, so only explicit ``lora_target_modules`` are checked.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    text_config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if config.target_modules is None or not getattr(text_config, "tie_word_embeddings", False):
        return
    shared = (lm.get_input_embeddings(), lm.get_output_embeddings())
    names = [name for name, module in lm.named_modules() if any(module is m for m in shared)]
    targeted = [name for name in names if check_target_module_exists(config, name)]
    if targeted:
        raise ValueError(
            f"lora_target_modules reaches {targeted}, an embedding this model ties to its LM head: merged into the "
            "saved policy, the adapter would change both uses of the shared weights; adapt other modules"
        )


class PolicyWithValueHead(nn.Module):
    """A causal LM (the policy) plus a zero-initialised value head on its last hidden state.

    :param lm: any Hugging Face causal LM; it is trained in place, unless ``lora_r`` > 0.
    :param lora_r: if > 0, train LoRA adapters of this rank (peft) instead of the LM's weights: the base
        weights stay frozen, which cuts optimizer memory to the adapters and the value head. The adapters go
        on a copy of ``lm``'s module tree that shares its weights (`shared_weights_copy`: nothing is copied),
        and ``lm`` itself is left as it was, so pass the env's reference as it is
        (``PolicyWithValueHead(env.reference_model, lora_r=8)``): one copy of the weights serves both.
    :param lora_alpha: LoRA scaling numerator (``alpha / r`` scales the adapter's output).
    :param lora_target_modules: module names to adapt (peft's defaults for known architectures if None).
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_target_modules: list[str] | None = None,
    ) -> None:
        super().__init__()
        check_lora_rank(lora_r)
        if lora_r > 0:
            lm = shared_weights_copy(lm)  # before anything changes it: the caller's lm may be the env's reference
        disable_dropout(lm)
        if lora_r > 0:
            from peft import LoraConfig, get_peft_model
            from transformers.pytorch_utils import Conv1D

            conv1d = any(isinstance(m, Conv1D) for m in lm.modules())  # GPT-2 stores weights transposed
            config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=lora_target_modules,
                                task_type="CAUSAL_LM", fan_in_fan_out=conv1d)  # fmt: skip
            refuse_adapters_on_tied_embeddings(lm, config)
            lm.requires_grad_(False)
            lm = get_peft_model(lm, config)
        else:
            lm.requires_grad_(True)  # a copy of the env's frozen reference comes with gradients off
        self.lm = lm
        hidden = lm.config.get_text_config().hidden_size if hasattr(lm.config, "get_text_config") else lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(next(lm.parameters()).device)

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values ``(...,)`` from last-layer hidden states ``(..., H)``."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, L, V)`` and values ``(B, L)`` for whole sequences (one forward per sequence).

        :param logits_to_keep: if > 0, logits only for the last this many positions (the LM head's output
            is the biggest activation of a PPO update; the prompt positions need none).
        """
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        return out.logits, self.value(out.hidden_states[-1])
