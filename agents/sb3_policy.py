"""`LMPolicy`: a stable-baselines3 actor-critic policy that *is* a Hugging Face causal LM.

Why this exists: stable-baselines3's PPO and A2C are the standard RL loops many people reach for first,
and textenv promises they run on its envs unmodified. SB3's default policies would build a fresh MLP and
a fresh ``Linear(features, vocab)`` head and orthogonally re-initialise them, throwing away the language
model that RLHF starts from. `LMPolicy` keeps the pretrained LM: its LM head gives the action logits, a
small zero-initialised value head reads the trunk's last hidden state (the usual RLHF critic, as in
Ziegler et al. 2019), and nothing in the LM is re-initialised.

Observations. textenv observes ``Dict(input_ids, attention_mask)`` with the prompt left-padded into the
first slots and generated tokens after it. SB3 casts Box observations to float32 (`preprocess_obs`); token
ids below 2**24 are exact in float32, so the policy rounds them back to int64 (`TokenIdsExtractor` checks
the range once, at construction). Positions count only real tokens (``cumsum(mask) - 1``) and the logits
and hidden state are read at the last real token of each row.

KL penalty. The env's reward is ``score - β·KL_t`` with ``KL_t`` built from the policy's log-prob of the
chosen token, but SB3 picks actions inside ``collect_rollouts`` where the env cannot see them. Two ways to
get them there (see docs/sb3.md):

1. *provide* (default, one LM forward per token): bind a model-less `PolicyLink` to every sub-env with
   `bind_links` and pass the links to the policy (``policy_kwargs=dict(model=lm, links=links)``), or call
   ``connect(algo)`` once the algorithm exists (also the way to re-wire after ``PPO.load``). SB3
   calls ``policy(obs)`` on the batch of all sub-envs' observations and then ``env.step(actions)``; in
   that call `LMPolicy.forward` hands row ``i`` of its log-softmax to link ``i``, and sub-env ``i`` reads
   the log-prob of the action it is given from there.
2. *bind the LM* (`bind_lm`): each sub-env runs the policy LM itself with its own KV cache. Simpler, but a
   second forward per token, and an episode that spans a PPO update keeps the cache of the old weights.

Both need the sub-envs in this process (``DummyVecEnv``, SB3's default), not ``SubprocVecEnv``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import torch
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.distributions import CategoricalDistribution, Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.vec_env import VecEnv
from torch import nn
from transformers import PreTrainedModel

from agents.value_head import disable_dropout, warn_on_half_precision_weights
from textenv.models import position_ids_from_mask
from textenv.policy_link import PolicyLink

FLOAT32_EXACT_INTS = 2**24  # every integer below this is represented exactly in float32


class TokenIdsExtractor(BaseFeaturesExtractor):
    """SB3's required features extractor, as a pass-through: ``[input_ids | attention_mask]`` side by side.

    The LM does the real feature extraction; this only concatenates the two (already float, thanks to SB3's
    preprocessing) halves into ``(B, 2L)`` so that `LMPolicy` can split and cast them back to ids.

    :param observation_space: textenv's ``Dict(input_ids, attention_mask)`` space.
    """

    def __init__(self, observation_space: spaces.Dict) -> None:
        if not isinstance(observation_space, spaces.Dict) or set(observation_space.spaces) != {
            "input_ids",
            "attention_mask",
        }:
            raise ValueError(
                "LMPolicy needs textenv's Dict(input_ids, attention_mask) observation space, "
                f"got {observation_space}"
            )
        ids_space = observation_space["input_ids"]
        if float(ids_space.high.max()) >= FLOAT32_EXACT_INTS:
            raise ValueError(
                f"token ids up to {int(ids_space.high.max())} do not survive SB3's float32 cast "
                f"(exact only below 2**24 = {FLOAT32_EXACT_INTS})"
            )
        self.length = int(ids_space.shape[0])
        super().__init__(observation_space, features_dim=2 * self.length)

    def forward(self, observations: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([observations["input_ids"], observations["attention_mask"]], dim=-1)


def split_token_features(features: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` as int64 from the ``(B, 2L)`` float features of `TokenIdsExtractor`."""
    ids = features[:, :length].round().long()
    mask = features[:, length:].round().long()
    return ids, mask


