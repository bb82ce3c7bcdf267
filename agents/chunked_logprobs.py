"""Log-probs of the taken tokens from full-sequence logits, without float copies of the logits.

In an RLHF update the largest tensors are the ``b × T × V`` logits (V = 50,257 for GPT-2: 0.8 GB in bf16
for 64 sequences of 128 tokens). The loss needs only ``log π(a_t)``, one number per token, yet the plain
``log_softmax(logits.float()).gather(a)`` keeps a float32 copy of the whole distribution saved for
backward, the entropy statistic makes three more temporaries of that size, and the backward pass two more
(the gather's dense gradient and the log-softmax's), each twice the size of the bf16 logits.

`chunked_taken_logprobs` computes the same values and the same gradient in chunks of sequences: autograd
keeps the input logits in their own dtype (bf16 under autocast) instead of a float32 distribution, and
only one chunk's float32 temporaries exist at a time; the backward recomputes each chunk's probabilities
and writes ``(onehot(a) − p) · g / τ`` straight into a gradient of the logits' dtype. With top-k / top-p
the forward also keeps which tokens the truncation kept, one bit per logit, so that the backward needs no
second sort (without it the chunked update ran at 0.70–0.74× the plain path's speed with top-p on a CPU). TRL's
``selective_log_softmax`` (row by row, through autograd) and Liger's fused cross-entropy (a hand-written
backward) avoid the same full-size temporaries; here the log-probs are those of the sampling distribution
(temperature, top-k, top-p; see `textenv.sampling`) and the entropy statistic comes from the same pass.
"""

from __future__ import annotations

import torch

from textenv.sampling import SamplingConfig, entropy

CHUNK_ELEMENTS = 2**22
"""Logits per chunk (16 MiB per float32 temporary), but never less than one sequence: for GPT-2's 50,257
tokens and 128 generated positions a chunk is one sequence, 6.4M logits (25 MiB per temporary)."""


def _bit_weights(device: torch.device) -> torch.Tensor:
    """``[1, 2, 4, ..., 128]`` as uint8, made on ``device`` (a copy from a Python list would wait for a GPU)."""
    return 1 << torch.arange(8, dtype=torch.uint8, device=device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor ``(..., V)`` as uint8 ``(..., ceil(V / 8))``, one bit per entry."""
    pad = -mask.shape[-1] % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], pad)], dim=-1)
    return (mask.view(*mask.shape[:-1], -1, 8).to(torch.uint8) * _bit_weights(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, size: int) -> torch.Tensor:
    """The bool tensor ``(..., size)`` that `pack_bits` packed."""
    return (packed.unsqueeze(-1) & _bit_weights(packed.device)).ne(0).flatten(-2)[..., :size]


def _rows_per_chunk(logits: torch.Tensor, T: int, chunk_elements: int) -> int:
    """Sequences per chunk: about ``chunk_elements`` of the ``T × V`` logits each uses, at least one."""
    return max(1, chunk_elements // max(1, T * logits.shape[-1]))


class _TakenLogprobs(torch.autograd.Function):
    """``log p(a)`` of the sampling distribution per position; see `chunked_taken_logprobs`."""

    @staticmethod
    def forward(ctx, logits, actions, sampling, chunk_elements, with_entropy):  # type: ignore[override]
        T = actions.shape[1]
        taken = torch.empty(actions.shape, dtype=torch.float32, device=logits.device)
        token_entropy = torch.empty_like(taken) if with_entropy else None
        V = logits.shape[-1]
        kept = None  # with top-k / top-p: the truncated set, one bit per logit
        if sampling.truncates(V):
            kept = torch.empty(*actions.shape, -(-V // 8), dtype=torch.uint8, device=logits.device)
        step = _rows_per_chunk(logits, T, chunk_elements)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            chunk = sampling.logprobs(logits[rows, -T - 1 : -1])  # float32 (c, T, V); -inf outside top-k/p
            taken[rows] = chunk.gather(-1, actions[rows].unsqueeze(-1)).squeeze(-1)
            if token_entropy is not None:
                token_entropy[rows] = entropy(chunk)
            if kept is not None:
                kept[rows] = pack_bits(torch.isfinite(chunk))
        ctx.save_for_backward(logits, actions, *(() if kept is None else (kept,)))
        ctx.sampling, ctx.chunk_elements = sampling, chunk_elements
        if token_entropy is None:
            token_entropy = torch.empty(0, device=logits.device)
        ctx.mark_non_differentiable(token_entropy)
        return taken, token_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable  # the in-place chunk arithmetic below is not itself differentiable
    def backward(ctx, grad_taken, _grad_entropy):  # type: ignore[override]
        logits, actions, *kept = ctx.saved_tensors
        sampling: SamplingConfig = ctx.sampling
        T = actions.shape[1]
        grad = torch.zeros_like(logits)  # positions outside the last T + 1 (the prompt's, the last one) get 0
        step = _rows_per_chunk(logits, T, ctx.chunk_elements)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            chunk = logits[rows, -T - 1 : -1]
            # the forward's truncated set, if any: the same masked log-softmax, without sorting again
            logprobs = sampling.logprobs(chunk, unpack_bits(kept[0][rows], chunk.shape[-1]) if kept else None)
            g = grad_taken[rows].unsqueeze(-1).float()  # (c, T, 1)
            a = actions[rows].unsqueeze(-1)
            # d log p(a) / d z_j = δ_aj − p_j on the kept tokens (p_j = 0 elsewhere). A taken token outside
            # the kept set has log p(a) = −inf and, as in autograd's masked_fill, no gradient of its own.
            taken_kept = torch.isfinite(logprobs.gather(-1, a))
            chunk_grad = logprobs.exp_().mul_(-g).scatter_add_(-1, a, g * taken_kept)
            if sampling.temperature != 1.0:
                chunk_grad.div_(sampling.temperature)
            grad[rows, -T - 1 : -1] = chunk_grad
        return grad, None, None, None, None


def chunked_taken_logprobs(
    logits: torch.Tensor,
    actions: torch.Tensor,
    sampling: SamplingConfig,
    with_entropy: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``actions`` under the sampling distribution, and optionally its entropy, in chunks.

    :param logits: ``(b, n, V)`` logits of any float dtype, ``n >= T + 1``; position ``n − T − 1 + t``
        predicts ``actions[:, t]`` (the last position predicts nothing and gets no gradient).
    :param actions: ``(b, T)`` the taken tokens.
    :param sampling: the distribution the tokens were sampled from (`SamplingConfig.logprobs`).
    :param with_entropy: also return the ``(b, T)`` entropy (a statistic: no gradient), else ``None``.
    :param chunk_elements: logits per chunk; the float32 temporaries are about 4 bytes for each.
    :returns: float32 ``(b, T)`` log-probs, ``-inf`` for a token outside the top-k / top-p set, with the
        gradient of `SamplingConfig.logprobs` (temperature, top-k / top-p mask, log-softmax) gathered at
        ``actions``.
    """
    if logits.ndim != 3 or actions.ndim != 2 or logits.shape[0] != actions.shape[0] or logits.shape[1] <= actions.shape[1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be (b, n, V) with n > T for actions {tuple(actions.shape)} (b, T)"
        )
    taken, token_entropy = _TakenLogprobs.apply(logits, actions, sampling, chunk_elements, with_entropy)
    return taken, (token_entropy if with_entropy else None)
