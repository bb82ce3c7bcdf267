"""Token-level PPO for causal-LM policies acting in `TextGenerationVectorEnv`: RLHF stage 3.

The algorithm is Ziegler et al. (2019) / InstructGPT as implemented in practice (TRL, OpenRLHF), laid out
CleanRL-style: the math as small pure functions at the top, then one agent class whose `iteration` runs
the phases in plain sight:

1. **Rollout**: the vector env (autoreset disabled) starts B episodes; each step the agent reads the
   policy's sampling distribution and the value from the `PolicyLink` (one cached forward of the policy
   per token, shared with the env's KL term), samples, and steps the env. The env returns the shaped
   rewards ``-β·KL_t`` (+ RM score at the last token).
2. **Advantages**: GAE over tokens (γ=1, λ≈0.95) on the value estimates, optional reward whitening and
   always-on advantage whitening over the valid tokens.
3. **Update**: several epochs of minibatches; each sequence runs through the model once per minibatch
   pass (never once per token); clipped policy and value losses, optional PPO-ptx pretraining loss,
   gradient accumulation, clipping, linear LR annealing, early stop on approximate KL.
4. **KL control**: the env's adaptive controller moves β from the measured KL as episodes end.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from agents.autocast_weight_copy import AutocastWeightCopy
from agents.rollout import Rollout, collect_rollout, generated_positions, iteration_stats, taken_logprobs
from agents.update_stats import UpdateStats
from agents.value_head import PolicyWithValueHead, warn_on_half_precision_weights
from textenv.host_transfer import to_device, to_host
from textenv.policy_link import PolicyLink
from textenv.sampling import SamplingConfig
from textenv.static_decoding import DECODINGS
from textenv.vector_env import TextGenerationVectorEnv


# ============================================================================================ math
def cuda_bf16_autocast(bf16: bool, device_type: str) -> AbstractContextManager:
    """bf16 autocast when asked for and on CUDA (``PPOConfig.bf16``); no change otherwise."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device_type == "cuda" else nullcontext()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is true."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Standardise ``x`` over masked entries (unbiased variance); keep the mean if ``shift_mean`` is false."""
    mean = masked_mean(x, mask)
    centered = (x - mean) * mask
    n = mask.sum().clamp(min=2)
    var = (centered**2).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over tokens; returns ``(advantages, returns)``, both ``(B, T)``.

    Token t of a row is valid where ``mask`` is 1 (valid tokens form a prefix). The state after the last
    valid token is terminal (EOS or the length budget), so its value is 0: nothing is bootstrapped.
    """
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate; returns ``(loss, clip fraction, approx KL k3)``."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipfrac, approx_kl


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``½ max((v - R)², (v_clip - R)²)``; returns ``(loss, clip fraction)``."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask)


