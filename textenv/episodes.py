"""B text-generation episodes stepped together as tensors: the engine behind both env classes.

`TextGenerationEnv` is this engine with one row, `TextGenerationVectorEnv` with B rows, so the single and
batched envs cannot drift apart: the same code appends tokens, runs the reference LM (one incremental
forward per step for the whole batch), computes the KL term, decides termination and calls the reward
function once for all episodes that finished in a step. A batch can instead defer the KL and the scores
to its end (`EpisodeBatch.reset_rows`): one reference forward and one reward call per batch.

Layout of a row (the observation): ``L = max_prompt_tokens + max_new_tokens`` slots; the prompt is
left-padded into the first ``max_prompt_tokens`` slots (so generation always starts at the same index) and
generated tokens follow; the rest is padding with attention mask 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.compile_cache import CompiledOrEager
from textenv.errors import InvalidActionError
from textenv.host_transfer import index_on, to_device, to_host
from textenv.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty
from textenv.models import action_space_size, check_fits_positions, model_device, pad_left
from textenv.policy_link import PolicyLink
from textenv.prompts import Prompt
from textenv.rewards import RewardFunction, join_text
from textenv.sequence_logprobs import token_logprobs
from textenv.static_decoding import make_decoder
from textenv.step_update import step_tensors


@dataclass
class StepResult:
    """What one step of the engine produced, as host arrays of shape ``(B,)``.

    Rows that were not active this step (finished, or being reset) have reward 0, kl 0 and NaN log-probs.
    In a deferred-KL batch every row's ``kl`` and ``ref_logprob`` are NaN and its rewards 0 until
    ``deferred_kl`` arrives, on the step the batch ends.
    """

    rewards: np.ndarray
    terminated: np.ndarray
    logprob: np.ndarray
    ref_logprob: np.ndarray
    kl: np.ndarray
    kl_coef: float
    scores: np.ndarray  # NaN except where an episode was scored this step (when it ended, or deferred)
    completions: dict[int, str] = field(default_factory=dict)
    episode_kl: np.ndarray | None = None  # total KL of the episodes reported this step (NaN elsewhere)
    deferred_kl: DeferredKL | None = None  # a deferred-KL batch's per-token terms, on the step it ended


@dataclass
class DeferredKL:
    """A deferred-KL batch's per-token terms, ``(B, max_new_tokens)`` host arrays.

    ``logprob``, ``ref_logprob`` and ``kl`` are NaN past each episode's end. ``rewards`` is ``-β·kl`` with the
    β of the batch (the step rewards of such a batch leave it out), and 0 past each episode's end.
    """

    logprob: np.ndarray
    ref_logprob: np.ndarray
    kl: np.ndarray
    rewards: np.ndarray


@dataclass
class TokenRecord:
    """One generated token as the renderer shows it."""

    token_id: int
    reward: float
    kl: float
    ref_logprob: float


class EpisodeBatch:
    """The state and step logic of B episodes.

    :param ref_model: the frozen reference LM (its output size defines the action space).
    :param tokenizer: shared by policy and reference.
    :param reward_fn: scores finished episodes.
    :param num_rows: B.
    :param max_prompt_tokens: prompt slots in the observation.
    :param max_new_tokens: generation budget; reaching it ends the episode (terminal).
    :param stop_token_ids: ids besides EOS that end an episode.
    :param kl_estimator: ``k1``, ``k2``, ``k3`` or ``full`` (see `textenv.kl`).
    :param kl_controller: supplies β; adaptive controllers are updated as episodes end.
    :param join: how prompt and completion texts are joined for display.
    :param record_history: keep per-token records for rendering (off in rollouts that never render).
    :param decoding: the reference LM's KV cache and decode step: ``dynamic``, ``static`` or ``compiled``
        (see `textenv.static_decoding`).
    """

    def __init__(
        self,
        ref_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        reward_fn: RewardFunction,
        num_rows: int,
        max_prompt_tokens: int,
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        kl_estimator: str = "k1",
        kl_controller: FixedKLController | AdaptiveKLController | None = None,
        join=join_text,
        record_history: bool = True,
        decoding: str = "dynamic",
    ) -> None:
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {KL_ESTIMATORS}")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        check_fits_positions(ref_model, max_prompt_tokens + max_new_tokens, "reference")
        for p in ref_model.parameters():
            p.requires_grad_(False)
        self.ref_model = ref_model.eval()
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.num_rows = num_rows
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.length = max_prompt_tokens + max_new_tokens
        self.vocab_size = action_space_size(ref_model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; an episode could never end on its own")
        self.eos_id = int(tokenizer.eos_token_id)
        self.stop_ids = sorted({self.eos_id, *map(int, stop_token_ids)})
        bad = [i for i in self.stop_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"stop token ids {bad} are outside the action space [0, {self.vocab_size})")
        self.kl_estimator = kl_estimator
        self.kl_controller = kl_controller or FixedKLController(0.1)
        self.join = join
        self.record_history = record_history
        self.device = model_device(ref_model)
        self.decoding = decoding
        # The reference is frozen (eval mode, no gradients) and only the env steps it, so nothing its compiled
        # step's guards cover changes within a batch: they are checked in full once per batch
        # (`textenv.static_decoding`, "Guards"). A caller that trains or toggles this very model between steps
        # (stable-baselines3 with `LMPolicy(copy_model=False)` on it) must restore it before the next step.
        self.reference = make_decoder(ref_model, decoding, pad_token_id=self.pad_id, guards_once_per_batch=True)
        self.policy: PolicyLink | None = None
        self._stop = torch.tensor(self.stop_ids, device=self.device)
        self._step_constants = dict(
            pad_id=self.pad_id, vocab_size=self.vocab_size, prompt_slots=max_prompt_tokens,
            max_new_tokens=max_new_tokens, kl_estimator=kl_estimator,
        )  # fmt: skip
        # With compiled decoding the step's device work is compiled too: a few fused kernels instead of ~30
        # launches per step (`textenv.step_update`), in a dynamo cache of this env's own, and eager again if
        # the backend cannot compile it (`textenv.compile_cache`).
        self._step_tensors = (
            CompiledOrEager(step_tensors, dynamic=False, fullgraph=True) if decoding == "compiled" else step_tensors
        )

        B, L = num_rows, self.length
        self.ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=self.device)
        self.mask = torch.zeros((B, L), dtype=torch.long, device=self.device)
        self.gen_len = torch.zeros(B, dtype=torch.long, device=self.device)
        self.done = np.ones(B, dtype=bool)
        self.started = False
        self.prompts: list[Prompt | None] = [None] * B
        self.episode_kl = np.zeros(B)
        self.history: list[list[TokenRecord]] = [[] for _ in range(B)]
        self.last_scores = np.full(B, np.nan)
        self.defer_scores = False  # see `reset_rows`
        self.defer_kl = False  # see `reset_rows`
        self._token_logprob: torch.Tensor | None = None  # (B, T) the policy's log-probs of a deferred-KL batch
        self._unscored: list[int] = []  # ended episodes awaiting their score (when deferring)
        self._host_observation: tuple[np.ndarray, np.ndarray] | None = None  # ids and mask, read by `step`
        self._ref_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------- policy
    def bind_policy(self, link: PolicyLink | None) -> None:
        """Attach the acting policy (see `textenv.policy_link`); ``None`` goes back to a uniform policy."""
        if link is not None and link.model is not None:
            n = action_space_size(link.model)
            if n != self.vocab_size:
                raise ValueError(
                    f"policy and reference disagree on the action space: policy outputs {n} logits, "
                    f"reference {self.vocab_size}; they must share a tokenizer and vocabulary"
                )
            check_fits_positions(link.model, self.length, "policy")
        self.policy = link
        if link is not None and self.started:
            link.start(self.sequences(), self.max_new_tokens)

    def observation(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of ``(ids, mask)`` ``(B, L)``: from the last step's one read, or read now after a reset."""
        if self._host_observation is None:
            self._host_observation = tuple(to_host(self.ids, self.mask))  # type: ignore[assignment]
        ids, mask = self._host_observation  # type: ignore[misc]
        return ids.copy(), mask.copy()

    def sequences(self) -> list[torch.Tensor]:
        """Each row's real tokens so far (prompt + generated), as 1-D tensors."""
        return [self.ids[r][self.mask[r].bool()] for r in range(self.num_rows)]

    # ------------------------------------------------------------------------------------- reset
    def check_deferral(self, whole: bool, defer_scores: bool, defer_kl: bool) -> None:
        """Raise if a reset of every row (``whole``) or of some rows cannot defer as asked; changes nothing.

        The vector env calls it before it draws prompts, so a refused reset leaves its generators untouched.
        """
        if defer_kl and self.kl_estimator == "full":
            raise ValueError("defer_kl needs a single-sample KL estimator (k1, k2, k3), not 'full'")
        if (defer_scores or defer_kl) and not whole:
            name = "defer_kl" if defer_kl else "defer_scores"
            raise ValueError(f"{name} applies to a whole batch: reset every row")
        if self.defer_kl and not whole:
            raise ValueError("this batch defers its KL (no reference cache to splice rows into): reset every row")
        if self.defer_scores and not whole and self._unscored:  # a new episode would drop an ended one's score
            raise ValueError(
                f"this batch defers its scores to its end and rows {self._unscored} await theirs: step the batch "
                "to its end, or reset every row"
            )

    def reset_rows(
        self, rows: Sequence[int], prompts: Sequence[Prompt], defer_scores: bool = False, defer_kl: bool = False
    ) -> None:
        """Start new episodes in ``rows`` with these prompts; other rows keep running.

        :param defer_scores: (all rows only) score this batch once, when its last episode ends: one reward
            call per batch instead of one per step in which some episode ended. The step rewards then hold
            only ``-β·KL_t``, and the scores come in that last step's `StepResult` for the caller to place
            at each episode's last token, as batch RLHF trainers do.
        :param defer_kl: (all rows only; implies ``defer_scores``) run no per-token reference forward: when
            the batch's last episode ends, one full-sequence reference forward (`textenv.sequence_logprobs`)
            gives every token's reference log-prob, and that step's `StepResult.deferred_kl` holds the
            per-token log-probs, KL terms and ``-β·KL_t`` rewards. The step rewards then hold neither the
            KL term nor the score; the KL controller moves once, at the batch's end. Not with the ``full``
            estimator, which needs the reference's whole distribution at every step.
        """
        rows = list(rows)
        whole = len(rows) == self.num_rows
        self.check_deferral(whole, defer_scores, defer_kl)
        self._host_observation = None
        if len(prompts) != len(rows):
            raise ValueError(f"{len(rows)} rows to reset but {len(prompts)} prompts")
        if len(set(rows)) != len(rows) or not all(0 <= r < self.num_rows for r in rows):
            raise ValueError(f"rows to reset must be distinct indices in [0, {self.num_rows}), got {rows}")
        if not self.started and not whole:
            raise RuntimeError("the first reset must start every row")
        P = self.max_prompt_tokens
        bad = [len(prompt.ids) for prompt in prompts if not 0 < len(prompt.ids) <= P]
        if bad:
            raise ValueError(f"prompt of {bad[0]} tokens does not fit max_prompt_tokens={P}")
        # The new rows are laid out on the host (prompt left-padded into P slots, then the empty generation
        # slots) and copied in one transfer, not one per row.
        ids, mask = pad_left([p.ids.cpu() for p in prompts], self.pad_id, length=P)
        index = index_on(rows, self.device)
        self.ids[index] = to_device(F.pad(ids, (0, self.max_new_tokens), value=self.pad_id), self.device)
        self.mask[index] = to_device(F.pad(mask, (0, self.max_new_tokens)), self.device)
        self.gen_len[index] = 0
        for r, prompt in zip(rows, prompts, strict=True):
            self.done[r] = False
            self.prompts[r] = prompt
            self.episode_kl[r] = 0.0
            self.history[r] = []
            self.last_scores[r] = np.nan
        sequences = [p.ids for p in prompts]
        if whole:  # a new batch (the first reset is always one); a partial reset joins the current one
            self.defer_scores = defer_scores or defer_kl
            self.defer_kl = defer_kl
            self._unscored = []
            if defer_kl:
                self._ref_logits = None
                self._token_logprob = torch.full((self.num_rows, self.max_new_tokens), math.nan, device=self.device)
            else:
                self._ref_logits = self.reference.start(sequences, self.max_new_tokens).logits
            if self.policy is not None:
                self.policy.start(sequences, self.max_new_tokens)
            self.started = True
        else:
            assert self._ref_logits is not None
            new = self.reference.replace_rows(rows, sequences).logits
            self._ref_logits = self._ref_logits.clone()
            self._ref_logits[index] = new
            if self.policy is not None:
                self.policy.replace_rows(rows, sequences)

    # ------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, actions: torch.Tensor, active: np.ndarray) -> StepResult:
        """Apply ``actions`` ``(B,)`` to the ``active`` rows; the others are left as they are.

        The step reads the device once (`to_host`): log-probs, KL, termination, the actions (to check
        their range) and the new observation, all together. Nothing changes before that read and the checks
        after it, so an action outside the action space, or one the bound policy gives probability 0, raises
        `InvalidActionError`, and a reward function that fails raises `RewardError`, leaving every row (and
        the KL controller, and both models' caches) as it was. The reference forward is queued after those,
        so the GPU runs it while the host does its bookkeeping, and a prefetching policy link
        (`PolicyLink.prefetch`) queues the policy's at the end of the step. A deferred-KL batch (`reset_rows`)
        runs no reference forward here but one over the whole batch when it ends.
        """
        B, V = self.num_rows, self.vocab_size
        raw = to_device(actions, self.device).long()
        active_t = to_device(active, self.device)
        # 1.-2. the log-probs of the chosen tokens (policy: the bound link's distribution, or uniform;
        # reference: its cached logits, unless the batch defers its KL), the KL term and the new state, out
        # of place (committed after the range check), in one function of tensors (`textenv.step_update`).
        policy_logprobs = None
        if self.policy is not None:
            policy_logprobs = self.policy.logprobs()
            if tuple(policy_logprobs.shape) != (B, V):  # checked here: a compiled lookup would not say why
                raise ValueError(
                    f"the policy's distribution has shape {tuple(policy_logprobs.shape)}, but the env steps {B} rows "
                    f"over an action space of {V}"
                )
            policy_logprobs = policy_logprobs.to(self.device)
        if not self.defer_kl:
            assert self._ref_logits is not None
        new = self._step_tensors(
            raw, active_t, self.ids, self.mask, self.gen_len, self._stop, policy_logprobs,
            None if self.defer_kl else self._ref_logits, self._token_logprob if self.defer_kl else None,
            **self._step_constants,
        )  # fmt: skip
        beta = float(self.kl_controller.value)

        # 3. one host read for everything the caller sees; then every check, before anything is committed.
        host, raw_np, ids_np, mask_np = to_host(new.report, raw, new.ids, new.mask)
        low, high = int(raw_np.min()), int(raw_np.max())
        if low < 0 or high >= V:
            raise InvalidActionError(f"action {low if low < 0 else high} is outside the action space [0, {V})")
        host = host.astype(np.float64)
        lp_np, ref_np, kl_np, term_np = host[0], host[1], host[2], host[3].astype(bool)
        impossible = np.flatnonzero(active & ~np.isfinite(lp_np))
        if len(impossible):  # else a KL of -inf (k1: a reward of +inf) or NaN would be returned as a reward
            r = int(impossible[0])
            raise InvalidActionError(
                f"action {int(raw_np[r])} in row {r} has log-prob {lp_np[r]} under the bound policy's sampling "
                "distribution (probability 0 under its top-k / top-p, or a non-finite distribution): "
                "sample from link.logprobs()"
            )
        lp_np[~active], ref_np[~active] = np.nan, np.nan
        episode_totals = self.episode_kl.copy()
        if self.defer_kl:
            kl_np[:] = np.nan  # not known before the batch ends
            rewards = np.zeros(B)
        else:
            rewards = np.where(active, -beta * kl_np, 0.0)
            episode_totals[active] += kl_np[active]
        ended = np.flatnonzero(term_np)
        done = self.done.copy()
        done[ended] = True

        # 4. the KL of a deferred batch once its last episode has ended; then the scores of every episode that
        # ended, in one batch (or, deferring, of every episode once all ended). Still nothing committed: a
        # reward function that fails (`RewardError`) leaves the env as it was before this step.
        episode_kl = np.full(B, np.nan)
        deferred = None
        if not self.defer_kl:
            episode_kl[ended] = episode_totals[ended]
        elif len(ended) and done.all():  # the step that ended the batch's last episode
            deferred, episode_totals[:] = self._deferred_kl(beta, new.ids, new.mask, new.token_logprob)
            episode_kl[:] = episode_totals
        unscored = [*self._unscored, *map(int, ended)] if self.defer_scores else []
        deferred_now = np.array(unscored if done.all() else [], dtype=int)  # deferring: all, once all ended
        to_score = deferred_now if self.defer_scores else ended
        scores = np.full(B, np.nan)
        completions: dict[int, str] = {}
        if len(to_score):
            prompt_texts = [self.prompts[r].text for r in to_score]  # type: ignore[union-attr]
            texts = self.completion_texts(to_score.tolist(), (ids_np, mask_np))
            completions = dict(zip(map(int, to_score), texts, strict=True))
            scores[to_score] = self.reward_fn(prompt_texts, texts)
            if not self.defer_scores:
                rewards[to_score] += scores[to_score]
            unscored = []

        # 5. commit the step.
        self.ids, self.mask, self.gen_len = new.ids, new.mask, new.gen_len
        if self.defer_kl:
            self._token_logprob = new.token_logprob
        self._host_observation = (ids_np, mask_np)
        self.done, self.episode_kl, self._unscored = done, episode_totals, unscored
        if len(to_score):
            self.last_scores[to_score] = scores[to_score]
            self.kl_controller.update(float(self.episode_kl[to_score].mean()), len(to_score))
        # advance both models' caches with the actions, if anything continues
        continuing = bool((active & ~term_np).any())
        if self.policy is not None:
            self.policy.advance(new.actions)
        if not self.defer_kl and continuing:
            self._ref_logits = self.reference.step(new.actions).logits

        for r in np.flatnonzero(active) if self.record_history else ():
            self.history[r].append(
                TokenRecord(int(raw_np[r]), float(rewards[r]), float(kl_np[r]), float(ref_np[r]))
            )
        if deferred is not None and self.record_history:
            for r, records in enumerate(self.history):
                for t, record in enumerate(records):
                    record.reward, record.kl = float(deferred.rewards[r, t]), float(deferred.kl[r, t])
                    record.ref_logprob = float(deferred.ref_logprob[r, t])
        # 6. the policy's next forward, queued now (a link built with prefetch=True) so that a GPU runs it while
        # the host finishes the vector env's step and the agent its loop; last, so that a failing forward finds
        # the step done.
        if self.policy is not None and continuing:
            self.policy.prefetch()
        return StepResult(rewards, term_np, lp_np, ref_np, kl_np, beta, scores, completions, episode_kl, deferred)

    def _deferred_kl(
        self, beta: float, ids: torch.Tensor, mask: torch.Tensor, token_logprob: torch.Tensor
    ) -> tuple[DeferredKL, np.ndarray]:
        """A finished deferred-KL batch's per-token terms, from one reference forward per chunk of rows, and each
        episode's total KL; from the step's new state (``ids``, ``mask``, the policy's ``token_logprob``),
        before it is committed."""
        P, T = self.max_prompt_tokens, self.max_new_tokens
        ref = token_logprobs(self.ref_model, ids, mask, P, T)
        kl = kl_penalty(token_logprob, ref, self.kl_estimator)
        lp_np, ref_np, kl_np, generated = to_host(token_logprob, ref, kl, mask[:, P:].bool())
        lp_np, ref_np, kl_np = (np.where(generated, a.astype(np.float64), np.nan) for a in (lp_np, ref_np, kl_np))
        # Past an episode's end there is nothing (NaN; reward 0). On its tokens a NaN stays NaN, as per token.
        totals = np.where(generated, kl_np, 0.0).sum(1)
        return DeferredKL(lp_np, ref_np, kl_np, np.where(generated, -beta * kl_np, 0.0)), totals

    # ------------------------------------------------------------------------------------- text
    def completion_ids(self, row: int) -> torch.Tensor:
        """The tokens generated so far in ``row``."""
        P = self.max_prompt_tokens
        return self.ids[row, P : P + int(self.gen_len[row])]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ids, skipping special tokens and ids past the tokenizer (padding rows of the LM head)."""
        return self.decode_batch([ids])[0]

    def decode_batch(self, sequences: Sequence[Sequence[int] | torch.Tensor]) -> list[str]:
        """`decode` of several id sequences in one tokenizer call (the fast tokenizers decode in Rust)."""
        known = len(self.tokenizer)  # ids at or past this are the LM head's padding rows
        lists = [s.tolist() if isinstance(s, torch.Tensor) else list(s) for s in sequences]
        return self.tokenizer.batch_decode([[i for i in ids if i < known] for ids in lists], skip_special_tokens=True)

    def completion_text(self, row: int) -> str:
        return self.decode(self.completion_ids(row))

    def completion_texts(
        self, rows: Sequence[int], observation: tuple[np.ndarray, np.ndarray] | None = None
    ) -> list[str]:
        """The generated text of ``rows``: from ``observation`` (host ``ids``, ``mask``), else the step's host
        copy of the buffer, else the buffer read in one copy."""
        P = self.max_prompt_tokens
        ids, mask = observation or self._host_observation or to_host(self.ids, self.mask)
        lengths = mask[:, P:].sum(1)  # generated tokens follow the prompt slots contiguously
        return self.decode_batch([ids[r, P : P + lengths[r]].tolist() for r in rows])
