"""Collecting a batch of finished episodes, shared by PPO and the policy-gradient baselines.

Every agent in `agents/` gathers experience the same way: reset the vector env (autoreset disabled), then
per step read the policy's sampling distribution from the env-bound `PolicyLink` (one cached forward per
token, shared with the env's KL term), sample, and step the env, whose rewards already hold
``-β·KL_t`` plus the score at the end (with ``defer_kl``, the env hands over every ``-β·KL_t`` when the
batch ends, from one reference forward over it). In the update, every agent needs the log-probs of the
taken tokens under the current policy from one full-sequence forward. Both live here so the algorithms
differ only in their advantages and losses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agents.chunked_logprobs import chunked_taken_logprobs
from textenv.policy_link import PolicyLink
from textenv.sampling import SamplingConfig
from textenv.vector_env import TextGenerationVectorEnv

LOGPROB_FLOOR = -50.0
"""Log-probs below this are clamped in updates (a token outside the current top-k / top-p set)."""


@dataclass
class Rollout:
    """One batch of B finished episodes, on the policy's device. Token tensors are ``(B, T)``."""

    input_ids: torch.Tensor  # (B, L) prompt (left-padded into P slots) + generated tokens
    attention_mask: torch.Tensor  # (B, L)
    prompt_slots: int  # P
    actions: torch.Tensor
    logprobs: torch.Tensor  # log-probs of the sampling distribution at rollout time
    values: torch.Tensor  # value estimates (zeros for agents without a critic)
    rewards: torch.Tensor  # the env's rewards: -β·KL_t (+ score at the last token)
    mask: torch.Tensor  # 1 where the token was generated
    scores: np.ndarray  # (B,) reward-function scores
    kl: np.ndarray  # (B,) per-episode KL
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def collect_rollout(
    env: TextGenerationVectorEnv,
    link: PolicyLink,
    generator: torch.Generator,
    value_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prompts: Sequence[str] | None = None,
    defer_kl: bool = False,
) -> Rollout:
    """Run B episodes to the end, sampling from ``link`` with ``generator``.

    :param value_fn: maps the policy's last hidden state ``(B, H)`` to values ``(B,)`` (PPO's critic). It runs,
        with the distribution, in the link's ``autocast`` context, which the link's own forwards also use.
    :param prompts: explicit prompts for the B rows (default: the env samples them).
    :param defer_kl: the env computes the reference log-probs once, over the finished batch, instead of one
        cached reference forward per token (``reset(options={"defer_kl": True})``); the rewards are the same
        to float tolerance.
    """
    start = time.perf_counter()
    T, B = env.engine.max_new_tokens, env.num_envs
    # One reward-model call for the whole batch, when its last episode ends (not one per step in which some
    # episode ended); each score is then added at its episode's last token below.
    options: dict[str, Any] = {"defer_scores": True, "defer_kl": defer_kl}
    env.reset(options=options if prompts is None else {**options, "prompts": list(prompts)})
    device = link.model.device if link.model is not None else env.engine.device
    logprobs, values = torch.zeros(B, T, device=device), torch.zeros(B, T, device=device)
    actions = torch.zeros(B, T, dtype=torch.long, device=device)
    # What the env returns as NumPy stays on the host until the end: a copy to a GPU per step would make
    # the host wait for the GPU's queue every token.
    rewards, mask = np.zeros((B, T), dtype=np.float32), np.zeros((B, T), dtype=np.float32)
    scores, episode_kl, last_step = np.zeros(B), np.zeros(B), np.zeros(B, dtype=int)
    completions: list[str | None] = [None] * B  # the texts the reward function scored
    for t in range(T):
        mask[:, t] = ~env.done
        with link.autocast():  # the link's, which its own (prefetched) forwards also run in
            tokens = link.sample(generator)  # with fused sampling, one compiled call (distribution and draw)
            distribution = link.logprobs()
            if value_fn is not None:
                values[:, t] = value_fn(link.outputs().hidden)
        logprobs[:, t] = distribution.gather(-1, tokens.view(-1, 1)).squeeze(-1)
        actions[:, t] = tokens
        _, step_rewards, terminated, _, info = env.step(tokens)
        rewards[:, t] = step_rewards
        last_step[terminated] = t
        if "episode_kl" in info:  # the rows that ended (deferring the KL: all rows, at the batch's end)
            episode_kl[info["_episode_kl"]] = info["episode_kl"][info["_episode_kl"]]
        if "token_reward" in info:  # a deferred KL: every token's -β·KL_t, once the batch has ended
            rewards += info["token_reward"]
        if "score" in info:
            scores[info["_score"]] = info["score"][info["_score"]]
            for r in np.flatnonzero(info["_text"]):
                completions[r] = info["text"][r]
        if env.done.all():
            break
    rewards[np.arange(B), last_step] += scores
    missing = [r for r, text in enumerate(completions) if text is None]  # none when every row was scored
    for r, text in zip(missing, env.engine.completion_texts(missing), strict=True):
        completions[r] = text
    engine = env.engine
    mask_t, rewards_t = torch.as_tensor(mask, device=device), torch.as_tensor(rewards, device=device)
    return Rollout(
        input_ids=engine.ids.clone().to(device),
        attention_mask=engine.mask.clone().to(device),
        prompt_slots=engine.max_prompt_tokens,
        actions=actions,
        logprobs=logprobs * mask_t,
        values=values * mask_t,
        rewards=rewards_t * mask_t,
        mask=mask_t,
        scores=scores,
        kl=episode_kl,
        prompts=[p.text for p in engine.prompts],  # type: ignore[union-attr]
        completions=[str(text) for text in completions],
        seconds=time.perf_counter() - start,
    )


