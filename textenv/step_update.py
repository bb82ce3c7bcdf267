"""The device side of one env step, as one pure function of tensors: what `EpisodeBatch.step` queues.

A step's tensor work outside the models is small but many operations: clean the actions, look up the
policy's and the reference's log-probs, the KL term, write the token into the row buffer, decide
termination, keep the log-prob of a deferred-KL batch, and pack what the host reads. Run eagerly, each is
a kernel launch (about 30 per step), and at moderate batch sizes on a GPU a decode step is bound by the
host's launches, not by the device. Written as one function of tensors and constants, with no host read
and no Python branch on tensor values, it is the same code eagerly and under ``torch.compile``, which
fuses it into a few kernels (`EpisodeBatch` compiles it when its decoding is ``compiled``).

Nothing here changes the env's state: `EpisodeBatch.step` commits the returned tensors only after its
one host read has checked the actions' range, so a bad action leaves every row as it was.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from textenv.kl import kl_penalty


class StepTensors(NamedTuple):
    """What one step computes on the device; ``report`` is the one tensor the host reads of it (with the rest)."""

    actions: torch.Tensor  # (B,) the actions, inactive or out-of-range ones replaced by the pad id
    ids: torch.Tensor  # (B, L) the row buffer with the actions written
    mask: torch.Tensor  # (B, L)
    gen_len: torch.Tensor  # (B,)
    token_logprob: torch.Tensor | None  # (B, T) a deferred-KL batch's policy log-probs so far
    report: torch.Tensor  # (4, B) float32: log π(a), log π_ref(a), KL term, terminated


def step_tensors(
    raw: torch.Tensor,
    active: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    gen_len: torch.Tensor,
    stop_ids: torch.Tensor,
    policy_logprobs: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    token_logprob: torch.Tensor | None,
    *,
    pad_id: int,
    vocab_size: int,
    prompt_slots: int,
    max_new_tokens: int,
    kl_estimator: str,
) -> StepTensors:
    """One step of B rows, out of place.

    :param raw: ``(B,)`` int64 actions as given (possibly out of range: the host checks them afterwards).
    :param active: ``(B,)`` bool, the rows whose episode is running.
    :param policy_logprobs: ``(B, V)`` the policy's sampling distribution, or ``None`` for a uniform policy.
    :param ref_logits: ``(B, V)`` the reference's logits at this state, or ``None`` when the batch defers its
        KL (its reference log-prob is then NaN and its KL term 0 until the batch ends).
    :param token_logprob: ``(B, T)`` a deferred-KL batch's policy log-probs so far (``None`` otherwise).
    """
    in_range = (raw >= 0) & (raw < vocab_size)
    # Out-of-range ids are replaced before any lookup: on a GPU one would be a fatal device-side assert.
    actions = torch.where(active & in_range, raw, pad_id)
    if policy_logprobs is not None:
        lp = policy_logprobs.gather(-1, actions.view(-1, 1)).squeeze(-1)
    else:
        lp = torch.full(raw.shape, -math.log(vocab_size), device=raw.device)
    if ref_logits is None:
        ref_lp, kl = torch.full_like(lp, math.nan), torch.zeros_like(lp)
    else:
        ref_all = torch.log_softmax(ref_logits, dim=-1)
        ref_lp = ref_all.gather(-1, actions.view(-1, 1)).squeeze(-1)
        pol_all = policy_logprobs
        if pol_all is None and kl_estimator == "full":  # the uniform policy's whole distribution
            pol_all = torch.full_like(ref_all, -math.log(vocab_size))
        kl = kl_penalty(lp, ref_lp, kl_estimator, pol_all, ref_all if pol_all is not None else None)
        kl = torch.where(active, kl, 0.0)

    # Append and decide termination (EOS / stop token / length budget: all terminal). A scatter, not a
    # masked write: indexing with a boolean mask would read its nonzero count back to the host.
    write = active & (gen_len < max_new_tokens)
    column = (prompt_slots + gen_len).clamp(max=prompt_slots + max_new_tokens - 1).view(-1, 1)
    new_ids = ids.scatter(1, column, torch.where(write.view(-1, 1), actions.view(-1, 1), ids.gather(1, column)))
    new_mask = mask.scatter(1, column, mask.gather(1, column) | write.long().view(-1, 1))
    new_len = gen_len + write.long()
    terminated = active & (torch.isin(actions, stop_ids) | (new_len >= max_new_tokens))
    if token_logprob is not None:  # keep the policy's log-prob for the KL at the batch's end
        at = gen_len.clamp(max=max_new_tokens - 1).view(-1, 1)
        kept = torch.where(write.view(-1, 1), lp.view(-1, 1), token_logprob.gather(1, at))
        token_logprob = token_logprob.scatter(1, at, kept)
    report = torch.stack([lp.float(), ref_lp.float(), kl.float(), terminated.float()])
    return StepTensors(actions, new_ids, new_mask, new_len, token_logprob, report)
