"""The two cuts in a compiled step's host work give the plain path's numbers and keep their safety checks.

- `StaticIncrementalLM(guards_once_per_batch=True)` checks dynamo's guards in full once per batch and
  window size, then only those that tell the compiled variants apart: the outputs stay the dynamic cache's,
  the cheap check is really used, what changes between batches (a module attribute, the autocast) is still
  seen, an autocast change within a batch is checked again, and a graph break turns the skipping off.
- `textenv.step_update.step_tensors`, the env step's device work, gives the same tensors compiled as eager,
  and an env with compiled decoding still refuses bad input without changing any row.

The tests run on the CPU; ``TEXTENV_TEST_DEVICE=cuda`` runs them on a GPU (CUDA graphs; gpu_suite.sh).
"""

import contextlib
import functools
import os

import numpy as np
import pytest
import torch

from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce import ReinforceAgent, ReinforceConfig
from agents.value_head import PolicyWithValueHead
from textenv import PolicyLink
from textenv.compile_cache import CompiledOrEager
from textenv.errors import InvalidActionError
from textenv.incremental import IncrementalLM
from textenv.models import build_tiny_causal_lm, tiny_gpt2_config
from textenv.static_decoding import StaticIncrementalLM, can_skip_guards, make_decoder
from textenv.step_update import step_tensors
from textenv.toy import make_toy_env, toy_components

VOCAB = 40
DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))
needs_skip = pytest.mark.skipif(not can_skip_guards(), reason="torch < 2.7 cannot skip guard evaluation")


def tiny_lm(seed: int = 0):
    config = tiny_gpt2_config(VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    return build_tiny_causal_lm(config, seed).to(DEVICE)


def sequences(gen: torch.Generator, n: int) -> list[torch.Tensor]:
    return [torch.randint(3, VOCAB, (int(k),), generator=gen) for k in torch.randint(1, 9, (n,), generator=gen)]


def started_pair(plain: IncrementalLM, seed: int, rows: int, reserve: int = 8):
    """``plain`` and a guards-once compiled decoder of the same model, started on the same random prompts; and
    the generator that drew them, for the tokens to come."""
    compiled = make_decoder(plain.model, "compiled", guards_once_per_batch=True)
    gen = torch.Generator().manual_seed(seed)
    prompts = sequences(gen, rows)
    plain.start(prompts, reserve=reserve), compiled.start(prompts, reserve=reserve)
    return plain, compiled, gen


@pytest.fixture
def skipped_steps(monkeypatch) -> list[bool]:
    """One entry per ``torch.compiler.set_stance`` call that skips guard evaluation."""
    calls: list[bool] = []
    set_stance = torch.compiler.set_stance

    @functools.wraps(set_stance)  # the same signature: `can_skip_guards` reads it
    def recording(*args, **kwargs):
        if kwargs.get("skip_guard_eval_unsafe"):
            calls.append(True)
        return set_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recording)
    return calls


@needs_skip
def test_guards_once_per_batch_keeps_the_numbers_and_skips_most_checks(skipped_steps):
    """Two batches of 70 steps (window 64, then 128) with restarts: every output is the dynamic cache's, and
    all but the first step of each window size per batch (or after a restart) skip the full check."""
    model = tiny_lm()
    dynamic = IncrementalLM(model, output_hidden_states=True)
    compiled = make_decoder(model, "compiled", output_hidden_states=True, guards_once_per_batch=True)
    assert isinstance(compiled, StaticIncrementalLM) and compiled.guards_once_per_batch
    gen = torch.Generator().manual_seed(0)
    full_checks = 0
    for batch in range(2):
        first = sequences(gen, 4)
        torch.testing.assert_close(dynamic.start(first).logits, compiled.start(first, reserve=150).logits)
        windows_seen: set[int | None] = set()
        for t in range(70):
            tokens = torch.randint(3, VOCAB, (4,), generator=gen)
            window = compiled._step_window()
            full_checks += window not in windows_seen
            windows_seen.add(window)
            a, b = dynamic.step(tokens), compiled.step(tokens)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)
            if batch == 1 and t == 30:  # a restart: the next step checks every guard again
                new = sequences(gen, 1)
                torch.testing.assert_close(dynamic.replace_rows([2], new).logits, compiled.replace_rows([2], new).logits)
                windows_seen.clear()
    assert full_checks == 5  # windows 64 and 128 in each batch, and 128 again after the restart
    assert len(skipped_steps) == 140 - full_checks