class LMPolicy(ActorCriticPolicy):
    """Actor-critic policy whose actor is a causal LM (its own LM head) and whose critic is a value head.

    Use it as ``PPO(LMPolicy, env, policy_kwargs=dict(model=lm, links=bind_links(env)))`` (or ``A2C``).

    :param observation_space: textenv's observation space (passed by SB3).
    :param action_space: ``Discrete(V)`` with ``V`` the LM's output size (passed by SB3).
    :param lr_schedule: learning-rate schedule (passed by SB3).
    :param model: the policy causal LM, or a zero-argument factory returning one.
    :param links: one model-less `PolicyLink` per sub-env (from `bind_links`), in sub-env order; `forward`
        provides row ``i`` of its distribution to link ``i``. ``None`` when the env runs the LM itself
        (`bind_lm`) or has no policy bound.
    :param copy_model: deep-copy ``model`` first (default), so that training never touches an LM that is
        also the env's frozen reference.
    :param value_init_std: standard deviation of the value head's initial weights (0: zeros, so the first
        value estimates are 0 and do not perturb early advantages).
    :param kwargs: the rest of `ActorCriticPolicy`'s arguments (optimizer, ...); ``net_arch``,
        ``ortho_init``, ``use_sde`` and the features extractor are fixed by this class.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        model: PreTrainedModel | Callable[[], PreTrainedModel],
        links: Sequence[PolicyLink] | None = None,
        copy_model: bool = True,
        value_init_std: float = 0.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"LMPolicy needs a Discrete action space (token ids), got {action_space}")
        if kwargs.pop("use_sde", False):
            raise ValueError("LMPolicy has a categorical action distribution: use_sde must be False")
        for fixed in ("net_arch", "ortho_init", "features_extractor_class", "share_features_extractor"):
            if fixed in kwargs:
                raise ValueError(f"LMPolicy does not accept {fixed!r}: the LM is the network")
        lm = model if isinstance(model, nn.Module) else model()
        if not isinstance(lm, nn.Module):
            raise TypeError(f"model must be a causal LM or a factory of one, got {type(lm).__name__}")
        lm = copy.deepcopy(lm) if copy_model else lm
        n_logits = _output_size(lm)
        if n_logits != int(action_space.n):
            raise ValueError(
                f"the LM outputs {n_logits} logits but the action space has {int(action_space.n)} actions; "
                "the policy must share the env's vocabulary"
            )
        # nn.Module forbids assigning sub-modules before Module.__init__, which ActorCriticPolicy runs and
        # then calls `_build`; a plain list smuggles the LM through to `_build`.
        self._init_args = [lm, float(value_init_std)]
        self.links = list(links) if links is not None else None
        self.model_factory = model if not isinstance(model, nn.Module) else None
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=[],
            ortho_init=False,
            use_sde=False,
            features_extractor_class=TokenIdsExtractor,
            share_features_extractor=True,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------- building
    def _build(self, lr_schedule: Schedule) -> None:
        """The LM (actor), a value head on its last hidden state (critic), and the optimizer over both."""
        lm, value_init_std = self._init_args
        del self._init_args
        disable_dropout(lm)  # SB3 evaluates in train mode what it sampled in eval mode: the ratio needs one function
        self.lm = lm.train()
        for p in self.lm.parameters():
            p.requires_grad_(True)
        self.value_net = nn.Linear(_hidden_size(lm), 1)
        if value_init_std > 0:
            nn.init.normal_(self.value_net.weight, std=value_init_std)
        else:
            nn.init.zeros_(self.value_net.weight)
        nn.init.zeros_(self.value_net.bias)
        self.value_net.to(next(lm.parameters()).device)
        warn_on_half_precision_weights(self)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for key in ("net_arch", "ortho_init", "use_sde", "features_extractor_class", "log_std_init",
                    "squash_output", "full_std", "use_expln", "activation_fn", "features_extractor_kwargs"):  # fmt: skip
            data.pop(key, None)
        # The LM's weights travel in the state dict; the factory (if any) rebuilds its architecture.
        data.update(model=self.model_factory or self.lm, copy_model=False, links=None)
        return data

    # ------------------------------------------------------------------------------------- the LM
    def lm_outputs(self, obs: PyTorchObs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, hidden)`` of the LM at the last real token of every row: ``(B, V)`` and ``(B, H)``.

        One forward over the observation, cut after the longest row (later columns are padding for every
        row, and a causal LM never looks right, so cutting changes nothing).
        """
        features = self.extract_features(obs)
        ids, mask = split_token_features(features, self.features_extractor.length)  # type: ignore[arg-type]
        L = ids.shape[1]
        last = L - 1 - mask.flip(-1).argmax(-1)  # index of the last 1 in each row's mask
        longest, fewest_real = torch.stack([last.max(), mask.sum(-1).min()]).tolist()  # one host sync
        if fewest_real == 0:
            raise ValueError("an observation has no real token (attention_mask is all zeros)")
        cut = int(longest) + 1
        ids, mask = ids[:, :cut], mask[:, :cut]
        out = self.lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            output_hidden_states=True,
            use_cache=False,
        )
        rows = torch.arange(ids.shape[0], device=ids.device)
        return out.logits[rows, last].float(), out.hidden_states[-1][rows, last].float()

    def _distribution(self, logits: torch.Tensor) -> CategoricalDistribution:
        return self.action_dist.proba_distribution(action_logits=logits)  # type: ignore[attr-defined]

    def _provide(self, logits: torch.Tensor, strict: bool) -> None:
        """Hand row ``i`` of the sampling distribution to link ``i`` (see the module docstring)."""
        if not self.links:
            return
        if logits.shape[0] != len(self.links):
            if strict:
                raise ValueError(
                    f"LMPolicy has {len(self.links)} env links but got a batch of {logits.shape[0]} "
                    "observations; give it one link per sub-env (bind_links(vec_env))"
                )
            return
        logprobs = torch.log_softmax(logits.detach(), dim=-1)
        for i, link in enumerate(self.links):
            link.provide(logprobs[i : i + 1])

    # ------------------------------------------------------------------------------------- SB3 API
    def forward(
        self, obs: PyTorchObs, deterministic: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rollout step: actions, values and log-probs for a batch; the distribution also goes to the links."""
        logits, hidden = self.lm_outputs(obs)
        self._provide(logits, strict=True)
        distribution = self._distribution(logits)
        actions = distribution.get_actions(deterministic=deterministic)
        log_prob = distribution.log_prob(actions)
        values = self.value_net(hidden)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob  # type: ignore[misc]

    def evaluate_actions(
        self, obs: PyTorchObs, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Update step: values, log-probs of ``actions`` and entropy, with gradients."""
        logits, hidden = self.lm_outputs(obs)
        distribution = self._distribution(logits)
        return self.value_net(hidden), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: PyTorchObs) -> Distribution:
        """The action distribution for a batch of observations."""
        return self._distribution(self.lm_outputs(obs)[0])

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        """Value estimates ``(B, 1)``."""
        return self.value_net(self.lm_outputs(obs)[1])

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> torch.Tensor:
        """`predict` (manual loops, evaluation): like `forward`, links get the distribution when the batch
        matches them (a batch for some other env, e.g. an evaluation env, is left alone)."""
        logits = self.lm_outputs(observation)[0]
        self._provide(logits, strict=False)
        return self._distribution(logits).get_actions(deterministic=deterministic)


