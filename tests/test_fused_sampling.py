"""Fused sampling (`textenv.fused_sampling`): the sampling distribution and the draw in one compiled call, with a
blocked inverse-CDF search. It must draw `sample_tokens`' tokens from the same uniform numbers, never a token
of probability 0 (padding, top-k / top-p cuts, the edges of ``u``), and a rollout through a link that fuses
must equal one that does not.

The tests run on the CPU. ``TEXTENV_TEST_DEVICE=cuda`` runs them on a GPU instead (benchmarks/gpu_suite.sh does),
where fused sampling is the default of a ``compiled`` link.
"""

import os
import warnings

import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from textenv import PolicyLink
from textenv.fused_sampling import SEARCH_BLOCK, FusedSampler, blocked_inverse_cdf, default_fused_sampling
from textenv.sampling import (
    SamplingConfig,
    first_above_with_mass,
    flat_where_no_mass,
    sample_tokens,
    uniform_draws,
)
from textenv.toy import make_toy_env, toy_components

DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))
SAMPLINGS = [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5), SamplingConfig(top_p=0.6)]


def draws(rows: int, seed: int) -> torch.Tensor:
    return uniform_draws(rows, torch.Generator().manual_seed(seed), DEVICE)


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3).to(DEVICE)


@pytest.mark.parametrize("vocab", [1, 200, SEARCH_BLOCK, SEARCH_BLOCK + 1, 1000, 50257])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["plain", "top-k", "top-p"])
def test_the_blocked_search_draws_the_flat_samplers_tokens(vocab, sampling):
    logprobs = sampling.logprobs(random_logits(16, vocab, seed=vocab))
    for seed in range(20 if vocab > 1000 else 100):
        flat = sample_tokens(logprobs, torch.Generator().manual_seed(seed))
        assert torch.equal(blocked_inverse_cdf(logprobs, draws(16, seed)), flat), seed


def test_the_blocked_search_samples_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.25, 0.05])
    probs = torch.cat([probs, torch.zeros(2 * SEARCH_BLOCK)])  # mass only in the first block
    probs[SEARCH_BLOCK + 7] = 0.1  # and one token in the second
    logprobs = (probs / probs.sum()).log().expand(40000, -1).to(DEVICE)
    tokens = blocked_inverse_cdf(logprobs, draws(40000, 0))
    frequency = torch.bincount(tokens.cpu(), minlength=probs.numel()).double() / 40000
    torch.testing.assert_close(frequency, probs.double() / probs.sum(), atol=0.01, rtol=0)
    assert frequency[probs == 0].sum() == 0