@needs_skip
def test_a_change_between_batches_is_still_caught():
    """A guarded module attribute changed between two batches, and an autocast that differs from the last
    batch's, change the compiled step's outputs from the next batch on, as they change the eager step's. The
    prompts keep one length, so no new buffer (which would force a recompile anyway) hides a missed change."""
    model = tiny_lm()
    eager = StaticIncrementalLM(model)
    compiled = make_decoder(model, "compiled", guards_once_per_batch=True)
    gen = torch.Generator().manual_seed(1)

    def batch(autocast: bool = False) -> None:
        prompts = [torch.randint(3, VOCAB, (5,), generator=gen) for _ in range(3)]
        eager.start(prompts, reserve=8), compiled.start(prompts, reserve=8)
        for _ in range(4):
            tokens = torch.randint(3, VOCAB, (3,), generator=gen)
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
                a, b = eager.step(tokens), compiled.step(tokens)
            tol = 3e-2 if autocast else 1e-5
            torch.testing.assert_close(a.logits, b.logits, atol=tol, rtol=tol)

    batch()
    capacity = compiled.capacity
    attention = model.transformer.h[0].attn
    attention.scaling *= 3.0  # a Python float the compiled graph baked in
    batch()  # the compiled step sees the new scale, or its logits would be the old ones
    attention.scaling /= 3.0
    batch(autocast=True)
    batch()
    assert compiled.capacity == capacity


@needs_skip
@pytest.mark.parametrize("restore", [False, True])
def test_an_autocast_change_within_a_batch_is_checked_again(skipped_steps, restore):
    """The env's reference steps in whatever autocast surrounds ``env.step``: a change within a batch (and back)
    gets a full check, not a stale variant or a failed recompile, and the cheap check resumes after it."""
    eager, compiled, gen = started_pair(StaticIncrementalLM(tiny_lm()), seed=3, rows=3)
    autocast = [False, False, True, True, True] + ([False, False] if restore else [])
    for t, enabled in enumerate(autocast):
        tokens = torch.randint(3, VOCAB, (3,), generator=gen)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=enabled):
            a, b = eager.step(tokens), compiled.step(tokens)
        tol = 3e-2 if any(autocast[: t + 1]) else 1e-5  # bf16 keys stay in the cache after the autocast ends
        torch.testing.assert_close(a.logits, b.logits, atol=tol, rtol=tol)
    assert len(skipped_steps) == len(autocast) - (3 if restore else 2)  # full checks at each change


@needs_skip
def test_a_graph_break_turns_the_skipping_off():
    """After a graph break the later frames' code is not this decoder's own, so skipped guards could pick another
    decoder's variant: such a decoder warns and checks every guard, with the same numbers."""

    class BreakingHead(torch.nn.Module):
        def __init__(self, head: torch.nn.Module) -> None:
            super().__init__()
            self.head = head

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            torch._dynamo.graph_break()
            return self.head(hidden)

    model = tiny_lm()
    dynamic = IncrementalLM(model)
    compiled = make_decoder(model, "compiled", guards_once_per_batch=True)
    model.lm_head = BreakingHead(model.lm_head)
    gen = torch.Generator().manual_seed(4)
    prompts = sequences(gen, 3)
    dynamic.start(prompts), compiled.start(prompts, reserve=8)
    with pytest.warns(UserWarning, match="cannot be one graph"):
        for _ in range(4):
            tokens = torch.randint(3, VOCAB, (3,), generator=gen)
            torch.testing.assert_close(dynamic.step(tokens).logits, compiled.step(tokens).logits, atol=1e-5, rtol=1e-5)
    assert not compiled.guards_once_per_batch


