"""Batched incremental decoding: one cached forward per generated token, with rows that can restart.

Both the reference LM (owned by the env) and the policy LM (bound to the env through `PolicyLink`) read
the sequence one token at a time. Re-running the whole sequence per token would cost O(L) per token;
with a KV cache it costs O(1) forwards. This module keeps a batch of B rows in one transformers
`DynamicCache` and lets any subset of rows start a new sequence (an episode reset) without recomputing
the others: the new rows are prefilled on their own and spliced into the cache, right-aligned with the
current cache length and left-padded. Leading columns that every row masks out are trimmed, so the cache
stays as long as the longest live row.

Positions come from the attention mask (``cumsum - 1``), so a row sees the same positions whatever its
padding: the outputs match an unpadded, uncached forward to float tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from textenv.host_transfer import index_on
from textenv.models import cache_keyword, output_cache, pad_left_to, position_ids_from_mask

DEFAULT_RESERVE = 64
"""Tokens a static cache keeps room for when the caller does not say how many will follow."""


@dataclass
class StepOutput:
    """What one incremental forward gives for the last position of every row.

    :param logits: ``(B, V)`` float32 next-token logits.
    :param hidden: ``(B, H)`` last-layer hidden state, when requested (value heads read it).
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None


class IncrementalLM:
    """A causal LM decoding B rows at once with a KV cache; rows can be replaced by new sequences.

    :param model: any Hugging Face causal LM (its forward must accept a transformers `Cache`).
    :param output_hidden_states: also return the last-layer hidden state of the newest position.
    :param pad_token_id: id written into padding columns (never attended to).
    """

    def __init__(
        self, model: PreTrainedModel, output_hidden_states: bool = False, pad_token_id: int = 0
    ) -> None:
        self.model = model
        self.output_hidden_states = output_hidden_states
        self.pad_token_id = pad_token_id
        self._cache_kw = cache_keyword(model)
        self.cache: DynamicCache | None = None
        self.cache_mask: torch.Tensor | None = None  # (B, T) 1 where the cache column holds a real token
        self.forward_calls = 0  # counted for tests and benchmarks: one per start/replace/step
        self.tokens_processed = 0  # positions run through the model, padding included

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def batch_size(self) -> int:
        return 0 if self.cache_mask is None else self.cache_mask.shape[0]

    # ------------------------------------------------------------------------------------------ forwards
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache):
        self.forward_calls += 1
        self.tokens_processed += ids.numel()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=self.output_hidden_states,
            logits_to_keep=1,  # only the next-token logits: the prefill skips the LM head elsewhere
            **{self._cache_kw: cache},
        )
        hidden = out.hidden_states[-1][:, -1].float() if self.output_hidden_states else None
        return StepOutput(out.logits[:, -1].float(), hidden), output_cache(out)

    @torch.no_grad()
    def _prefill(self, sequences: Sequence[torch.Tensor]) -> tuple[StepOutput, DynamicCache, torch.Tensor]:
        if any(len(s) == 0 for s in sequences):
            raise ValueError("cannot prefill an empty sequence")
        ids, mask = pad_left_to(sequences, self.pad_token_id, self.device)
        out, cache = self._forward(ids, mask, position_ids_from_mask(mask), DynamicCache())
        return out, cache, mask

    def start(self, sequences: Sequence[torch.Tensor], reserve: int = DEFAULT_RESERVE) -> StepOutput:
        """Forget every row and prefill a new batch of 1-D id sequences.

        :param reserve: how many tokens will follow (a static cache preallocates them; this one grows).
        """
        out, self.cache, self.cache_mask = self._prefill(sequences)
        return out

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> StepOutput:
        """Append one token ``(B,)`` to every row and return the next-token outputs."""
        if self.cache is None or self.cache_mask is None:
            raise RuntimeError("IncrementalLM.step called before start()")
        tokens = tokens.to(self.cache_mask.device).long().view(-1, 1)
        positions = self.cache_mask.sum(-1, keepdim=True)
        self.cache_mask = torch.cat([self.cache_mask, torch.ones_like(tokens)], dim=1)
        out, self.cache = self._forward(tokens, self.cache_mask, positions, self.cache)
        return out

    @torch.no_grad()
    def replace_rows(self, rows: Sequence[int], sequences: Sequence[torch.Tensor]) -> StepOutput:
        """Restart ``rows`` with new sequences; other rows keep their cache. Returns outputs for ``rows``."""
        if self.cache is None or self.cache_mask is None:
            raise RuntimeError("IncrementalLM.replace_rows called before start()")
        new_out, new_cache, new_mask = self._prefill(sequences)
        index = index_on(rows, self.device)
        grow = new_mask.shape[1] - self.cache_mask.shape[1]
        if grow > 0:  # the new rows are longer than the cache: left-pad every row's cache
            self.cache_mask = torch.nn.functional.pad(self.cache_mask, (grow, 0))
        length = self.cache_mask.shape[1]
        self.cache_mask[index] = 0
        self.cache_mask[index, length - new_mask.shape[1] :] = new_mask
        for layer, new_layer in zip(self.cache.layers, new_cache.layers, strict=True):
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                if grow > 0:
                    tensor = torch.nn.functional.pad(tensor, (0, 0, grow, 0))
                tensor[index] = 0
                tensor[index, :, length - new_mask.shape[1] :] = getattr(new_layer, name)
                setattr(layer, name, tensor)
        self._trim()
        return new_out

    def _trim(self) -> None:
        """Drop leading cache columns that no row attends to."""
        assert self.cache is not None and self.cache_mask is not None
        live = self.cache_mask.any(dim=0).nonzero()
        first = int(live[0]) if len(live) else 0
        if first == 0:
            return
        self.cache_mask = self.cache_mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