def generated_positions(batch: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(input_ids, attention_mask)`` of ``rows`` up to the last generated slot (one forward's input)."""
    end = batch.prompt_slots + batch.actions.shape[1]
    return batch.input_ids[rows, :end], batch.attention_mask[rows, :end]


def taken_logprobs(
    logits: torch.Tensor, batch: Rollout, rows: torch.Tensor, sampling: SamplingConfig, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the taken tokens and the entropy at each generated position, from full-sequence logits.

    :param logits: ``(b, n, V)``, the last ``n >= T + 1`` positions of a forward over `generated_positions`
        (position i predicts i + 1). Run that forward with ``logits_to_keep=T + 1``: the LM head then skips
        the prompt positions, which saves ``P / (P + T)`` of the largest activation in the update.
    :param with_entropy: also return the entropy (else ``None``). It is a statistic, not part of any loss,
        so it carries no gradient.

    The distribution is computed in chunks of sequences (`agents.chunked_logprobs`): nothing of size
    ``b × T × V`` beyond the logits themselves stays saved for backward, and no float32 copy of them is made.
    """
    logprobs, token_entropy = chunked_taken_logprobs(logits, batch.actions[rows], sampling, with_entropy)
    # With top-k / top-p a token can leave the truncated set as the policy moves (log-prob -inf); a
    # finite floor keeps the ratio ~0 there and the statistics finite (padding positions too).
    return logprobs.clamp(min=LOGPROB_FLOOR), token_entropy


def iteration_stats(
    batch: Rollout,
    update_seconds: float,
    kl_coef: float,
    iteration: int,
    gold_reward: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None,
) -> dict[str, float]:
    """The statistics every agent reports per iteration (score, gold, KL, β, lengths, throughput)."""
    tokens = float(batch.mask.sum())
    stats = {
        "iteration": iteration,
        "score": float(batch.scores.mean()),
        "kl": float(batch.kl.mean()),
        "kl_coef": kl_coef,
        "response_length": tokens / len(batch.scores),
        "rollout_tokens_per_s": tokens / max(batch.seconds, 1e-9),
        "tokens_per_s": tokens / max(batch.seconds + update_seconds, 1e-9),
        "seconds": batch.seconds + update_seconds,
        "rollout_seconds": batch.seconds,
        "update_seconds": update_seconds,
    }
    if gold_reward is not None:
        stats["gold"] = float(np.mean(gold_reward(batch.prompts, batch.completions)))
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in stats.items()}
