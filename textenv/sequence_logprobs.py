"""Log-probs of the tokens already in a batch of sequences, from one forward per chunk of rows.

The per-token reference forward (`textenv.incremental`) is what lets the env report ``ref_logprob`` and
``kl`` at every step. A batch trainer that only needs them once its episodes have ended can instead run the
reference once over the finished sequences, as TRL and OpenRLHF do: one wide forward per chunk of rows
instead of one narrow cached forward per token. On an H100 at batch 256 the reference's per-token graph
replays took 0.185 s of a 0.53 s rollout's GPU time (docs/benchmarks.md); one wide forward is estimated at
a few tens of milliseconds. This module is that
forward; `textenv.episodes.EpisodeBatch` runs it for ``reset(options={"defer_kl": True})``.

Memory: a forward over ``b`` rows keeps ``b × n × V`` logits (plus one float32 copy for the log-sum-exp).
Rows go through in chunks so that this stays near ``max_elements``, whatever the batch.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from textenv.models import action_space_size, position_ids_from_mask

MAX_LOGIT_ELEMENTS = 2**27
"""Logits per chunk (512 MiB as float32): for GPT-2 at 128 new tokens, 20 rows per forward, wide enough for a
GPU; a rollout's transient, not the PPO peak (that is the update's)."""


@torch.no_grad()
def token_logprobs(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    first: int,
    count: int,
    max_elements: int | None = None,
) -> torch.Tensor:
    """``(B, count)`` float32 log-probs of ``ids[:, first : first + count]`` under ``model``.

    :param ids: ``(B, L)`` token ids, left-padded: column ``first - 1`` is a real token of every row.
    :param mask: ``(B, L)`` attention mask (1 on real tokens). Positions come from it, as in the cached
        decoders, so the values match theirs to float tolerance. Entries past a row's last real token are
        computed but meaningless; the caller masks them.
    :param first: the column of the first token to score (``≥ 1``: it needs a token before it).
    :param count: how many columns to score.
    :param max_elements: a soft bound on the logits of one chunk (at least one row per chunk); default
        `MAX_LOGIT_ELEMENTS`, read at call time.
    """
    if not 1 <= first <= ids.shape[1] - count or count < 1:
        raise ValueError(f"cannot score columns [{first}, {first + count}) of sequences of length {ids.shape[1]}")
    end = first + count - 1  # the forward's input: every token that predicts a scored one
    targets = ids[:, first : first + count]
    budget = MAX_LOGIT_ELEMENTS if max_elements is None else max_elements
    rows_per_chunk = max(1, budget // (count * action_space_size(model)))
    out = []
    for start in range(0, ids.shape[0], rows_per_chunk):
        chunk = slice(start, start + rows_per_chunk)
        logits = model(
            input_ids=ids[chunk, :end], attention_mask=mask[chunk, :end],
            position_ids=position_ids_from_mask(mask[chunk, :end]), use_cache=False, logits_to_keep=count,
        ).logits.float()  # fmt: skip
        taken = logits.gather(-1, targets[chunk].unsqueeze(-1)).squeeze(-1)
        out.append(taken - torch.logsumexp(logits, dim=-1))
    return torch.cat(out)
