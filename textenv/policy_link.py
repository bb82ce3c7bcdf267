"""How the policy's log-probs reach the env's KL term without a second policy forward per token.

The KL penalty needs ``log π(a_t | s_t)``, but in Gymnasium the env does not own the agent. textenv's
answer is a `PolicyLink` bound to the env (``env.bind_policy(link)``): one object that both sides read.

- The agent asks the link for the current sampling distribution (``link.logprobs()``), samples from it and
  calls ``env.step(action)``.
- The env asks the same link for the log-prob of that action. The distribution was computed once, by
  whichever side asked first, with the policy's KV cache; the env then advances the cache with the action
  (and, for a link built with ``prefetch=True``, runs that forward itself at the end of its step).

So each token costs exactly one incremental policy forward, standard loops (``obs, r, ... = env.step(a)``)
keep working, and agents that compute the distribution themselves (a stable-baselines3 policy running a
full forward on the observation) can hand it over with ``link.provide(logprobs)`` instead; a link without
a model then simply relays what it was given.

With no link bound, the env assumes the acting policy is uniform over the action space: that is exactly
true for a random agent (``log π(a) = -log V``), and the KL it reports is then KL(uniform ‖ reference).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import PreTrainedModel

from textenv.fused_sampling import FusedSampler, default_fused_sampling
from textenv.host_transfer import index_on
from textenv.incremental import DEFAULT_RESERVE, IncrementalLM, StepOutput
from textenv.sampling import SamplingConfig, sample_tokens, uniform_draws
from textenv.static_decoding import make_decoder


class PolicyLink:
    """The acting policy, bound to an env so sampling and the KL term share one forward per token.

    :param model: the policy causal LM, or ``None`` if the agent will ``provide`` distributions itself.
    :param sampling: temperature / top-k / top-p; the log-probs handed out are of this distribution.
    :param output_hidden_states: keep the last hidden state of each step (for a value head on the trunk).
    :param pad_token_id: id used in padding columns of the policy's cache.
    :param decoding: ``dynamic``, ``static`` or ``compiled`` KV cache and decode step
        (see `textenv.static_decoding`).
    :param autocast: the context every policy forward runs in (an agent's bf16 autocast, say). A prefetched
        forward runs inside the env's ``step``, and the prefill of new episodes inside its ``reset``, both
        outside the agent's own ``with`` block, so the link applies it. A prefill outside it would give the
        first token float32 outputs where every later one (and PPO's update) has bf16, and a static KV cache
        allocated in float32 that every bf16 step would convert in full (twice its memory, three times the
        traffic of the attention's reads).
    :param prefetch: let the env run the next forward at the end of its step (`prefetch`) instead of when
        the agent next asks. Only for loops that change nothing in between: a weight update or a
        train/eval switch between ``env.step`` and the next ``logprobs()`` would otherwise be missed by that
        forward. textenv's PPO and policy-gradient agents set it (their batches run to the end unchanged).
    :param guards_once_per_batch: with ``compiled`` decoding, check the compiled step's dynamo guards in full
        only once per batch and window size (`textenv.static_decoding`, "Guards"). The same kind of promise as
        ``prefetch``: no module attribute of the model (``training`` flags and the like) changes within a
        batch. In-place weight updates are not guarded and stay safe. The agents that set ``prefetch`` set
        this too; ``link.decoder.guards_once_per_batch = False`` turns it off.
    :param fused_sampling: `sample` computes the sampling log-probs and draws the tokens in one compiled call
        (`textenv.fused_sampling`): the same draws up to float64 rounding at token boundaries. Default
        (``None``): on for ``compiled`` decoding on CUDA, off elsewhere (on the CPU it is slower); the
        ``fused_sampling`` attribute can be changed at any time.
    :param before_batch: called at each `start` (the env's reset: a new batch), before the prefill. A link
        that runs a copy of the policy's weights (PPO's bf16 rollout copy, `agents.autocast_weight_copy`)
        brings the copy up to date there, so every batch the env starts, in the agent's loop or in another,
        runs the current weights.
    """

    def __init__(
        self,
        model: PreTrainedModel | None,
        sampling: SamplingConfig | None = None,
        output_hidden_states: bool = False,
        pad_token_id: int = 0,
        decoding: str = "dynamic",
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        prefetch: bool = False,
        guards_once_per_batch: bool = False,
        fused_sampling: bool | None = None,
        before_batch: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.before_batch = before_batch
        self.autocast = autocast
        self.prefetch_forward = prefetch
        self.sampling = sampling or SamplingConfig()
        self.decoder: IncrementalLM | None = (
            make_decoder(model, decoding, output_hidden_states, pad_token_id, guards_once_per_batch=guards_once_per_batch)
            if model is not None
            else None
        )
        self._current: StepOutput | None = None  # outputs for the current state of every row
        self._logprobs: torch.Tensor | None = None  # sampling log-probs for the current state
        self._pending: torch.Tensor | None = None  # tokens appended but not yet run through the model
        device = self.decoder.device if self.decoder is not None else torch.device("cpu")
        self.fused_sampling = default_fused_sampling(decoding, device) if fused_sampling is None else fused_sampling
        self._fused_sampler: FusedSampler | None = None  # compiled when first used

    # ---------------------------------------------------------------------------------- agent side
    def logprobs(self) -> torch.Tensor:
        """``(B, V)`` log-probs of the sampling distribution at the current state of every row."""
        if self._logprobs is None:
            self._logprobs = self.sampling.logprobs(self.outputs().logits)
        return self._logprobs

    def outputs(self) -> StepOutput:
        """The policy's raw outputs (logits, hidden state) at the current state, computed at most once."""
        if self._pending is not None:
            if self.decoder is None:
                raise RuntimeError(
                    "this PolicyLink has no model: call provide(logprobs) before each env step"
                )
            with self.autocast():
                self._current = self.decoder.step(self._pending)
            self._pending = None
        if self._current is None:
            raise RuntimeError("no current policy output: reset the env first, or provide(logprobs)")
        return self._current

    def prefetch(self) -> None:
        """Run the pending forward now, if this link prefetches, instead of when the next distribution is asked for.

        The env calls it at the end of a step in which some row goes on: on a GPU the forward then runs while
        the host finishes the vector env's step and the agent its loop, instead of after them. For an agent
        that steps its batch to the end and changes nothing in between, the outputs and the number of
        forwards are the same; only the moment the work is queued changes.
        """
        if self.prefetch_forward and self._pending is not None and self.decoder is not None:
            self.outputs()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample one token per row from the sampling distribution (one uniform number per row from ``generator``).

        With ``fused_sampling`` and no distribution computed yet for this state, the distribution (then kept for
        `logprobs` and the env's KL term) and the draw come from one compiled call.
        """
        if not self.fused_sampling:
            return sample_tokens(self.logprobs(), generator)
        if self._fused_sampler is None or self._fused_sampler.sampling != self.sampling:
            self._fused_sampler = FusedSampler(self.sampling)  # (a changed `sampling` compiles anew)
        if self._logprobs is None:
            logits = self.outputs().logits
            u = uniform_draws(logits.shape[0], generator, logits.device)
            self._logprobs, tokens = self._fused_sampler.logprobs_and_tokens(logits, u)
            return tokens
        u = uniform_draws(self._logprobs.shape[0], generator, self._logprobs.device)
        return self._fused_sampler.tokens(self._logprobs, u)

    def provide(self, logprobs: torch.Tensor) -> None:
        """Hand over the current step's sampling log-probs ``(B, V)`` computed outside the link."""
        self._logprobs = logprobs.detach().float()
        self._pending = None

    # ---------------------------------------------------------------------------------- env side
    def start(self, sequences: Sequence[torch.Tensor], reserve: int = DEFAULT_RESERVE) -> None:
        """All rows begin new episodes with these prompt ids; ``reserve`` tokens will follow at most."""
        self._logprobs = None
        self._pending = None
        if self.before_batch is not None:
            self.before_batch()
        if self.decoder is None:
            self._current = None
            return
        with self.autocast():
            self._current = self.decoder.start(sequences, reserve)

    def replace_rows(self, rows: Sequence[int], sequences: Sequence[torch.Tensor]) -> None:
        """Some rows begin new episodes; the rest keep their cache."""
        if self.decoder is None:
            self._logprobs = None
            return
        current = self.outputs()  # apply any pending token first so every row is in step
        with self.autocast():
            new = self.decoder.replace_rows(rows, sequences)
        index = index_on(rows, current.logits.device)
        logits = current.logits.clone()
        logits[index] = new.logits
        hidden = None
        if current.hidden is not None and new.hidden is not None:
            hidden = current.hidden.clone()
            hidden[index] = new.hidden
        self._current = StepOutput(logits, hidden)
        self._logprobs = None

    def advance(self, actions: torch.Tensor) -> None:
        """The env took these actions: the next request runs one cached forward with them."""
        self._pending = actions.detach()
        self._logprobs = None
        self._current = None if self.decoder is not None else self._current