def compiled_search(logprobs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`blocked_inverse_cdf` as rollouts run it: compiled (`FusedSampler.tokens`)."""
    return FusedSampler(SamplingConfig()).tokens(logprobs, u)


SEARCHES = pytest.mark.parametrize("search", [blocked_inverse_cdf, compiled_search], ids=["eager", "compiled"])


@SEARCHES
def test_never_a_token_of_probability_zero(search):
    """At the edges of ``u`` (0 and the largest float64 below 1), at every token's exact upper boundary, and
    with mass only at the vocabulary's ends, in a block's middle, or in tokens far smaller than their neighbours.
    A row with no mass at all gets the last token, as from `sample_tokens`, instead of an index error."""
    vocab = 3 * SEARCH_BLOCK + 11
    layouts = {
        "first only": [0],
        "last only": [vocab - 1],
        "mid block": [SEARCH_BLOCK + 100],
        "both ends": [0, vocab - 1],
        "block edges": [SEARCH_BLOCK - 1, SEARCH_BLOCK, 2 * SEARCH_BLOCK - 1],
    }
    u_edges = torch.tensor([0.0, 0.5, 1 - 2.0**-53], dtype=torch.float64)
    for name, kept in layouts.items():
        logprobs = torch.full((1, vocab), float("-inf"))
        logprobs[0, kept] = torch.log_softmax(torch.arange(len(kept), dtype=torch.float), 0)
        logprobs = logprobs.expand(3, -1).to(DEVICE)
        tokens = search(logprobs, u_edges.view(-1, 1).to(DEVICE))
        assert set(tokens.tolist()) <= set(kept), name
    # Mass spread over many scales, with zeros between: draw at each token's exact upper cumulative boundary.
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1)) * 20
    logits[0, torch.randperm(vocab, generator=torch.Generator().manual_seed(2))[: vocab // 2]] = float("-inf")
    logprobs = torch.log_softmax(logits, -1).to(DEVICE)
    cdf = logprobs.exp().double().cumsum(-1)[0]
    u = (cdf / cdf[-1]).clamp(max=1 - 2.0**-53).view(-1, 1)
    tokens = search(logprobs.expand(vocab, -1), u)
    assert torch.isfinite(logprobs[0, tokens]).all()
    no_mass = torch.full((3, vocab), float("-inf"), device=DEVICE)
    no_mass[1] = float("nan")
    assert search(no_mass, u_edges.view(-1, 1).to(DEVICE)).tolist() == [vocab - 1] * 3


def test_a_parallel_scans_rise_at_a_token_of_no_mass_is_never_picked():
    """A GPU's cumulative sum (a parallel scan) can rise or dip by one ulp at a token of mass 0; the search
    (both samplers' rule on a GPU) must pick the token with mass where the sum crosses the target."""
    up = torch.nextafter(torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)).item()
    down = torch.nextafter(torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()
    mass = torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.5]],
                        dtype=torch.float64)  # fmt: skip
    cdf = torch.tensor([[0.5, up, 1.0], [0.5, down, 1.0], [0.5, 1.0, 1.0 + 2**-52], [0.0, 0.0, 0.0], [0.5, up, 1.0]],
                       dtype=torch.float64)  # fmt: skip
    target = torch.tensor([[0.5], [0.5], [1.0], [0.0], [0.25]], dtype=torch.float64)
    assert torch.searchsorted(cdf[:1], target[:1], right=True).item() == 1  # a plain search takes the gap
    # row 0: the rise at token 1 is rounding; row 1: a dip there instead; row 2: only the rounding
    # rise is past the target (the last token with mass); row 3: no mass (the last token); row 4: no gap.
    assert first_above_with_mass(cdf, mass, target).squeeze(-1).tolist() == [2, 2, 1, 2, 0]
    # The eager sampler's form: flatten the zero-mass entries, then search below the flattened total.
    flat = flat_where_no_mass(cdf, mass)
    flat_target = torch.minimum(target, torch.nextafter(flat[:, -1:], torch.zeros_like(target)))  # u < 1
    assert torch.searchsorted(flat, flat_target, right=True).clamp(max=2).squeeze(-1).tolist() == [2, 2, 1, 2, 0]
    assert torch.equal(flat_where_no_mass(mass.cumsum(-1), mass), mass.cumsum(-1))  # an exact sum: unchanged


@SEARCHES
def test_a_target_between_two_roundings_of_a_blocks_mass_stays_in_the_block(search):
    """A block's sum (one reduction) and its cumulative sum (another order) round differently when its masses
    span many binary orders; a target between the two must not run past the block into one of zero mass.
    On the CPU whatever ``TEXTENV_TEST_DEVICE`` says: the construction finds the gap with the CPU's kernels."""
    found = set()
    for zero_tail in (0, 4):  # then the block's last tokens have no mass: the one before them must be picked
        for seed in range(50):
            probs = torch.zeros(1, 2 * SEARCH_BLOCK, dtype=torch.float)
            probs[0, :SEARCH_BLOCK] = torch.rand(SEARCH_BLOCK, generator=torch.Generator().manual_seed(seed)) * 1e-9
            probs[0, 0] = 0.75  # the second block has no mass at all
            probs[0, SEARCH_BLOCK - zero_tail : SEARCH_BLOCK] = 0.0
            logprobs = probs.log()
            probs = logprobs.exp()  # the probabilities exactly as the search computes and sums them
            block_sum = probs.view(1, 2, SEARCH_BLOCK).sum(-1, dtype=torch.float64)[:, 0]
            running = probs[0, :SEARCH_BLOCK].cumsum(-1, dtype=torch.float64)[-1]
            u = running / block_sum
            while u < 1 and not running <= u * block_sum < block_sum:
                u = torch.nextafter(u, torch.ones_like(u))
            if running <= u * block_sum < block_sum:  # found a target in the gap
                token = search(logprobs.to(DEVICE), u.view(1, 1).to(DEVICE)).item()
                assert token < SEARCH_BLOCK and torch.isfinite(logprobs[0, token])
                found.add(zero_tail)
                break
    assert found == {0, 4}, "no block whose two sums round apart: the construction no longer tests the gap"


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["plain", "top-k", "top-p"])
def test_the_compiled_sampler_matches_the_eager_distribution_and_draws(sampling):
    sampler = FusedSampler(sampling)
    for seed in range(3):
        logits = random_logits(8, 1000, seed)
        expected = sampling.logprobs(logits)
        logprobs, tokens = sampler.logprobs_and_tokens(logits, draws(8, seed))
        torch.testing.assert_close(logprobs, expected)  # the compiled log-softmax may round differently
        assert torch.equal(tokens, sample_tokens(logprobs, torch.Generator().manual_seed(seed)))
        assert torch.equal(sampler.tokens(expected, draws(8, seed + 10)),
                           sample_tokens(expected, torch.Generator().manual_seed(seed + 10)))  # fmt: skip


