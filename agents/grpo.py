"""GRPO: group-relative policy optimisation, a critic-free PPO (Shao et al. 2024, DeepSeekMath).

PPO's critic is a second network as large as the policy, and for an LM rewarded once per completion it
is hard to learn. GRPO drops it: sample a group of K completions per prompt and use the group's own
statistics as the baseline, normalising the outcome reward within the group,

    ``A_i = (R_i − mean(R_group)) / (std(R_group) + eps)``,

shared by every token of completion i. It keeps PPO's clipped ratio per token,
``max(−A·r_t, −A·clip(r_t, 1−ε, 1+ε))`` with ``r_t = π(y_t) / π_old(y_t)``, so several epochs over a
batch stay close to the sampling policy, and averages over each completion's tokens (``1/|o_i|``) before
averaging over completions. The shared rollout and update are `agents.policy_gradient`.

Two documented choices:

- **KL**: the paper adds ``β·KL(π‖π_ref)`` (the k3 estimator) as a *loss* term. Here the KL penalty stays
  where the env puts it, in the reward (``R = score − β·Σ_t KL_t``, the env's estimator and adaptive β),
  as for PPO and RLOO, so all agents optimise the same objective and no extra reference forward is run in
  the update. With the reward normalised per group, β then acts relative to the group's spread.
- **std**: the unbiased sample standard deviation (as TRL); ``scale_by_std=False`` gives the plain
  group-mean baseline that Liu et al. (2025, "Dr. GRPO") recommend to avoid favouring easy prompts.
  A group whose returns are all equal gets advantage 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agents.policy_gradient import PolicyGradientConfig, SequencePolicyGradientAgent, grouped


def group_normalized_advantages(
    returns: torch.Tensor, samples_per_prompt: int, eps: float = 1e-4, scale_by_std: bool = True
) -> torch.Tensor:
    """GRPO: ``(R − group mean) / (group std + eps)``, the std unbiased; ``(B,)`` → ``(B,)``.

    :param returns: ``(B,)`` returns, K contiguous samples per prompt.
    :param samples_per_prompt: K (>= 2).
    :param eps: added to the std so that a group of equal returns gives 0, not NaN.
    :param scale_by_std: divide by the group std (False: only subtract the group mean).
    """
    if samples_per_prompt < 2:
        raise ValueError(f"group normalisation needs samples_per_prompt >= 2, got {samples_per_prompt}")
    groups = grouped(returns, samples_per_prompt)
    centered = groups - groups.mean(1, keepdim=True)
    if scale_by_std:
        centered = centered / (groups.std(1, keepdim=True) + eps)
    return centered.reshape(-1)


@dataclass
class GRPOConfig(PolicyGradientConfig):
    """GRPO (see `PolicyGradientConfig` for the shared fields).

    The clip range, the unbiased group std and the per-completion token mean are Shao et al.'s (TRL's
    ``loss_type="grpo"``; TRL 1.10 defaults to ``"dapo"``, a token mean over the whole batch). Two epochs
    differ from TRL's default ``num_iterations=1``: with one pass the ratio is 1 and the clip never acts.
    """

    epochs: int = 2
    """Passes over each rollout batch (the paper's μ; TRL's ``num_iterations``, default 1 there); the clipped
    ratio keeps later passes near π_old."""
    clip_range: float | None = 0.2
    """PPO ratio clip ε per token (None: unclipped score-function loss)."""
    token_reduction: str = "mean"
    """Average the per-token loss over each completion (the paper's ``1/|o_i|``), or ``"sum"``."""
    scale_by_std: bool = True
    """Divide by the group's std (False: Dr. GRPO's mean-only baseline)."""
    std_eps: float = 1e-4
    """Added to the group std before dividing."""

    min_samples_per_prompt = 2

    def checks(self) -> dict[str, tuple[bool, str]]:
        return {**super().checks(), "std_eps": (self.std_eps > 0, "must be > 0")}


class GRPOAgent(SequencePolicyGradientAgent):
    """GRPO: group-normalised returns as advantages, PPO-clipped per-token ratio, no critic.

    :param policy: the policy LM, bare or as a `PolicyWithValueHead` (its value head is unused).
    :param env: the vector env, ``autoreset_mode="Disabled"``, ``num_envs`` a multiple of K.
    :param config: hyper-parameters.
    :param gold_reward: optional ``fn(prompts, completions) -> scores`` logged as ``gold``.
    """

    config_class = GRPOConfig
    config: GRPOConfig

    def advantages(self, returns: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return group_normalized_advantages(returns, cfg.samples_per_prompt, cfg.std_eps, cfg.scale_by_std)
