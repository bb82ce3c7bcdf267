"""Sequence-level policy gradient for LM policies: what REINFORCE, RLOO and GRPO share.

PPO (`agents.ppo`) treats every token as an action and learns a critic for token-level credit
assignment. Ahmadian et al. (2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs") argue that for RLHF, where the policy starts from a strong pretrained LM and
the reward arrives once per completion, the whole completion can be treated as *one* action of a bandit:
the score-function estimator of Williams (1992), ``∇J = E[A(x, y) ∇ log π(y | x)]`` with
``log π(y | x) = Σ_t log π(y_t | x, y_<t)``, needs no value network, and a good baseline for ``A`` gives
most of PPO's variance reduction. The baselines in this package differ *only* in that baseline:

- `agents.reinforce.ReinforceAgent`: a moving average of past returns (REINFORCE with a baseline);
- `agents.reinforce.RLOOAgent`: the mean of the *other* K−1 samples for the same prompt (RLOO,
  Kool et al. 2019; Ahmadian et al. 2024);
- `agents.grpo.GRPOAgent`: group mean and standard deviation (GRPO, Shao et al. 2024, DeepSeekMath),
  with PPO's clipped ratio for several epochs over the batch.

So this module holds everything else, and the algorithm files hold one ``advantages`` method each:

1. **Rollout**: ``B / K`` prompts drawn from the env's prompt source, each repeated K times
   (``env.reset(options={"prompts": ...})``), sampled to the end through the env's `PolicyLink` (one
   cached policy forward per token, shared with the env's KL term). The prompt draw is seeded from the
   agent's torch ``generator``, which `agents.run.TrainingRun` checkpoints, so a resumed run draws the
   same prompts.
2. **Returns**: the sum of the env's per-step rewards, i.e. the RM score minus ``β·Σ_t KL_t`` with the
   env's own KL estimator and β: the KL penalty lives in the reward, exactly as for PPO.
3. **Advantages**: one scalar per episode, from the algorithm.
   Episodes are collected by `agents.rollout.collect_rollout`, as PPO's are (with zero ``values``: no critic).
4. **Update**: minibatches over the B episodes, one forward per sequence (never per token); the loss is
   ``−A · Σ_t log π(y_t)`` (``token_reduction="sum"``, the estimator above) or its per-sequence mean
   (``"mean"``, GRPO's ``1/|o_i|``), plain or with a clipped per-token ratio; gradient clipping, Adam.

The policy is a `agents.value_head.PolicyWithValueHead` so that `TrainingRun` saves and restores it like
PPO's. Its value head is never trained: REINFORCE keeps its moving-average baseline in the head's bias
(weight 0, so the "critic" predicts that constant), which puts the baseline in every checkpoint for free;
RLOO and GRPO leave the head at zero.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel

from agents.ppo import masked_mean
from agents.rollout import Rollout, collect_rollout, generated_positions, iteration_stats, taken_logprobs
from agents.update_stats import UpdateStats
from agents.value_head import PolicyWithValueHead, warn_on_half_precision_weights
from textenv.host_transfer import to_device
from textenv.models import position_ids_from_mask
from textenv.policy_link import PolicyLink
from textenv.sampling import SamplingConfig
from textenv.static_decoding import DECODINGS
from textenv.vector_env import TextGenerationVectorEnv

TOKEN_REDUCTIONS = ("sum", "mean")


# ============================================================================================ math
def grouped(returns: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """View per-episode returns ``(B,)`` as ``(B / K, K)``: row i holds the K samples of prompt i."""
    if returns.ndim != 1 or returns.numel() % samples_per_prompt:
        raise ValueError(f"{returns.numel()} returns do not split into groups of {samples_per_prompt}")
    return returns.view(-1, samples_per_prompt)


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
    token_reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence-level policy-gradient loss; returns ``(loss, clip fraction, approx KL k3)``.

    :param logprobs: ``(b, T)`` log-probs of the sampled tokens under the current policy.
    :param old_logprobs: ``(b, T)`` the same under the policy that sampled them.
    :param advantages: ``(b,)`` one advantage per sequence, shared by its tokens.
    :param mask: ``(b, T)`` 1 on generated tokens.
    :param clip_range: None: the score-function loss ``−A·log π`` per token; a float ε: PPO's clipped
        surrogate ``max(−A·r, −A·clip(r, 1−ε, 1+ε))`` with the per-token ratio ``r = π / π_old``.
    :param token_reduction: ``"sum"`` over a sequence's tokens (the gradient of ``log π(y | x)``) or
        ``"mean"`` (divided by the sequence's length, as GRPO); then the mean over sequences.
    """
    mask = mask.to(logprobs.dtype)
    adv = advantages.view(-1, 1)
    log_ratio = (logprobs - old_logprobs) * mask
    if clip_range is None:
        per_token = -adv * logprobs
        clipfrac = torch.zeros((), device=logprobs.device)
    else:
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    per_sequence = (per_token * mask).sum(1)
    if token_reduction == "mean":
        per_sequence = per_sequence / mask.sum(1).clamp(min=1)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return per_sequence.mean(), clipfrac, approx_kl


