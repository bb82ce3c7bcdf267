"""`TextGenerationVectorEnv`: B text-generation episodes stepped together as tensors on the model's device.

Gymnasium's generic vector envs would run B copies of the reference LM one row at a time. Here one
`EpisodeBatch` holds all rows, so each step is one batched, cached reference forward and each group of
finished episodes is one reward-model call. For the same seeds its observations and rewards match B single
`TextGenerationEnv` (row i seeded with ``seed + i``, Gymnasium's convention), to float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.env import (
    EngineAccess,
    EpisodeEndedError,
    InvalidActionError,
    PromptsLike,
    build_engine,
    observation_space,
)
from textenv.errors import UnsupportedRenderModeError
from textenv.kl import AdaptiveKLController, FixedKLController
from textenv.policy_link import PolicyLink
from textenv.render import render_row
from textenv.rewards import RewardFunction, join_text

AUTORESET_MODES = {mode.value: mode for mode in (AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED)}


class TextGenerationVectorEnv(EngineAccess, gym.vector.VectorEnv):
    """B episodes of `TextGenerationEnv` in one batched engine.

    ## Description
    The same MDP as `TextGenerationEnv` (see it for rewards, observations and episode end), for
    ``num_envs`` rows at once. Observations, rewards and flags come back as NumPy arrays with a leading
    batch dimension; the token buffers, reference LM and KV caches stay on the model's device.

    ## Action Space
    ``MultiDiscrete([V] * num_envs)``: one token id per row (a NumPy array or a torch tensor).

    ## Observation Space
    ``batch_space`` of the single env's ``Dict(input_ids, attention_mask)``: arrays ``(num_envs, L)``.

    ## Rewards
    As the single env, per row. ``infos`` holds arrays ``logprob``, ``ref_logprob``, ``kl``, ``kl_coef``
    every step, and ``score``, ``text``, ``prompt``, ``episode_kl`` for rows that ended (Gymnasium's
    ``_name`` masks say which rows carry a value). A batch reset with ``defer_scores`` or ``defer_kl``
    (see `reset`) gets its scores, or its scores and KL terms, on the step its last episode ends.

    ## Episode End
    Per row, as the single env. Autoreset (``metadata["autoreset_mode"]``):

    - ``"NextStep"`` (Gymnasium's default): the step after a row terminates resets it, ignoring its
      action (reward 0, not terminated, new prompt in the observation). Only that row is re-prefilled;
      the other rows keep their KV caches.
    - ``"Disabled"`` (what batch RLHF agents use): finished rows stay finished, ignore their actions and
      return reward 0 until you call ``reset`` (all rows, or ``options={"reset_mask": mask}``).

    ## Arguments
    :param num_envs: B, the number of rows.
    :param autoreset_mode: ``"NextStep"`` or ``"Disabled"`` (or the `AutoresetMode` values).
    The remaining arguments are those of `TextGenerationEnv`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        model: PreTrainedModel | str | Path,
        reward_fn: RewardFunction | Callable,
        prompts: PromptsLike,
        num_envs: int = 8,
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
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        decoding: str = "dynamic",
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        mode = autoreset_mode.value if isinstance(autoreset_mode, AutoresetMode) else autoreset_mode
        if mode not in AUTORESET_MODES:
            raise ValueError(f"autoreset_mode must be one of {list(AUTORESET_MODES)}, got {autoreset_mode!r}")
        if render_mode not in (None, "ansi"):
            raise UnsupportedRenderModeError(f"render_mode must be 'ansi' or None, got {render_mode!r}")
        self.metadata = {**self.metadata, "autoreset_mode": AUTORESET_MODES[mode]}
        self.engine, self.prompt_source = build_engine(
            model, tokenizer, reward_fn, prompts, num_envs, max_prompt_tokens, max_new_tokens, stop_tokens,
            kl_coef, kl_estimator, overflow, device, trust_remote_code, join, render_mode is not None, decoding,
        )  # fmt: skip
        self.num_envs = num_envs
        self.render_mode = render_mode
        self.single_action_space = spaces.Discrete(self.engine.vocab_size)
        self.action_space = spaces.MultiDiscrete(np.full(num_envs, self.engine.vocab_size))
        self.single_observation_space = observation_space(self.engine.vocab_size, self.engine.length)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._row_rngs = [seeding.np_random(None)[0] for _ in range(num_envs)]
        self._autoreset = np.zeros(num_envs, dtype=bool)
        if policy is not None:
            self.bind_policy(policy)

    # ------------------------------------------------------------------------------------- properties
    @property
    def done(self) -> np.ndarray:
        """Which rows have finished their episode (and await a reset)."""
        return self.engine.done.copy()

    # ------------------------------------------------------------------------------------- API
    def _observations(self) -> dict[str, np.ndarray]:
        ids, mask = self.engine.observation()
        return {"input_ids": ids, "attention_mask": mask}

    def reset(self, *, seed: int | Sequence[int | None] | None = None, options: dict[str, Any] | None = None):
        """Reset all rows, or those in ``options["reset_mask"]``; ``options["prompts"]`` gives the prompts.

        ``options["defer_scores"] = True`` (autoreset ``"Disabled"``, all rows) scores the batch with one
        reward call when its last episode ends, instead of once per step in which some episode ended. Step
        rewards then hold only ``-β·KL_t``; that last step's ``infos["score"]`` carries every row's score,
        to be added at each episode's last token (as `agents.rollout.collect_rollout` does).

        ``options["defer_kl"] = True`` (implies ``defer_scores``) also defers the KL term: no reference
        forward per step, but one over the finished batch (as TRL computes it). Step infos then carry the
        policy's ``logprob`` only, step rewards are 0, and the last step's infos add ``token_logprob``,
        ``token_ref_logprob``, ``token_kl`` and ``token_reward`` (``-β·KL_t``), each ``(num_envs,
        max_new_tokens)`` with NaN (rewards: 0) past each episode's end, and every row's ``episode_kl``.
        The per-step ``kl`` and ``ref_logprob`` stay NaN and masked out (``_kl`` false) at every step.
        """
        options = dict(options or {})
        supported = ("prompts", "reset_mask", "defer_scores", "defer_kl")
        unknown = set(options) - set(supported)
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; supported: {', '.join(map(repr, supported))}")
        defer_kl = bool(options.get("defer_kl", False))
        defer = bool(options.get("defer_scores", False)) or defer_kl
        if defer and self.metadata["autoreset_mode"] != AutoresetMode.DISABLED:
            name = "defer_kl" if defer_kl else "defer_scores"
            raise ValueError(f"{name} needs autoreset_mode='Disabled' (a batch ends when all its rows end)")
        mask = (
            np.ones(self.num_envs, dtype=bool)
            if options.get("reset_mask") is None
            else np.asarray(options["reset_mask"], dtype=bool)
        )
        if mask.shape != (self.num_envs,):
            raise ValueError(f"reset_mask must have shape ({self.num_envs},), got {mask.shape}")
        if not self.engine.started and not mask.all():
            raise ValueError("the first reset must reset every row")
        self.engine.check_deferral(bool(mask.all()), defer, defer_kl)  # before any generator is drawn from
        rows = np.flatnonzero(mask)
        prompts = None
        if "prompts" in options:
            texts = list(options["prompts"])
            if len(texts) != len(rows):
                raise ValueError(f"got {len(texts)} prompts for {len(rows)} rows being reset")
            prompts = [self.prompt_source.encode(t) for t in texts]
        seeds = None
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, (int, np.integer)) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
            bad = [s for s in seeds if s is not None and (isinstance(s, bool) or not isinstance(s, (int, np.integer)))]
            if bad:
                raise ValueError(f"seeds must be integers (or None), got {bad[0]!r}")
        # A reset that fails past this point leaves the rows' generators as they were (later prompts unchanged).
        before = {int(i): (self._row_rngs[i], self._row_rngs[i].bit_generator.state) for i in rows}
        try:
            for i in rows if seeds is not None else ():
                row_seed = seeds[i]  # type: ignore[index]
                self._row_rngs[i] = seeding.np_random(None if row_seed is None else int(row_seed))[0]
            if prompts is None:
                prompts = [self.prompt_source.sample(self._row_rngs[i], 1)[0] for i in rows]
            self.engine.reset_rows(rows, prompts, defer_scores=defer, defer_kl=defer_kl)
        except Exception:
            for i, (generator, state) in before.items():
                generator.bit_generator.state = state
                self._row_rngs[i] = generator
            raise
        self._autoreset[rows] = False
        texts = np.array([p.text for p in self.engine.prompts], dtype=object)
        return self._observations(), {"prompt": texts, "_prompt": mask.copy()}

    def _check_actions(self, actions: Any) -> torch.Tensor:
        if isinstance(actions, torch.Tensor):
            if actions.dtype.is_floating_point or actions.dtype == torch.bool:
                raise InvalidActionError(f"actions must be integer token ids, got dtype {actions.dtype}")
            tensor = actions.detach().long()
        else:
            array = np.asarray(actions)
            if not np.issubdtype(array.dtype, np.integer):
                raise InvalidActionError(f"actions must be integer token ids, got dtype {array.dtype}")
            tensor = torch.from_numpy(array.astype(np.int64))
        if tuple(tensor.shape) != (self.num_envs,):
            raise InvalidActionError(f"actions must have shape ({self.num_envs},), got {tuple(tensor.shape)}")
        return tensor  # the engine checks the range in its one device read per step

    def step(self, actions: Any):
        if not self.engine.started:
            raise EpisodeEndedError("step() called before reset()")
        tokens = self._check_actions(actions)
        autoreset_mode = self.metadata["autoreset_mode"]
        resetting = (
            self._autoreset.copy()
            if autoreset_mode == AutoresetMode.NEXT_STEP
            else np.zeros(self.num_envs, bool)
        )
        active = ~self.engine.done
        if not active.any() and not resetting.any():
            raise EpisodeEndedError("step() called after every episode ended; call reset() first")
        # The autoreset rows' prompts are drawn before the step commits: a prompt source that fails (a
        # `PromptError`) then leaves the env, and the rows' generators, as they were; so does a failing step.
        rows = np.flatnonzero(resetting)
        before = [(i, self._row_rngs[i].bit_generator.state) for i in rows]
        try:
            new_prompts = [self.prompt_source.sample(self._row_rngs[i], 1)[0] for i in rows]
            out = self.engine.step(tokens, active)
        except Exception:
            for i, state in before:
                self._row_rngs[i].bit_generator.state = state
            raise
        if len(rows):
            self.engine.reset_rows(rows, new_prompts)
        self._autoreset = out.terminated.copy()

        known_kl = active & (not self.engine.defer_kl)  # a deferred-KL batch reports its KL when it ends
        infos: dict[str, Any] = {
            "logprob": out.logprob,
            "_logprob": active,
            "ref_logprob": out.ref_logprob,
            "_ref_logprob": known_kl,
            "kl": out.kl,
            "_kl": known_kl,
            "kl_coef": np.full(self.num_envs, out.kl_coef),
            "_kl_coef": active,  # rows that took a step (a row being reset gets its reset's info only)
        }
        ended = out.terminated
        scored = np.zeros(self.num_envs, dtype=bool)
        scored[list(out.completions)] = True  # the rows that ended (or, deferring, the whole batch at its end)
        if scored.any():
            text = np.full(self.num_envs, None, dtype=object)
            prompt = np.full(self.num_envs, None, dtype=object)
            for r, t in out.completions.items():
                text[r] = t
                prompt[r] = self.engine.prompts[r].text  # type: ignore[union-attr]
            infos.update(score=out.scores, _score=scored, text=text, _text=scored, prompt=prompt, _prompt=scored)
        deferred = out.deferred_kl
        if deferred is not None:
            for name, values in (("token_logprob", deferred.logprob), ("token_ref_logprob", deferred.ref_logprob),
                                 ("token_kl", deferred.kl), ("token_reward", deferred.rewards)):  # fmt: skip
                infos[name], infos[f"_{name}"] = values, np.ones(self.num_envs, dtype=bool)
        reported = np.ones(self.num_envs, dtype=bool) if deferred is not None else ended & (not self.engine.defer_kl)
        if reported.any():  # the rows that ended (deferring the KL: every row, once the batch has ended)
            infos.update(episode_kl=out.episode_kl, _episode_kl=reported)
        if resetting.any():
            infos["reset"] = resetting
            infos["_reset"] = resetting
            # The reset's own info, as gymnasium's vector envs merge it on the autoreset step: each reset row's
            # new prompt (a row is reset or scored in a step, never both, so one array holds both kinds).
            prompt = infos.get("prompt", np.full(self.num_envs, None, dtype=object))
            has_prompt = infos.get("_prompt", np.zeros(self.num_envs, dtype=bool)) | resetting
            for r in np.flatnonzero(resetting):
                prompt[r] = self.engine.prompts[r].text  # type: ignore[union-attr]
            infos.update(prompt=prompt, _prompt=has_prompt)
        truncated = np.zeros(self.num_envs, dtype=bool)
        return self._observations(), out.rewards, ended, truncated, infos

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode is None:
            gym.logger.warn(
                "render() called without a render_mode; pass render_mode='ansi' to the constructor"
            )
            return None
        return tuple(render_row(self.engine, r) for r in range(self.num_envs))
