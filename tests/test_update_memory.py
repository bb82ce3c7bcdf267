"""The update's largest tensors are the ``b × T × V`` logits; nothing beyond the loss's needs may stay saved
for backward. The entropy statistic used to: its probabilities and masked log-probs (two more logits-sized
float tensors) were kept by autograd until the backward pass, at the update's memory peak."""

import types

import pytest
import torch

from agents.rollout import taken_logprobs
from textenv.sampling import SamplingConfig, entropy


def saved_bytes(fn):
    """Bytes autograd keeps for backward while ``fn`` runs (each storage once), and its result."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return sum(storages.values()), result


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=20)])
def test_entropy_statistic_saves_nothing_for_backward(sampling):
    b, T, V = 3, 5, 50
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(b, T + 1, V, generator=gen, requires_grad=True)
    batch = types.SimpleNamespace(actions=torch.randint(0, V, (b, T), generator=gen))
    rows = torch.arange(b)
    with_bytes, (logprobs, token_entropy) = saved_bytes(lambda: taken_logprobs(logits, batch, rows, sampling, True))
    without_bytes, (logprobs_only, none) = saved_bytes(lambda: taken_logprobs(logits, batch, rows, sampling, False))
    assert none is None and not token_entropy.requires_grad
    assert with_bytes == without_bytes  # the entropy adds nothing to the autograd graph
    logits_bytes = b * (T + 1) * V * 4
    assert without_bytes <= 2 * logits_bytes  # the log-softmax output (and, with top-k, a mask and the logits)
    # The same numbers as before: log-probs (and their gradients) and the entropy of the sampling distribution.
    torch.testing.assert_close(logprobs, logprobs_only)
    expected = entropy(sampling.logprobs(logits[:, :-1].detach().float()))
    torch.testing.assert_close(token_entropy, expected)
    logprobs.sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    logprobs_only.sum().backward()
    torch.testing.assert_close(logits.grad, grad)
