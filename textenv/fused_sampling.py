"""Fused sampling: the policy's sampling distribution and a token draw in one compiled call.

Why. Per token, the eager path (`SamplingConfig.logprobs`, then `textenv.sampling.sample_tokens`) runs a
float32 copy of the logits, a log-softmax, an ``exp``, a float64 copy and a float64 cumulative sum over the
whole vocabulary, then a binary search: each a kernel that reads and writes ``B × V`` numbers. At GPT-2's
vocabulary and batch 256 that is about half a gigabyte of memory traffic per step, and in the H100 profile
(docs/benchmarks.md, "GPU targets") the cumulative sum alone took 26 ms of a 128-step rollout, and the
policy's and the reference's log-softmaxes 17 ms together. Compiled as one function, inductor can fuse the
pointwise work into the reductions.

The search is blocked so that no cumulative sum runs over the whole vocabulary (`blocked_inverse_cdf`): the
probabilities are summed per block of `SEARCH_BLOCK` tokens (the ``exp`` fused into a float64 reduction),
the block sums' cumulative sum (a few hundred entries) picks the block, and a cumulative sum of that one
block picks the token. Given the same log-probs it is the same inverse-CDF draw as `sample_tokens`, from
the same single uniform number per row: the two pick different tokens only when that number falls within
float64 rounding (about 1e-16) of the boundary between two tokens. The compiled log-softmax itself may round
differently from the eager one (by up to about 1e-5 at temperature 0.7 on the CPU; on a GPU, inductor's
``exp`` and ``log`` also differ from eager's by a few ulps), so against the eager path a draw differs about
that rarely; the token always comes from the distribution that is kept for the
KL term and PPO, so nothing is biased. Like `sample_tokens`, it never draws a token of probability 0.

On the CPU a compiled call costs more than the few small kernels it replaces at textenv's test and benchmark
sizes, and pays only from about a million logits per step (docs/benchmarks.md, "Fused sampling": 0.019 vs
0.064 ms at 4 × 1,000, 0.99 vs 1.25 ms at 64 × 8,000, 30.5 vs 8.2 ms at 64 × 50,257), so
`default_fused_sampling` turns it on only for ``compiled`` decoding on CUDA.
"""

from __future__ import annotations

import torch

from textenv.compile_cache import CompiledOrEager
from textenv.sampling import SamplingConfig, first_above_with_mass

SEARCH_BLOCK = 256
"""Tokens per block of the blocked search: ~200 blocks for GPT-2's 50,257; one block a row reads in full."""


def default_fused_sampling(decoding: str, device: torch.device) -> bool:
    """Fused sampling where it is expected to pay: ``compiled`` decoding on CUDA (see the module docstring)."""
    return decoding == "compiled" and device.type == "cuda"


def blocked_inverse_cdf(logprobs: torch.Tensor, u: torch.Tensor, block: int = SEARCH_BLOCK) -> torch.Tensor:
    """The token of each row ``(B,)`` whose cumulative probability first exceeds ``u × total``, found blockwise.

    :param logprobs: ``(B, V)`` log-probs (``-inf`` for tokens that cannot be drawn).
    :param u: ``(B, 1)`` float64 uniform numbers in [0, 1), one per row.

    A token of probability 0 is never picked: ``u < 1`` makes the target below the total, so some block's
    cumulative sum rises past it. Both searches take the first entry that crosses the target *and has mass*
    (`textenv.sampling.first_above_with_mass`): with sums that add a zero unchanged that is what a binary
    search finds, and a GPU's parallel scan, which can rise by one ulp at an entry of mass 0, cannot pick
    one either. Where the remainder within the chosen block reaches past the block's own cumulative sum
    (which rounds apart from the block's total), the block's last token with mass is taken. A row with no
    mass at all (all ``-inf`` or NaN) gets the last token, as from `sample_tokens`.
    """
    rows, vocab = logprobs.shape
    blocks_per_row = -(-vocab // block)
    probs = logprobs.float().exp()
    if blocks_per_row * block != vocab:
        probs = torch.nn.functional.pad(probs, (0, blocks_per_row * block - vocab))  # padding: probability 0
    blocks = probs.view(rows, blocks_per_row, block)
    block_mass = blocks.sum(-1, dtype=torch.float64)  # (B, blocks)
    block_cdf = block_mass.cumsum(-1)
    target = u * block_cdf[:, -1:]  # < the total for u < 1
    chosen = first_above_with_mass(block_cdf, block_mass, target)  # (B, 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    within = blocks.gather(1, chosen.unsqueeze(-1).expand(rows, 1, block)).squeeze(1)  # (B, block)
    within_cdf = within.cumsum(-1, dtype=torch.float64)
    # The remainder may reach past this block's own cumulative sum, which rounds apart from its total: then no
    # token crosses it and `first_above_with_mass` answers with the block's last token with mass.
    token = first_above_with_mass(within_cdf, within, target - before)
    return (chosen * block + token).clamp(max=vocab - 1).squeeze(-1)


def sampling_step(logits: torch.Tensor, u: torch.Tensor, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling distribution's log-probs ``(B, V)`` and one token per row drawn from it with ``u``."""
    logprobs = sampling.logprobs(logits)
    return logprobs, blocked_inverse_cdf(logprobs, u)


class FusedSampler:
    """`sampling_step` and `blocked_inverse_cdf`, each compiled for this sampler alone.

    Static shapes, one graph each (``fullgraph``), inductor's default mode on every device: no CUDA graph, so
    the log-probs handed out are ordinary tensors that no later replay overwrites. Each instance compiles its
    own copy of the code, so samplers of other shapes never share a dynamo cache; if the backend cannot compile
    one, it runs eagerly, with a warning (`textenv.compile_cache.CompiledOrEager`).

    :param compile_options: more ``torch.compile`` options (static shapes by default; always one graph).
    """

    def __init__(self, sampling: SamplingConfig, **compile_options) -> None:
        self.sampling = sampling
        options = {"dynamic": False, **compile_options, "fullgraph": True}
        self._step = CompiledOrEager(sampling_step, **options)
        self._search = CompiledOrEager(blocked_inverse_cdf, **options)

    def logprobs_and_tokens(self, logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the policy's logits: the sampling log-probs and the drawn tokens, in one call."""
        return self._step(logits, u, self.sampling)

    def tokens(self, logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Tokens drawn from log-probs already computed (handed over with ``PolicyLink.provide``, say)."""
        return self._search(logprobs, u)