def test_a_failed_step_appends_nothing():
    """A decode forward that raises in its second block (after the first has written its keys) leaves the decoder
    as it was: the next steps give the dynamic cache's numbers."""
    model = tiny_lm()
    dynamic, static = IncrementalLM(model), StaticIncrementalLM(model)
    gen = torch.Generator().manual_seed(5)
    prompts = sequences(gen, 3)
    dynamic.start(prompts), static.start(prompts, reserve=8)

    def failing(module, args, kwargs):
        raise RuntimeError("out of memory")

    handle = model.transformer.h[1].register_forward_pre_hook(failing, with_kwargs=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        static.step(torch.tensor([4, 5, 6]))
    handle.remove()
    assert static.forward_calls == 1 and static.length == len(max(prompts, key=len))
    for _ in range(3):
        tokens = torch.randint(3, VOCAB, (3,), generator=gen)
        torch.testing.assert_close(dynamic.step(tokens).logits, static.step(tokens).logits, atol=1e-5, rtol=1e-5)


def test_the_flag_is_set_where_batches_run_unchanged():
    """PPO's and the policy-gradient agents' links and the env's frozen reference check guards once per batch;
    a default link (SB3, hand-written loops) checks them at every step."""
    env = make_toy_env(2, autoreset_mode="Disabled", decoding="compiled", device=DEVICE)
    assert env.engine.reference.guards_once_per_batch == can_skip_guards()
    ppo = PPOAgent(PolicyWithValueHead(toy_components(0)["model"].to(DEVICE)), env, PPOConfig(decoding="compiled", minibatch_size=2, micro_batch_size=2))
    assert ppo.link.decoder.guards_once_per_batch == can_skip_guards()
    env = make_toy_env(2, autoreset_mode="Disabled", decoding="compiled", device=DEVICE)
    pg = ReinforceAgent(toy_components(0)["model"].to(DEVICE), env, ReinforceConfig(decoding="compiled", samples_per_prompt=2, minibatch_size=2))
    assert pg.link.decoder.guards_once_per_batch == can_skip_guards()
    assert not PolicyLink(tiny_lm(), decoding="compiled").decoder.guards_once_per_batch
    assert not PolicyLink(tiny_lm(), decoding="static", guards_once_per_batch=True).decoder.guards_once_per_batch


# ------------------------------------------------------------------------------ the env step's device work
@pytest.mark.parametrize(
    ("estimator", "policy", "defer"),  # a deferred batch refuses the full estimator
    [(e, p, False) for e in ("k1", "k3", "full") for p in (True, False)] + [("k1", True, True), ("k1", False, True)],
)
def test_step_tensors_compiled_equals_eager(estimator, policy, defer):
    """Inactive rows, an out-of-range action, a stop token, a full row and (uniform policy) the ``full`` KL."""
    gen = torch.Generator().manual_seed(0)
    B, V, P, T = 5, 11, 3, 4
    step = functools.partial(
        step_tensors, pad_id=0, vocab_size=V, prompt_slots=P, max_new_tokens=T, kl_estimator=estimator
    )  # fmt: skip
    args = (
        torch.tensor([4, 12, 2, 7, -1], device=DEVICE),  # 12 and -1 are outside [0, V)
        torch.tensor([True, True, True, False, True], device=DEVICE),
        torch.randint(0, V, (B, P + T), generator=gen).to(DEVICE),
        torch.randint(0, 2, (B, P + T), generator=gen).to(DEVICE),
        torch.tensor([0, 1, 1, 2, 4], device=DEVICE),  # row 4 is full: nothing is written
        torch.tensor([2], device=DEVICE),  # row 2 takes the stop token
        torch.randn(B, V, generator=gen).log_softmax(-1).to(DEVICE) if policy else None,
        None if defer else torch.randn(B, V, generator=gen).to(DEVICE),
        torch.randn(B, T, generator=gen).to(DEVICE) if defer else None,
    )
    eager = step(*args)
    compiled = torch.compile(step, dynamic=False, fullgraph=True)(*args)
    for name, a, b in zip(eager._fields, eager, compiled, strict=True):
        if a is None:
            assert b is None, name
        else:
            torch.testing.assert_close(a, b, equal_nan=True, msg=name)
    assert eager.actions.tolist() == [4, 0, 2, 0, 0]
    assert eager.report[3].tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]  # the stop token (2 of 4 tokens); the full row
    assert torch.equal(eager.gen_len, torch.tensor([1, 2, 2, 2, 4], device=DEVICE))