# ============================================================================================ config
@dataclass
class PPOConfig:
    """Everything that shapes a PPO run. Defaults follow TRL / InstructGPT where those apply."""

    learning_rate: float = 1e-4
    """Adam learning rate (annealed linearly to 0 over the run when ``anneal_lr``)."""
    anneal_lr: bool = True
    """Linearly decay the learning rate to 0 over ``total_iterations``."""
    total_iterations: int = 100
    """The run length the LR schedule is laid out for."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    minibatch_size: int = 16
    """Episodes per optimizer step; if it does not divide the batch, each epoch's last minibatch is smaller."""
    micro_batch_size: int = 16
    """Episodes per forward/backward; ``minibatch_size / micro_batch_size`` is the gradient accumulation."""
    clip_range: float = 0.2
    """PPO ratio clip ε."""
    clip_range_value: float = 0.2
    """Value clip around the rollout's value estimate."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount; 1 for episodic text."""
    lam: float = 0.95
    """GAE λ."""
    whiten_rewards: bool = False
    """Standardise per-token rewards (not the mean) before GAE."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    target_kl: float | None = None
    """Stop the epochs early when approximate KL exceeds 1.5 × this (None: never)."""
    missing_eos_penalty: float | None = None
    """Subtract this from the last reward of episodes that hit the length budget without EOS (or another of the
    env's stop tokens, which end an episode as EOS does)."""
    ptx_coef: float = 0.0
    """PPO-ptx: weight of a pretraining LM loss mixed into each update (InstructGPT); 0 disables. The agent's
    ``ptx_batches`` gives the text, and its batch size (`agents.pretraining_batches.PretrainingBatches`)."""
    temperature: float = 1.0
    """Sampling temperature (reflected in every log-prob PPO and the KL use)."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    bf16: bool = False
    """bf16 autocast on CUDA for rollouts and updates."""
    rollout_weight_copy: bool = True
    """With ``bf16``, roll out with bf16 copies of the policy's matmul weights, refreshed once per batch
    (`agents.autocast_weight_copy`): the same outputs (bit for bit in eager decoding), without converting every
    float32 weight at every token. Costs half the float32 matmul weights' memory (0.25 GB for GPT-2 small).
    False: convert at every forward, as plain autocast does."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the update (HF gradient checkpointing)."""
    decoding: str = "dynamic"
    """The policy's rollout decoding: ``dynamic`` KV cache, ``static`` or ``compiled`` (CUDA graphs on GPU;
    see `textenv.static_decoding`). Give the env the same choice for its reference LM."""
    defer_kl: bool = False
    """Compute the reference log-probs once per batch, after generation (one full-sequence forward, as TRL
    does), instead of one cached reference forward per token; same rewards to float tolerance, faster
    rollouts, but the env's per-step infos then lack ``kl`` (see docs/mdp.md, "Deferred KL")."""
    seed: int = 0
    """Seeds sampling, the minibatch order and the env's prompt draws: row ``i`` of a batch of ``B`` draws its
    prompts with seed ``seed · B + i``, so runs with different seeds never share a row's prompt stream (with
    Gymnasium's ``seed + i`` per row, seed 1 would draw seed 0's prompts shifted by one row)."""

    def __post_init__(self) -> None:
        checks = {
            "learning_rate": self.learning_rate > 0,
            "ppo_epochs": self.ppo_epochs >= 1,
            "minibatch_size": self.minibatch_size >= 1,
            "micro_batch_size": self.micro_batch_size >= 1 and self.minibatch_size % self.micro_batch_size == 0,
            "clip_range": self.clip_range > 0,
            "clip_range_value": self.clip_range_value > 0,
            "gamma": 0 < self.gamma <= 1,
            "lam": 0 <= self.lam <= 1,
            "ptx_coef": self.ptx_coef >= 0,
            "total_iterations": self.total_iterations >= 1,
            "decoding": self.decoding in DECODINGS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = {name: getattr(self, name) for name in bad}
            raise ValueError(f"invalid PPO config values {values} (micro_batch_size must divide minibatch_size)")
        _ = self.sampling  # validates temperature / top-k / top-p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


# ============================================================================================ agent
class PPOAgent:
    """Token-level PPO on a causal LM acting in a `TextGenerationVectorEnv`.

    :param policy: the policy LM with its value head (trained in place).
    :param env: the vector env; its autoreset must be ``"Disabled"`` (one batch of B episodes per rollout).
    :param config: hyper-parameters.
    :param ptx_batches: for PPO-ptx, a callable returning ``(input_ids, attention_mask)`` of pretraining text;
        `agents.pretraining_batches.PretrainingBatches` draws them from a corpus, and a run checkpoints it.
    :param gold_reward: optional ``fn(prompts, completions) -> scores`` logged as ``gold`` (never trained on).
    """

    def __init__(
        self,
        policy: PolicyWithValueHead,
        env: TextGenerationVectorEnv,
        config: PPOConfig | None = None,
        ptx_batches: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
        gold_reward: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None,
    ) -> None:
        self.config = config or PPOConfig()
        mode = env.metadata["autoreset_mode"]
        if getattr(mode, "value", mode) != "Disabled":
            raise ValueError("PPOAgent needs the vector env with autoreset_mode='Disabled' (one batch per rollout)")
        if self.config.minibatch_size > env.num_envs:
            raise ValueError(f"minibatch_size {self.config.minibatch_size} exceeds the batch of {env.num_envs} episodes")
        if self.config.ptx_coef > 0 and ptx_batches is None:
            raise ValueError("ptx_coef > 0 needs ptx_batches (pretraining text) for PPO-ptx")
        self.policy = policy
        self.env = env
        self.ptx_batches = ptx_batches
        self.gold_reward = gold_reward
        self.device = next(policy.parameters()).device
        # A function of the settings, not a method: the link holds it, and a bound method would tie the env
        # (which holds the link) to the agent in a reference cycle.
        self._autocast = functools.partial(cuda_bf16_autocast, self.config.bf16, self.device.type)
        # Under bf16 autocast, the policy's bf16 matmul weights held for the rollouts (refreshed as each batch
        # starts) instead of converted at every token; `policy.lm` itself where there is no autocast.
        rollout_autocast = self._autocast if self.config.rollout_weight_copy else nullcontext
        self.rollout_weights = AutocastWeightCopy(policy.lm, rollout_autocast)
        self.link = PolicyLink(
            self.rollout_weights.module, self.config.sampling, output_hidden_states=True, pad_token_id=env.engine.pad_id,
            decoding=self.config.decoding, autocast=self._autocast, prefetch=True, guards_once_per_batch=True,
            before_batch=self.rollout_weights.refresh,
        )  # fmt: skip
        env.bind_policy(self.link)
        # Each row's prompt generator gets ``seed · B + row`` (Gymnasium's vector envs add the row): a block of
        # seeds per run, disjoint from another seed's block.
        # With the deferred KL this reset defers it too: a per-token one would prefill the env's reference and
        # allocate its KV cache, which no later (deferred) batch uses or frees.
        env.reset(seed=self.config.seed * env.num_envs, options={"defer_kl": True} if self.config.defer_kl else None)
        # No weight decay, as TRL (transformers Trainer's default) and the policy-gradient agents; AdamW's own is 0.01.
        warn_on_half_precision_weights(policy)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=self.config.learning_rate, eps=1e-5, weight_decay=0.0)
        self.generator = torch.Generator(device="cpu").manual_seed(self.config.seed)  # on CPU: same draws on any device
        self.iteration = 0
        if self.config.gradient_checkpointing:
            lm = policy.lm  # transformers >= 5.x renamed gradient to activation checkpointing
            (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()

    # ------------------------------------------------------------------------------ 1. rollout
    def rollout(self) -> Rollout:
        """Run B episodes to the end with the current policy, reading values from the shared trunk."""
        self.policy.eval()
        batch = collect_rollout(
            self.env, self.link, self.generator, self.policy.value, defer_kl=self.config.defer_kl
        )
        if self.config.missing_eos_penalty is not None:
            lengths = batch.mask.sum(1).long()
            last = batch.actions.gather(1, (lengths - 1).clamp(min=0).view(-1, 1)).squeeze(1)
            stops = torch.tensor(self.env.engine.stop_ids, device=last.device)  # EOS and the env's stop tokens
            rows = torch.nonzero(~torch.isin(last, stops)).squeeze(-1)
            batch.rewards[rows, lengths[rows] - 1] -= self.config.missing_eos_penalty
        return batch

    # ------------------------------------------------------------------------------ 2-3. update
    def _token_outputs(
        self, batch: Rollout, rows: torch.Tensor, with_entropy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Log-probs of the taken actions, values and (``with_entropy``) entropy at every generated position."""
        P, T = batch.prompt_slots, batch.actions.shape[1]
        with self._autocast():
            logits, values = self.policy(*generated_positions(batch, rows), logits_to_keep=T + 1)
        logprobs, token_entropy = taken_logprobs(logits, batch, rows, self.config.sampling, with_entropy)
        return logprobs, values[:, P - 1 : P + T - 1], token_entropy

    def update(self, batch: Rollout) -> dict[str, float]:
        """Advantages, then clipped PPO epochs over minibatches; returns the update statistics."""
        cfg = self.config
        mask = batch.mask
        rewards = whiten(batch.rewards, mask, shift_mean=False) if cfg.whiten_rewards else batch.rewards
        advantages, returns = compute_gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
        if cfg.anneal_lr:
            frac = max(0.0, 1.0 - self.iteration / cfg.total_iterations)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.learning_rate * frac

        self.policy.train()
        B = batch.actions.shape[0]
        stats = UpdateStats(("policy_loss", "value_loss", "clipfrac", "vf_clipfrac", "approx_kl", "ptx_loss", "entropy"))
        stop = False
        for _epoch in range(cfg.ppo_epochs):
            order = to_device(torch.randperm(B, generator=self.generator), self.device)
            for mb_start in range(0, B, cfg.minibatch_size):  # every episode, each epoch (the last minibatch may be short)
                minibatch = order[mb_start : mb_start + cfg.minibatch_size]
                self.optimizer.zero_grad(set_to_none=True)
                minibatch_kl = []
                for micro_start in range(0, len(minibatch), cfg.micro_batch_size):
                    rows = minibatch[micro_start : micro_start + cfg.micro_batch_size]
                    accumulation = len(minibatch) / len(rows)  # the micro-batch's share of the minibatch's mean
                    m = mask[rows]
                    logprobs, values, token_entropy = self._token_outputs(batch, rows, with_entropy=_epoch == 0)
                    if token_entropy is not None:  # epoch 0: the policy as it sampled the batch
                        stats.add("entropy", masked_mean(token_entropy, m))
                    pg_loss, clipfrac, approx_kl = clipped_policy_loss(
                        logprobs, batch.logprobs[rows], advantages[rows], m, cfg.clip_range
                    )
                    vf_loss, vf_clipfrac = clipped_value_loss(values, batch.values[rows], returns[rows], m, cfg.clip_range_value)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    if cfg.ptx_coef > 0:
                        ptx_loss = self._ptx_loss()
                        loss = loss + cfg.ptx_coef * ptx_loss
                        stats.add("ptx_loss", ptx_loss)
                    (loss / accumulation).backward()
                    for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clipfrac", clipfrac),
                                       ("vf_clipfrac", vf_clipfrac), ("approx_kl", approx_kl)):  # fmt: skip
                        stats.add(key, value)
                    if cfg.target_kl is not None:  # kept for the early-stop decision below, only when it is made
                        minibatch_kl.append(approx_kl.detach())
                nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                if cfg.target_kl is not None:  # a decision on the host: the one wait per minibatch, with target_kl
                    (kl,) = to_host(torch.stack(minibatch_kl))
                    if np.mean(kl.astype(np.float64)) > 1.5 * cfg.target_kl:
                        stop = True
                        break
            if stop:
                break
        self.policy.eval()
        explained = 1 - torch.var(returns[mask.bool()] - batch.values[mask.bool()]) / torch.var(returns[mask.bool()]).clamp(min=1e-8)
        out = stats.means(explained_variance=explained)  # the update's one wait on the device
        out["early_stopped"] = float(stop)
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: the LM's next-token loss on a batch of pretraining text."""
        assert self.ptx_batches is not None
        ids, attn = (to_device(t, self.device) for t in self.ptx_batches())
        with self._autocast():
            logits, _ = self.policy(ids, attn)
        labels = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

    # ------------------------------------------------------------------------------ 4. one iteration
    def iteration_step(self) -> dict[str, float]:
        """Rollout + update; returns the iteration's statistics."""
        kl_coef = float(self.env.kl_controller.value)  # the β of this batch's rewards (the env may move it at the end)
        batch = self.rollout()
        update_start = time.perf_counter()
        stats = self.update(batch)
        self.iteration += 1
        return {**stats, **iteration_stats(batch, time.perf_counter() - update_start, kl_coef, self.iteration, self.gold_reward)}

    def config_dict(self) -> dict:
        return asdict(self.config)