def test_fused_sampling_is_on_by_default_only_for_compiled_decoding_on_cuda():
    assert default_fused_sampling("compiled", torch.device("cuda"))
    assert not default_fused_sampling("compiled", torch.device("cpu"))
    assert not default_fused_sampling("static", torch.device("cuda"))
    model = toy_components(seed=3)["model"]
    assert not PolicyLink(model, decoding="compiled").fused_sampling  # on the CPU
    assert PolicyLink(model, fused_sampling=True).fused_sampling
    assert not PolicyLink(None).fused_sampling


def test_a_ppo_rollout_is_the_same_with_fused_sampling(monkeypatch):
    calls = {"logprobs_and_tokens": 0, "tokens": 0}

    def counted(name, method):
        def wrapper(self, *args):
            calls[name] += 1
            return method(self, *args)

        return wrapper

    for name in calls:
        monkeypatch.setattr(FusedSampler, name, counted(name, getattr(FusedSampler, name)))
    batches = []
    for fused in (True, False):
        env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=8, device=DEVICE, decoding="static")
        agent = PPOAgent(PolicyWithValueHead(toy_components(seed=5)["model"].to(DEVICE)), env,
                         PPOConfig(decoding="static", minibatch_size=4, micro_batch_size=4))  # fmt: skip
        agent.link.fused_sampling = fused
        batches.append(agent.rollout())
        assert (agent.link._fused_sampler is not None) == fused
    a, b = batches
    # Every step of the fused rollout was one call from the logits (the distribution was not computed first).
    assert calls == {"logprobs_and_tokens": int((a.mask.sum(0) > 0).sum()), "tokens": 0}
    assert torch.equal(a.actions, b.actions)
    for name in ("logprobs", "values", "rewards", "mask"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-6, rtol=0, msg=name)


def test_a_link_samples_provided_logprobs_and_a_changed_sampling_config():
    link = PolicyLink(None, fused_sampling=True)
    logprobs = SamplingConfig(top_k=3).logprobs(random_logits(6, 700, seed=4))
    link.provide(logprobs)
    assert torch.equal(link.sample(torch.Generator().manual_seed(5)),
                       sample_tokens(logprobs, torch.Generator().manual_seed(5)))  # fmt: skip
    model = toy_components(seed=3)["model"].to(DEVICE)
    link = PolicyLink(model, fused_sampling=True)
    link.start([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    tokens = link.sample(torch.Generator().manual_seed(0))  # compiles the sampler of the default config
    assert link._logprobs is not None  # the compiled call's distribution is kept for the env's KL term
    link.advance(tokens)
    link.sampling = SamplingConfig(top_k=1)  # greedy: the sampler compiled before the change must not be used
    greedy = link.sample(torch.Generator().manual_seed(0))
    assert torch.equal(greedy, link.outputs().logits.argmax(-1))
    torch.testing.assert_close(link.logprobs(), SamplingConfig(top_k=1).logprobs(link.outputs().logits))


def test_a_sampler_the_backend_cannot_compile_runs_eagerly():
    def failing_backend(graph_module, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    sampler = FusedSampler(SamplingConfig(top_k=5), backend=failing_backend)
    logits = random_logits(4, 700, seed=8)
    with pytest.warns(UserWarning, match="sampling_step could not be compiled"):
        logprobs, tokens = sampler.logprobs_and_tokens(logits, draws(4, 0))
    torch.testing.assert_close(logprobs, SamplingConfig(top_k=5).logprobs(logits))
    assert torch.equal(tokens, sample_tokens(logprobs, torch.Generator().manual_seed(0)))
    assert not sampler._step.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from now on: no second warning
        logprobs_again, _ = sampler.logprobs_and_tokens(logits, draws(4, 1))
    assert torch.equal(logprobs_again, logprobs)