# ============================================================================================ config
@dataclass
class PolicyGradientConfig:
    """Settings shared by the sequence-level baselines (each algorithm's config adds its own)."""

    learning_rate: float = 1e-5
    """Adam learning rate (constant)."""
    samples_per_prompt: int = 4
    """K: completions sampled per prompt; the env's ``num_envs`` must be a multiple of it."""
    minibatch_size: int = 16
    """Episodes per optimizer step (one forward each); at most ``num_envs``."""
    epochs: int = 1
    """Passes over each rollout batch (more than 1 is off-policy: use ``clip_range``)."""
    clip_range: float | None = None
    """None: plain score-function loss; ε > 0: PPO-style clipped per-token ratio."""
    token_reduction: str = "sum"
    """``"sum"``: loss ``−A·Σ_t log π(y_t)``; ``"mean"``: divided by the completion's length."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm)."""
    temperature: float = 1.0
    """Sampling temperature (reflected in every log-prob the loss and the KL use)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    seed: int = 0
    """Seeds the prompt draws, the token sampling and the minibatch order."""
    decoding: str = "dynamic"
    """The policy's rollout decoding: ``dynamic``, ``static`` or ``compiled`` (see `textenv.static_decoding`)."""
    defer_kl: bool = False
    """Compute the reference log-probs once per batch, after generation (one full-sequence forward, as TRL
    does), instead of one cached reference forward per token; same rewards to float tolerance, faster
    rollouts, but the env's per-step infos then lack ``kl`` (see docs/mdp.md, "Deferred KL")."""

    min_samples_per_prompt = 1  # class constant: RLOO and GRPO need a group of at least 2

    def checks(self) -> dict[str, tuple[bool, str]]:
        """``field -> (valid, requirement)``; subclasses extend it."""
        k = self.min_samples_per_prompt
        return {
            "learning_rate": (self.learning_rate > 0, "must be > 0"),
            "samples_per_prompt": (self.samples_per_prompt >= k, f"must be >= {k}"),
            "minibatch_size": (self.minibatch_size >= 1, "must be >= 1"),
            "epochs": (self.epochs >= 1, "must be >= 1"),
            "clip_range": (self.clip_range is None or self.clip_range > 0, "must be None or > 0"),
            "token_reduction": (self.token_reduction in TOKEN_REDUCTIONS, f"must be one of {TOKEN_REDUCTIONS}"),
            "max_grad_norm": (self.max_grad_norm > 0, "must be > 0"),
            "decoding": (self.decoding in DECODINGS, f"must be one of {DECODINGS}"),
        }

    def __post_init__(self) -> None:
        bad = [f"{name}={getattr(self, name)!r} ({why})" for name, (ok, why) in self.checks().items() if not ok]
        if bad:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(bad))
        _ = self.sampling  # validates temperature / top-k / top-p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


def episode_returns(batch: Rollout) -> torch.Tensor:
    """``(B,)`` total env reward per episode: RM score − β·Σ_t KL_t (the env's per-step rewards summed)."""
    return (batch.rewards * batch.mask).sum(1)


