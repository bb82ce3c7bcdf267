"""The update's largest tensors are the ``b × T × V`` logits; nothing logits-sized beyond them may stay saved
for backward. The plain ``log_softmax(logits.float()).gather(a)`` kept a float32 copy of the distribution
(and, for the entropy statistic, two more); `chunked_taken_logprobs` must give the same values and the same
gradient while autograd keeps only the logits themselves."""

import types

import pytest
import torch

from agents.chunked_logprobs import chunked_taken_logprobs
from agents.rollout import taken_logprobs
from benchmarks import update_memory
from textenv.sampling import SamplingConfig, entropy

SAMPLINGS = [
    SamplingConfig(),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=0.7, top_k=20),
    SamplingConfig(top_p=0.8),
]


def saved_bytes(fn, existing: torch.Tensor):
    """Bytes autograd keeps for backward while ``fn`` runs, each storage once, beyond the ``existing``
    tensor's storage (the logits, alive anyway); and ``fn``'s result."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    storages.pop(existing.untyped_storage().data_ptr(), None)
    return sum(storages.values()), result


def plain_taken_logprobs(logits, actions, sampling):
    """The reference: the whole distribution at once, through autograd (as `benchmarks/update_memory.py`)."""
    return update_memory.plain_taken_logprobs(logits, actions, sampling, with_entropy=True)


@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("chunk_elements", [1, 2 * 9 * 50, 2**25])  # one sequence, two, all at once
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_logprobs_match_the_plain_log_softmax(sampling, chunk_elements, dtype):
    b, n, T, V = 5, 9, 6, 50  # n > T + 1: prompt positions come first and get no gradient
    gen = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(b, n, V, generator=gen)).to(dtype)
    actions = torch.randint(0, V, (b, T), generator=gen)
    actions[0, 0] = base[0, n - T - 1].float().argmin()  # outside any top-k / top-p set: -inf, no gradient of its own
    weights = torch.randn(b, T, generator=gen)

    logits = base.clone().requires_grad_()
    taken, token_entropy = chunked_taken_logprobs(logits, actions, sampling, True, chunk_elements)
    reference_logits = base.clone().requires_grad_()
    expected, expected_entropy = plain_taken_logprobs(reference_logits, actions, sampling)

    assert taken.dtype == torch.float32 and not token_entropy.requires_grad
    torch.testing.assert_close(taken, expected)
    torch.testing.assert_close(token_entropy, expected_entropy)
    # The loss sees the floor, as in the update: the -inf entry contributes no gradient anywhere.
    (taken.clamp(min=-50) * weights).sum().backward()
    (expected.clamp(min=-50) * weights).sum().backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), reference_logits.grad.float(), atol=1e-6, rtol=1e-2)
    assert logits.grad[:, : n - T - 1].abs().sum() == 0 and logits.grad[:, -1].abs().sum() == 0
    assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("sampling", SAMPLINGS[2:])
def test_chunked_logprobs_gradient_at_tokens_outside_the_kept_set(sampling):
    """With a nonzero upstream gradient at a -inf log-prob (no floor), both paths give the same finite gradient."""
    b, T, V = 3, 4, 50
    gen = torch.Generator().manual_seed(2)
    base = 3 * torch.randn(b, T + 1, V, generator=gen)
    kept = sampling.logprobs(base[:, :-1])
    actions = torch.multinomial(kept.exp().view(-1, V), 1, generator=gen).view(b, T)  # inside the set
    actions[1, 2] = kept[1, 2].argmin()  # outside it
    upstream = torch.randn(b, T, generator=gen)
    logits, reference_logits = base.clone().requires_grad_(), base.clone().requires_grad_()
    taken, _ = chunked_taken_logprobs(logits, actions, sampling, False, chunk_elements=1)
    expected, _ = plain_taken_logprobs(reference_logits, actions, sampling)
    assert torch.isinf(taken[1, 2]) and torch.isfinite(taken[0]).all()
    taken.backward(upstream)
    expected.backward(upstream)
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad, reference_logits.grad)


def test_chunked_logprobs_gradient_matches_the_jacobian_with_temperature():
    sampling = SamplingConfig(temperature=1.3)
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    actions = torch.randint(0, 7, (3, 4), generator=gen)

    def first_output(x):  # float64 throughout (SamplingConfig itself computes in float32)
        return torch.log_softmax(x[:, -5:-1] / sampling.temperature, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    taken, _ = chunked_taken_logprobs(logits, actions, sampling, False, chunk_elements=5 * 7)
    taken.sum().backward()
    expected = torch.autograd.functional.jacobian(lambda x: first_output(x).sum(), logits.detach())
    torch.testing.assert_close(logits.grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "sampling",
    [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=20), SamplingConfig(top_p=0.8), SamplingConfig(top_k=50)],
)  # top_k=50 = V truncates nothing: no bits kept
def test_update_saves_only_the_logits_for_backward(sampling):
    b, T, V = 3, 5, 50
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(b, T + 1, V, generator=gen, requires_grad=True)
    batch = types.SimpleNamespace(actions=torch.randint(0, V, (b, T), generator=gen))
    rows = torch.arange(b)
    with_bytes, (logprobs, token_entropy) = saved_bytes(lambda: taken_logprobs(logits, batch, rows, sampling, True), logits)
    without_bytes, (logprobs_only, none) = saved_bytes(lambda: taken_logprobs(logits, batch, rows, sampling, False), logits)
    assert none is None and not token_entropy.requires_grad
    assert with_bytes == without_bytes  # the entropy adds nothing to the autograd graph
    # The actions, the (b, T) log-probs the floor's clamp keeps, and with top-k / top-p the kept set's bits.
    bits = b * T * -(-V // 8) if 0 < sampling.top_k < V or sampling.top_p < 1 else 0
    assert without_bytes <= 2 * b * T * 8 + bits
    plain_bytes, _ = saved_bytes(lambda: plain_taken_logprobs(logits, batch.actions, sampling), logits)
    assert plain_bytes >= b * T * V * 4  # the float32 distribution that the chunked path does not keep
    torch.testing.assert_close(logprobs, logprobs_only)
    torch.testing.assert_close(token_entropy, entropy(sampling.logprobs(logits[:, :-1].detach())))


def test_chunked_logprobs_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"must be \(b, n, V\) with n > T"):
        chunked_taken_logprobs(torch.zeros(2, 4, 10), torch.zeros(2, 4, dtype=torch.long), SamplingConfig())
    with pytest.raises(ValueError, match="must be"):
        chunked_taken_logprobs(torch.zeros(3, 5, 10), torch.zeros(2, 4, dtype=torch.long), SamplingConfig())


def test_packed_bits_round_trip_and_the_backward_does_not_sort_again(monkeypatch):
    from agents.chunked_logprobs import pack_bits, unpack_bits

    gen = torch.Generator().manual_seed(0)
    for size in (1, 8, 13, 50):
        mask = torch.rand(3, 4, size, generator=gen) < 0.5
        assert pack_bits(mask).shape == (3, 4, -(-size // 8))
        assert torch.equal(unpack_bits(pack_bits(mask), size), mask)
    logits = torch.randn(2, 6, 50, generator=gen, requires_grad=True)
    actions = torch.randint(0, 50, (2, 5), generator=gen)
    taken, _ = chunked_taken_logprobs(logits, actions, SamplingConfig(top_p=0.8), chunk_elements=1)
    def no_sort(*args, **kwargs):
        raise AssertionError("the backward sorted the logits again")

    monkeypatch.setattr(torch, "sort", no_sort)
    taken.clamp(min=-50).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