@pytest.mark.parametrize("defer_kl", [False, True])
def test_compiled_env_refuses_bad_input_and_changes_nothing(defer_kl):
    """An out-of-range action, and a provided distribution of the wrong shape, raise a clear error; the batch
    then goes on exactly as one that never saw them (observations, rewards, log-probs, KL)."""

    def run(bad: bool) -> list[dict]:
        env = make_toy_env(3, autoreset_mode="Disabled", decoding="compiled", device=DEVICE)
        link = env.bind_policy(PolicyLink(toy_components(1)["model"].to(DEVICE), decoding="compiled"))
        env.reset(seed=0, options={"defer_kl": defer_kl})
        gen = torch.Generator().manual_seed(0)
        records = []
        for t in range(env.engine.max_new_tokens):
            if bad and t == 2:
                engine = env.engine
                before = [x.clone() for x in (engine.ids, engine.mask, engine.gen_len)]
                token_logprob = None if engine._token_logprob is None else engine._token_logprob.clone()
                with pytest.raises(InvalidActionError, match="outside the action space"):
                    env.step(np.array([1, env.single_action_space.n, 2]))
                distribution = link.logprobs()
                link.provide(distribution[:, :-1])  # one column short
                with pytest.raises(ValueError, match="distribution has shape"):
                    env.step(np.array([1, 1, 1]))
                link.provide(distribution)
                assert all(torch.equal(a, b) for a, b in zip(before, (engine.ids, engine.mask, engine.gen_len), strict=True))
                if token_logprob is not None:
                    torch.testing.assert_close(engine._token_logprob, token_logprob, equal_nan=True)
            observation, rewards, terminated, _, info = env.step(link.sample(gen))
            records.append({"ids": observation["input_ids"], "rewards": rewards, "logprob": info["logprob"],
                            **({"kl": info["kl"]} if not defer_kl else {}),
                            **({"token_reward": info["token_reward"]} if "token_reward" in info else {})})  # fmt: skip
            if terminated.all():
                break
        return records

    clean, disturbed = run(bad=False), run(bad=True)
    assert len(clean) == len(disturbed) > 3
    for a, b in zip(clean, disturbed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, equal_nan=True, err_msg=key)


@needs_skip
def test_a_callers_own_compiler_stance_is_kept(skipped_steps):
    """Steps run under ``set_stance("force_eager")`` stay eager and are not counted as checked: after it, the
    compiled step checks its guards again (and compiles) instead of failing on a missing variant."""
    dynamic, compiled, gen = started_pair(IncrementalLM(tiny_lm()), seed=2, rows=3)
    for t in range(6):
        tokens = torch.randint(3, VOCAB, (3,), generator=gen)
        if t < 3:
            with torch.compiler.set_stance("force_eager"):
                a, b = dynamic.step(tokens), compiled.step(tokens)
        else:
            a, b = dynamic.step(tokens), compiled.step(tokens)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert len(skipped_steps) == 2  # steps 4 and 5: step 3 compiled and checked the window