class SB3Agent:
    """Any SB3 actor-critic policy with ``Discrete`` actions as an agent for `agents.random_agent.evaluate`.

    :param policy: e.g. ``PPO(...).policy`` (an `LMPolicy` or SB3's ``MultiInputPolicy``).
    """

    def __init__(self, policy: ActorCriticPolicy) -> None:
        self.policy = policy

    @torch.no_grad()
    def logprobs(self, observation: dict[str, Any]) -> torch.Tensor:
        """``(V,)`` log-probs of the policy's distribution at one observation."""
        obs, _ = self.policy.obs_to_tensor(observation)
        dist = self.policy.get_distribution(obs)
        return dist.distribution.logits[0].float()  # type: ignore[attr-defined]  # normalised by torch


# ----------------------------------------------------------------------------------------- wiring
def _sub_envs(env: gym.Env | VecEnv) -> list[gym.Env]:
    if isinstance(env, VecEnv):
        envs = getattr(env, "envs", None)
        if envs is None:
            raise TypeError(
                f"{type(env).__name__} runs its envs in other processes; the policy cannot reach them. "
                "Use DummyVecEnv (SB3's default)"
            )
        return [e.unwrapped for e in envs]
    return [env.unwrapped]


def bind_links(env: gym.Env | VecEnv) -> list[PolicyLink]:
    """Bind a fresh model-less `PolicyLink` to every sub-env; pass the result as ``links`` to `LMPolicy`.

    :param env: a textenv env (possibly wrapped) or an in-process SB3 ``VecEnv`` of them.
    :return: the links, in sub-env order.
    """
    links = []
    for sub in _sub_envs(env):
        if not hasattr(sub, "bind_policy"):
            raise TypeError(f"{type(sub).__name__} is not a textenv env (it has no bind_policy)")
        links.append(sub.bind_policy(PolicyLink(None, pad_token_id=sub.engine.pad_id)))
    return links


