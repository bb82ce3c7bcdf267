"""`TextGenerationEnv`: text generation as a Gymnasium environment (one episode at a time).

See `TextGenerationEnv`'s docstring for the MDP. The heavy lifting (token buffer, reference LM with a KV
cache, KL term, termination, batched reward) lives in `textenv.episodes.EpisodeBatch`, shared with the
vector env; this file adds Gymnasium's contract: spaces, seeding, argument checks, ``info`` and rendering.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.episodes import EpisodeBatch
from textenv.errors import EpisodeEndedError, InvalidActionError, UnsupportedRenderModeError
from textenv.kl import AdaptiveKLController, FixedKLController
from textenv.models import load_causal_lm, load_tokenizer
from textenv.policy_link import PolicyLink
from textenv.prompts import PromptSource
from textenv.render import render_row
from textenv.rewards import CallableReward, RewardFunction, join_text

PromptsLike = PromptSource | Sequence[str] | str | Path | Callable[[np.random.Generator, int], list[str]]


def build_engine(
    model: PreTrainedModel | str | Path,
    tokenizer: PreTrainedTokenizerBase | str | Path | None,
    reward_fn: RewardFunction | Callable,
    prompts: PromptsLike,
    num_rows: int,
    max_prompt_tokens: int,
    max_new_tokens: int,
    stop_tokens: Sequence[int | str],
    kl_coef: float | FixedKLController | AdaptiveKLController,
    kl_estimator: str,
    overflow: str,
    device: str | torch.device | None,
    trust_remote_code: bool,
    join: Callable[[str, str], str],
    record_history: bool = True,
    decoding: str = "dynamic",
) -> tuple[EpisodeBatch, PromptSource]:
    """Resolve user-facing arguments (paths, floats, callables) into the engine and its prompt source."""
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer if tokenizer is not None else model
        model = load_causal_lm(model, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise ValueError("a tokenizer is required when the model is given as an object")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    if device is not None:
        model = model.to(device)
    if not isinstance(reward_fn, RewardFunction):
        if not callable(reward_fn):
            raise TypeError(
                f"reward_fn must be a RewardFunction or a callable, got {type(reward_fn).__name__}"
            )
        reward_fn = CallableReward(reward_fn)
    controller = (
        kl_coef
        if isinstance(kl_coef, (FixedKLController, AdaptiveKLController))
        else FixedKLController(float(kl_coef))
    )
    if not isinstance(prompts, PromptSource):
        prompts = PromptSource(prompts, tokenizer, max_prompt_tokens, overflow)
    elif prompts.max_prompt_tokens > max_prompt_tokens:
        raise ValueError("the PromptSource allows longer prompts than max_prompt_tokens")
    stop_ids = []
    for s in stop_tokens:
        if isinstance(s, str):
            tid = tokenizer.convert_tokens_to_ids(s)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"stop token {s!r} is not in the tokenizer's vocabulary")
            stop_ids.append(int(tid))
        else:
            stop_ids.append(int(s))
    engine = EpisodeBatch(
        model,
        tokenizer,
        reward_fn,
        num_rows,
        max_prompt_tokens,
        max_new_tokens,
        stop_ids,
        kl_estimator,
        controller,
        join,
        record_history,
        decoding,
    )
    return engine, prompts


def observation_space(vocab_size: int, length: int) -> spaces.Dict:
    """``Dict(input_ids=Box(int64, (L,)), attention_mask=Box(int64, (L,)))``."""
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, vocab_size - 1, shape=(length,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(length,), dtype=np.int64),
        }
    )


class EngineAccess:
    """What both env classes expose of their `EpisodeBatch` (``self.engine``): models, β, the bound policy."""

    engine: EpisodeBatch

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def reference_model(self) -> PreTrainedModel:
        return self.engine.ref_model

    @property
    def kl_controller(self) -> FixedKLController | AdaptiveKLController:
        return self.engine.kl_controller

    @property
    def policy(self) -> PolicyLink | None:
        return self.engine.policy

    def bind_policy(self, policy: PolicyLink | PreTrainedModel | None) -> PolicyLink | None:
        """Bind the acting policy so the KL term uses its log-probs (a bare LM is wrapped in a `PolicyLink`)."""
        link = (
            policy
            if policy is None or isinstance(policy, PolicyLink)
            else PolicyLink(policy, pad_token_id=self.engine.pad_id, decoding=self.engine.decoding)
        )
        self.engine.bind_policy(link)
        return link


class TextGenerationEnv(EngineAccess, gym.Env):
    """Text generation as an MDP: each action appends one token; a reward model judges the finished text.

    ## Description
    An episode starts from a prompt (sampled from a prompt source, or given in ``reset(options=...)``).
    Each step the agent picks the next token; the env appends it, scores it against a frozen reference
    LM for the KL penalty, and ends the episode at EOS, a stop token or the length budget, where the
    reward function scores the completion. This is the RL stage of RLHF (Ziegler et al. 2019; InstructGPT),
    with the reward shaping of those papers: ``r_t = -β·KL_t``, plus the score at the last token.

    ## Action Space
    ``Discrete(V)`` with ``V`` the reference LM's output size (``config.vocab_size``), which can exceed
    ``len(tokenizer)``: every id the model can emit is an action.

    ## Observation Space
    ``Dict(input_ids=Box(0, V-1, (L,), int64), attention_mask=Box(0, 1, (L,), int64))`` with
    ``L = max_prompt_tokens + max_new_tokens``. The prompt is left-padded into the first
    ``max_prompt_tokens`` slots, generated tokens follow, the rest is padding (mask 0). Policies that embed
    the observation must cast it back to integer ids (stable-baselines3 casts Box observations to float).

    ## Rewards
    Every step: ``-β·KL_t``, where ``KL_t`` is the chosen estimator (``k1`` = ``log π(a) - log π_ref(a)``)
    and β comes from a fixed or adaptive controller. At the last step, plus the reward function's score.
    ``log π(a)`` comes from the policy bound with `bind_policy` (a `PolicyLink`: one policy forward per
    token shared by the agent's sampling and the env). With no policy bound the env assumes a uniform
    policy, exact for a random agent: ``log π(a) = -log V`` and the KL is KL(uniform ‖ reference).
    ``info`` carries ``logprob``, ``ref_logprob``, ``kl`` and ``kl_coef`` every step, and ``score``,
    ``text`` (the completion), ``prompt`` and ``episode_kl`` at the last step.

    ## Starting State
    A prompt: sampled with the env's seeded generator, or ``reset(options={"prompt": "..."})``.

    ## Episode End
    Terminated when the action is EOS or a stop token, or ``max_new_tokens`` tokens have been generated
    (the length budget is part of the task, so it is terminal too: nothing to bootstrap). The env never
    truncates; wrap it in ``gymnasium.wrappers.TimeLimit`` for that. Stepping an ended episode raises
    `EpisodeEndedError`.

    ## Arguments
    :param model: the reference causal LM, or its path / hub name (loaded with `load_causal_lm`).
    :param tokenizer: the tokenizer (or path); defaults to the model's path when the model is a path.
    :param reward_fn: a `RewardFunction` or a callable ``fn(prompts, completions) -> scores``.
    :param prompts: a `PromptSource`, a list of prompts, a ``.txt``/``.jsonl`` path, or ``fn(rng, n)``.
    :param max_prompt_tokens: prompt slots; longer prompts are handled by ``overflow``.
    :param max_new_tokens: generation budget.
    :param stop_tokens: extra tokens (ids or token strings) that end an episode, besides EOS.
    :param kl_coef: β as a float (fixed), or a `FixedKLController` / `AdaptiveKLController`.
    :param kl_estimator: ``k1`` (default), ``k2``, ``k3`` or ``full`` (exact KL of the step's distributions).
    :param overflow: ``"truncate_left"`` (default) or ``"error"`` for over-long prompts.
    :param render_mode: ``"ansi"`` or ``None``.
    :param policy: a `PolicyLink` or a policy causal LM to bind (see `bind_policy`).
    :param device: where the reference LM runs (default: where it already is).
    :param trust_remote_code: allow a checkpoint's own code when loading by name (off by default).
    :param join: how prompt and completion are joined into one text for display.
    :param decoding: how the LMs decode token by token: ``"dynamic"`` (growing KV cache, the default),
        ``"static"`` (preallocated KV cache) or ``"compiled"`` (static cache and a decode step compiled
        with ``torch.compile``; CUDA graphs on GPU). Same outputs; see `textenv.static_decoding` and
        docs/benchmarks.md.

    ## Version History
    * v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        model: PreTrainedModel | str | Path,
        reward_fn: RewardFunction | Callable,
        prompts: PromptsLike,
        tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
        max_prompt_tokens: int = 32,
        max_new_tokens: int = 32,
        stop_tokens: Sequence[int | str] = (),
        kl_coef: float | FixedKLController | AdaptiveKLController = 0.1,
        kl_estimator: str = "k1",
        overflow: str = "truncate_left",
        render_mode: str | None = None,
        policy: PolicyLink | PreTrainedModel | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        join: Callable[[str, str], str] = join_text,
        decoding: str = "dynamic",
    ) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise UnsupportedRenderModeError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}"
            )
        self.engine, self.prompt_source = build_engine(
            model, tokenizer, reward_fn, prompts, 1, max_prompt_tokens, max_new_tokens, stop_tokens,
            kl_coef, kl_estimator, overflow, device, trust_remote_code, join, render_mode is not None, decoding,
        )  # fmt: skip
        self.render_mode = render_mode
        self.action_space = spaces.Discrete(self.engine.vocab_size)
        self.observation_space = observation_space(self.engine.vocab_size, self.engine.length)
        if policy is not None:
            self.bind_policy(policy)

    # ------------------------------------------------------------------------------------- API
    def _observation(self) -> dict[str, np.ndarray]:
        ids, mask = self.engine.observation()
        return {"input_ids": ids[0], "attention_mask": mask[0]}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        options = options or {}
        unknown = set(options) - {"prompt"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; supported: 'prompt'")
        prompt = self.prompt_source.encode(options["prompt"]) if "prompt" in options else None
        # A reset that fails past this point leaves the generator as it was, so later prompts do not change.
        before = (self._np_random, self._np_random_seed)
        state = None if self._np_random is None else self._np_random.bit_generator.state
        super().reset(seed=int(seed) if isinstance(seed, np.integer) else seed)  # gymnasium takes Python ints only
        try:
            if prompt is None:
                prompt = self.prompt_source.sample(self.np_random, 1)[0]
            self.engine.reset_rows([0], [prompt])
        except Exception:
            self._np_random, self._np_random_seed = before
            if state is not None:
                self._np_random.bit_generator.state = state  # type: ignore[union-attr]
            raise
        return self._observation(), {"prompt": prompt.text}

    def _check_action(self, action: Any) -> int:
        if isinstance(action, torch.Tensor):
            action = action.detach().cpu().numpy()
        if isinstance(action, np.ndarray):
            if action.shape not in ((), (1,)):
                raise InvalidActionError(
                    f"action must be a single token id, got an array of shape {action.shape}"
                )
            if not np.issubdtype(action.dtype, np.integer):
                raise InvalidActionError(f"action must be an integer token id, got dtype {action.dtype}")
            action = action.reshape(()).item()
        if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
            raise InvalidActionError(
                f"action must be an integer token id, got {action!r} ({type(action).__name__})"
            )
        if not 0 <= int(action) < self.engine.vocab_size:
            raise InvalidActionError(
                f"action {int(action)} is outside the action space [0, {self.engine.vocab_size})"
            )
        return int(action)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], SupportsFloat, bool, bool, dict[str, Any]]:
        if not self.engine.started:
            raise EpisodeEndedError("step() called before reset()")
        if self.engine.done[0]:
            raise EpisodeEndedError("step() called after the episode ended; call reset() first")
        token = self._check_action(action)
        out = self.engine.step(torch.tensor([token]), np.ones(1, dtype=bool))
        info: dict[str, Any] = {
            "logprob": float(out.logprob[0]),
            "ref_logprob": float(out.ref_logprob[0]),
            "kl": float(out.kl[0]),
            "kl_coef": out.kl_coef,
        }
        terminated = bool(out.terminated[0])
        if terminated:
            info.update(
                score=float(out.scores[0]),
                text=out.completions[0],
                prompt=self.engine.prompts[0].text,  # type: ignore[union-attr]
                episode_kl=float(out.episode_kl[0]),  # type: ignore[index]
            )
        return self._observation(), float(out.rewards[0]), terminated, False, info

    def render(self) -> str | None:
        if self.render_mode is None:
            gym.logger.warn(
                "render() called without a render_mode; pass render_mode='ansi' to the constructor"
            )
            return None
        return render_row(self.engine, 0)