@needs_skip
def test_a_sliding_window_cache_checks_every_guard(skipped_steps):
    """A sliding-window cache layer keeps a Python counter that changes every step, which only the full check
    sees: such a decoder never skips, and keeps the dynamic cache's numbers."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(DEVICE).eval()
    dynamic, compiled, gen = started_pair(IncrementalLM(model), seed=6, rows=2, reserve=24)
    for _ in range(4):  # every step recompiles (the counter is in a guard): few steps
        tokens = torch.randint(3, VOCAB, (2,), generator=gen)
        torch.testing.assert_close(dynamic.step(tokens).logits, compiled.step(tokens).logits, atol=1e-5, rtol=1e-5)
    assert skipped_steps == []


@needs_skip
def test_what_fullgraph_refuses_falls_back_on_every_path(monkeypatch):
    """A graph break after the skipping was turned off (as ``--guards-every-step`` does), and reaching the
    recompile limit, which ``fullgraph`` makes an error: both warn and go on with the usual compile."""
    import textenv.static_decoding as static_decoding

    model = tiny_lm()
    dynamic = IncrementalLM(model)
    gen = torch.Generator().manual_seed(7)

    off = make_decoder(model, "compiled", guards_once_per_batch=True)
    off.guards_once_per_batch = False
    calls = 0

    def breaking(module, args):
        nonlocal calls
        calls += 1
        torch._dynamo.graph_break()

    handle = model.lm_head.register_forward_pre_hook(breaking)
    prompts = sequences(gen, 2)
    dynamic.start(prompts), off.start(prompts, reserve=8)
    with pytest.warns(UserWarning, match="cannot be one graph"):
        tokens = torch.randint(3, VOCAB, (2,), generator=gen)
        torch.testing.assert_close(dynamic.step(tokens).logits, off.step(tokens).logits, atol=1e-5, rtol=1e-5)
    handle.remove()

    monkeypatch.setattr(static_decoding, "RECOMPILE_LIMIT", 2)
    with torch._dynamo.config.patch(recompile_limit=2), pytest.warns(UserWarning, match="FailOnRecompileLimitHit"):
        limited = make_decoder(model, "compiled", guards_once_per_batch=True)
        for length in range(1, 5):  # a new capacity, so a new variant, per batch
            prompts = [torch.randint(3, VOCAB, (length,), generator=gen) for _ in range(2)]
            dynamic.start(prompts), limited.start(prompts, reserve=8)
            tokens = torch.randint(3, VOCAB, (2,), generator=gen)
            torch.testing.assert_close(dynamic.step(tokens).logits, limited.step(tokens).logits, atol=1e-5, rtol=1e-5)
    assert not limited.guards_once_per_batch


@needs_skip
def test_state_no_per_step_check_covers_gets_a_full_check():
    """``inference_mode`` or a ``TorchFunctionMode`` around a step of a batch is not in the global-state check:
    the skipped check refuses it, and the step is checked in full instead of failing."""
    from torch.overrides import TorchFunctionMode

    class Passing(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    eager, compiled, gen = started_pair(StaticIncrementalLM(tiny_lm()), seed=8, rows=2)
    for context in (contextlib.nullcontext, contextlib.nullcontext, torch.inference_mode, Passing, contextlib.nullcontext):
        tokens = torch.randint(3, VOCAB, (2,), generator=gen)
        with context():
            a, b = eager.step(tokens), compiled.step(tokens)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend compiles nothing")


def test_an_env_step_the_backend_cannot_compile_runs_eagerly():
    """If the backend cannot compile the env step's tensor work (a device or version without a kernel for it),
    the env warns once and runs it eagerly, with the numbers of a compiled env that runs it eagerly anyway."""
    records = []
    for failing in (True, False):
        env = make_toy_env(3, autoreset_mode="Disabled", decoding="compiled", device=DEVICE)
        assert isinstance(env.engine._step_tensors, CompiledOrEager)
        env.engine._step_tensors = (
            CompiledOrEager(step_tensors, backend=failing_backend, fullgraph=True) if failing else step_tensors
        )
        link = env.bind_policy(PolicyLink(toy_components(1)["model"].to(DEVICE), decoding="static"))
        env.reset(seed=0)
        gen, steps = torch.Generator().manual_seed(0), []
        for t in range(env.engine.max_new_tokens):
            warned = pytest.warns(UserWarning, match="step_tensors could not be compiled .RuntimeError: this backend")
            with warned if failing and t == 0 else contextlib.nullcontext():
                _, rewards, terminated, _, info = env.step(link.sample(gen))
            steps.append((rewards, info["kl"]))
            if terminated.all():
                break
        records.append(steps)
        if failing:
            assert not env.engine._step_tensors.compiled
    for (rewards_a, kl_a), (rewards_b, kl_b) in zip(*records, strict=True):
        np.testing.assert_allclose(rewards_a, rewards_b, atol=1e-6)
        np.testing.assert_allclose(kl_a, kl_b, atol=1e-6)