def bind_lm(env: gym.Env | VecEnv, policy: LMPolicy) -> None:
    """The alternative to `bind_links`: every sub-env runs ``policy.lm`` itself (a second forward per token).

    :param env: a textenv env (possibly wrapped) or an in-process SB3 ``VecEnv`` of them.
    :param policy: the SB3 policy whose LM the envs should score actions with.
    """
    policy.links = None
    bind_evaluation_env(env, policy)  # the same binding; here the links are dropped, as no env reads them now


def bind_evaluation_env(env: gym.Env | VecEnv, policy: LMPolicy) -> None:
    """Bind ``policy.lm`` to every sub-env of an *evaluation* env, leaving the training env's links as they are.

    SB3's ``evaluate_policy(model, eval_env)`` (and any loop calling ``predict`` on another env) steps an env
    the training links are not bound to; with nothing bound, that env's KL term assumes a uniform policy
    (``log π = -log V``) and the returns it reports are wrong without any error. Bound to the LM, each sub-env
    scores the action with the policy's own log-prob (its own forward, with its own KV cache).

    :param env: the evaluation env (a textenv env, possibly wrapped, or an in-process ``VecEnv`` of them).
    :param policy: the trained `LMPolicy` (e.g. ``model.policy``).
    """
    for sub in _sub_envs(env):
        sub.bind_policy(policy.lm)


def connect(algo: BaseAlgorithm, mode: str = "provide") -> list[PolicyLink] | None:
    """Wire an SB3 algorithm's `LMPolicy` to its envs' KL term; call after creating *or loading* the model.

    Equivalent to passing ``links=bind_links(env)`` in ``policy_kwargs``, but works on the env SB3 actually
    steps (it wraps a single env in ``Monitor`` + ``DummyVecEnv``) and after ``PPO.load``, whose policy
    comes back with stale, unbound copies of any links that were in ``policy_kwargs``.

    :param algo: e.g. ``PPO(LMPolicy, env, policy_kwargs=dict(model=lm))``.
    :param mode: ``"provide"`` (one forward per token; the default) or ``"lm"`` (envs run the LM, `bind_lm`).
    :return: the links in ``"provide"`` mode, else ``None``.
    """
    policy, env = algo.policy, algo.get_env()
    if not isinstance(policy, LMPolicy):
        raise TypeError(f"connect needs an LMPolicy, got {type(policy).__name__}")
    if env is None:
        raise ValueError("the algorithm has no env; pass one to PPO(...) / PPO.load(..., env=env)")
    if mode == "provide":
        policy.links = bind_links(env)
        return policy.links
    if mode == "lm":
        bind_lm(env, policy)
        return None
    raise ValueError(f"mode must be 'provide' or 'lm', got {mode!r}")


def _output_size(lm: nn.Module) -> int:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None and hasattr(head, "out_features"):
        return int(head.out_features)
    return int(lm.config.vocab_size)


def _hidden_size(lm: nn.Module) -> int:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is not None and hasattr(head, "in_features"):
        return int(head.in_features)
    return int(lm.config.hidden_size)