# ============================================================================================ agent
class SequencePolicyGradientAgent(ABC):
    """Sequence-level policy gradient on a causal LM in a `TextGenerationVectorEnv`; subclasses set the advantage.

    :param policy: the policy LM, bare or as a `PolicyWithValueHead` (trained in place).
    :param env: the vector env, ``autoreset_mode="Disabled"``, ``num_envs`` a multiple of K.
    :param config: hyper-parameters, an instance of the algorithm's ``config_class`` (default: its defaults).
    :param gold_reward: optional ``fn(prompts, completions) -> scores`` logged as ``gold`` (never trained on).
    """

    config_class: type[PolicyGradientConfig] = PolicyGradientConfig
    """The algorithm's config dataclass."""

    def __init__(
        self,
        policy: PolicyWithValueHead | PreTrainedModel,
        env: TextGenerationVectorEnv,
        config: PolicyGradientConfig | None = None,
        gold_reward: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None,
    ) -> None:
        name = type(self).__name__
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(f"{name} needs a {self.config_class.__name__}, got {type(config).__name__}")
        mode = env.metadata["autoreset_mode"]
        if getattr(mode, "value", mode) != "Disabled":
            raise ValueError(f"{name} needs the vector env with autoreset_mode='Disabled' (one batch per rollout)")
        if env.num_envs % config.samples_per_prompt:
            raise ValueError(
                f"samples_per_prompt={config.samples_per_prompt} must divide the env's num_envs={env.num_envs}"
            )
        if config.minibatch_size > env.num_envs:
            raise ValueError(f"minibatch_size {config.minibatch_size} exceeds the batch of {env.num_envs} episodes")
        self.config = config
        self.policy = policy if isinstance(policy, PolicyWithValueHead) else PolicyWithValueHead(policy)
        self.env = env
        self.gold_reward = gold_reward
        self.device = next(self.policy.parameters()).device
        self.link = PolicyLink(
            self.policy.lm, config.sampling, pad_token_id=env.engine.pad_id, decoding=config.decoding, prefetch=True,
            guards_once_per_batch=True,
        )  # fmt: skip
        env.bind_policy(self.link)
        # Only the LM is optimised; the value head holds REINFORCE's baseline (or nothing) and gets no gradient.
        trainable = [p for p in self.policy.lm.parameters() if p.requires_grad]  # all, or the adapters (LoRA)
        warn_on_half_precision_weights(self.policy)
        self.optimizer = torch.optim.Adam(trainable, lr=config.learning_rate, eps=1e-5)
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)
        self.iteration = 0

    # ------------------------------------------------------------------------------ 1. rollout
    def draw_prompts(self) -> list[str]:
        """``B / K`` prompts from the env's prompt source, each repeated K times (groups contiguous)."""
        k = self.config.samples_per_prompt
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        prompts = self.env.prompt_source.sample(np.random.default_rng(seed), self.env.num_envs // k)
        return [p.text for p in prompts for _ in range(k)]

    def rollout(self) -> Rollout:
        """Run B episodes (K per prompt) to the end with the current policy."""
        self.policy.eval()
        return collect_rollout(
            self.env, self.link, self.generator, prompts=self.draw_prompts(), defer_kl=self.config.defer_kl
        )

    # ------------------------------------------------------------------------------ 2. advantages
    @abstractmethod
    def advantages(self, returns: torch.Tensor) -> torch.Tensor:
        """``(B,)`` advantages from the ``(B,)`` returns (K contiguous samples per prompt)."""

    def advantage_stats(self) -> dict[str, float]:
        """Extra statistics of the advantage estimator (e.g. the baseline) for the metrics line."""
        return {}

    # ------------------------------------------------------------------------------ 3. update
    def token_outputs(
        self, batch: Rollout, rows: torch.Tensor, with_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of the taken actions and (``with_entropy``) the entropy at every generated position (one forward)."""
        ids, attn = generated_positions(batch, rows)
        logits = self.policy.lm(
            input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False,
            logits_to_keep=batch.actions.shape[1] + 1,  # only the positions that predict generated tokens
        ).logits
        return taken_logprobs(logits, batch, rows, self.config.sampling, with_entropy)

    def update(self, batch: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """Epochs of minibatches of the policy-gradient loss; returns the update statistics."""
        cfg = self.config
        self.policy.train()
        B = batch.actions.shape[0]
        stats = UpdateStats(("policy_loss", "clipfrac", "approx_kl", "entropy", "grad_norm"))
        for epoch in range(cfg.epochs):
            order = to_device(torch.randperm(B, generator=self.generator), self.device)
            for start in range(0, B, cfg.minibatch_size):
                rows = order[start : start + cfg.minibatch_size]
                mask = batch.mask[rows]
                logprobs, token_entropy = self.token_outputs(batch, rows, with_entropy=epoch == 0)
                if token_entropy is not None:  # epoch 0: the sampling policy's entropy
                    stats.add("entropy", masked_mean(token_entropy, mask))
                loss, clipfrac, approx_kl = policy_gradient_loss(
                    logprobs, batch.logprobs[rows], advantages[rows], mask, cfg.clip_range, cfg.token_reduction
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.policy.lm.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                for key, value in (("policy_loss", loss), ("clipfrac", clipfrac), ("approx_kl", approx_kl),
                                   ("grad_norm", grad_norm)):  # fmt: skip
                    stats.add(key, value)
        self.policy.eval()
        return stats.means()  # the update's one wait on the device

    # ------------------------------------------------------------------------------ one iteration
    def iteration_step(self) -> dict[str, float]:
        """Rollout, advantages, update; returns the iteration's statistics (`TrainingRun`'s metrics line)."""
        kl_coef = float(self.env.kl_controller.value)  # the β of this batch's rewards (the env may move it at the end)
        batch = self.rollout()
        update_start = time.perf_counter()
        returns = episode_returns(batch)
        advantages = self.advantages(returns)
        stats = self.update(batch, advantages)
        self.iteration += 1
        stats.update(
            episode_return=float(returns.mean()),
            advantage_std=float(advantages.std()) if advantages.numel() > 1 else 0.0,
            **self.advantage_stats(),
            **iteration_stats(batch, time.perf_counter() - update_start, kl_coef, self.iteration, self.gold_reward),
        )
        return stats

    def config_dict(self) -> dict:
        return asdict(self.config)
