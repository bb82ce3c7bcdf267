"""The static-cache (and compiled) decode path gives the same numbers as the dynamic cache, restarts included.

The tests run on the CPU. ``TEXTENV_TEST_DEVICE=cuda`` runs them on a GPU instead, where ``compiled`` means
CUDA graphs (benchmarks/gpu_suite.sh does this first): a check of the GPU path's numbers, not only its speed.
"""

import os
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers.cache_utils import StaticLayer

from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from textenv import PolicyLink
from textenv.incremental import IncrementalLM
from textenv.models import build_tiny_causal_lm, tiny_gpt2_config
from textenv.static_decoding import (
    MIN_ATTENTION_WINDOW,
    DtypeStableStaticLayer,
    StaticIncrementalLM,
    attention_window,
    default_compile_mode,
    default_max_window_fraction,
    make_decoder,
)
from textenv.toy import make_toy_env, toy_components

VOCAB = 40
DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))


def tiny_lm(seed: int = 0):
    config = tiny_gpt2_config(VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=2)
    return build_tiny_causal_lm(config, seed).to(DEVICE)


def toy_lm(seed: int):
    return toy_components(seed)["model"].to(DEVICE)


def random_sequences(gen: torch.Generator, n: int, low: int = 1, high: int = 9) -> list[torch.Tensor]:
    lengths = torch.randint(low, high, (n,), generator=gen).tolist()
    return [torch.randint(3, VOCAB, (length,), generator=gen) for length in lengths]


def assert_same(a, b) -> None:
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    if a.hidden is not None or b.hidden is not None:
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)


def drive(
    decoders: list[IncrementalLM], steps: int, seed: int = 0, restart_every: int = 3, reserve: int = 4,
    on_step: Callable[[], None] = lambda: None,
) -> None:  # fmt: skip
    """Start, step and restart rows on every decoder alike; their outputs must agree at every call."""
    gen = torch.Generator().manual_seed(seed)
    B = 4
    first = random_sequences(gen, B)
    outs = [d.start(first, reserve=reserve) for d in decoders]  # a small reserve: the buffer must shift and grow
    for out in outs[1:]:
        assert_same(outs[0], out)
    for t in range(steps):
        tokens = torch.randint(3, VOCAB, (B,), generator=gen)
        outs = [d.step(tokens) for d in decoders]
        on_step()
        for out in outs[1:]:
            assert_same(outs[0], out)
        if t % restart_every == restart_every - 1:
            k = t // restart_every  # round robin, so every row restarts and old columns go dead
            rows = sorted({k % B, (k + 2 * (k % 2)) % B})
            # prompts up to 14 tokens: at times longer than the used part of the cache (a right shift)
            sequences = random_sequences(gen, len(rows), 1, 15)
            outs = [d.replace_rows(rows, sequences) for d in decoders]
            for out in outs[1:]:
                assert_same(outs[0], out)


@pytest.mark.parametrize("hidden", [False, True])
def test_static_cache_matches_dynamic_cache_through_restarts_shifts_and_growth(hidden):
    model = tiny_lm()
    dynamic = IncrementalLM(model, output_hidden_states=hidden)
    static = StaticIncrementalLM(model, output_hidden_states=hidden)
    drive([dynamic, static], steps=40)
    assert static.compactions > 0, "the buffer never filled: the shift was not exercised"
    assert static.capacity > 4 + 8, "the buffer never grew"
    assert static.forward_calls == dynamic.forward_calls


def test_static_cache_is_reused_across_starts():
    """A new batch of the same shape writes into the same buffers (a compiled step then never recompiles)."""
    static = StaticIncrementalLM(tiny_lm())
    gen = torch.Generator().manual_seed(1)
    static.start([torch.randint(3, VOCAB, (n,), generator=gen) for n in (8, 3, 5)], reserve=8)
    cache = static.cache
    dynamic = IncrementalLM(static.model)
    second = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (2, 7, 4)]
    assert_same(dynamic.start(second), static.start(second, reserve=8))
    assert static.cache is cache
    tokens = torch.tensor([5, 6, 7])
    assert_same(dynamic.step(tokens), static.step(tokens))


def test_compiled_decode_step_matches_dynamic_cache():
    """``torch.compile`` of the decode forward (inductor on CPU, CUDA graphs on CUDA) gives the eager numbers."""
    model = tiny_lm()
    dynamic = IncrementalLM(model, output_hidden_states=True)
    compiled = make_decoder(model, "compiled", output_hidden_states=True)
    assert isinstance(compiled, StaticIncrementalLM) and compiled.compile_mode == default_compile_mode(DEVICE)
    drive([dynamic, compiled], steps=12, restart_every=5)


def test_attention_window_sizes():
    """One size per doubling, never below the minimum, never past the buffer, always covering the used columns."""
    sizes = [attention_window(columns, 10_000) for columns in range(1, 1_100)]
    assert sorted(set(sizes)) == [64, 128, 256, 512, 1024, 2048]
    for columns, size in enumerate(sizes, start=1):
        assert size >= max(columns, MIN_ATTENTION_WINDOW) and (size == MIN_ATTENTION_WINDOW or size < 2 * columns)
    assert attention_window(150, capacity=130) == 130 and attention_window(128, capacity=130) == 128
    # with max_fraction 0.5 (the CPU's default), a window must at least halve the columns, else all are read
    assert attention_window(100, capacity=256, max_fraction=0.5) == 128
    assert attention_window(100, capacity=200, max_fraction=0.5) == 200
    assert default_max_window_fraction(torch.device("cuda")) == 1.0
    assert default_max_window_fraction(torch.device("cpu")) == 0.5


@pytest.mark.parametrize(
    ("compile", "max_fraction", "sizes"),
    [(False, 1.0, {64, 128, "capacity"}), (False, 0.5, {64, "capacity"}), (True, 1.0, {64, 128})],
)
def test_windowed_attention_matches_the_whole_buffer_and_the_dynamic_cache(compile, max_fraction, sizes, monkeypatch):
    """A step that attends to a prefix window of the buffer gives the numbers of one that reads all of it (and of
    the dynamic cache), as the used columns cross window sizes, with restarts and right shifts on the way; the
    keys and the mask the attention gets are the window's (the padding mask alone would hide a wider read)."""
    model = tiny_lm()
    dynamic = IncrementalLM(model, output_hidden_states=True)
    whole = StaticIncrementalLM(model, output_hidden_states=True, windowed=False)
    windowed = StaticIncrementalLM(model, output_hidden_states=True, compile=compile, max_window_fraction=max_fraction)
    key_widths: dict[int, int] = {}  # layer id -> columns of keys its last `update` returned (eager only)
    if not compile:
        update = DtypeStableStaticLayer.update

        def recording_update(layer, *args, **kwargs):
            keys, values = update(layer, *args, **kwargs)
            key_widths[id(layer)] = keys.shape[-2]
            return keys, values

        monkeypatch.setattr(DtypeStableStaticLayer, "update", recording_update)
    mask_widths: list[int] = []
    decode = windowed._decode
    windowed._decode = lambda ids, mask, positions: (mask_widths.append(mask.shape[1]), decode(ids, mask, positions))[1]
    windows: list[int | str] = []

    def record() -> None:
        assert whole.cache is not None and windowed.cache is not None
        assert {layer.window for layer in whole.cache.layers} == {None}
        (window,) = {layer.window for layer in windowed.cache.layers}  # one window for every layer
        width = windowed.capacity if window is None else window
        assert windowed.length <= width  # the new token's column too
        assert mask_widths[-1] == width
        if not compile:
            assert [key_widths[id(layer)] for layer in windowed.cache.layers] == [width] * len(windowed.cache.layers)
        windows.append("capacity" if window is None else window)

    steps = 140 if not compile else 70  # compiled: two window sizes (one compiled variant each), not three
    drive([dynamic, whole, windowed], steps=steps, restart_every=7, reserve=150, on_step=record)
    assert set(windows) == sizes
    assert whole.compactions == windowed.compactions == 0  # the large reserve: nothing to shift out


def test_windowed_attention_through_shifts_and_growth():
    """With a window narrower than the buffer, compaction and growth keep the dynamic cache's numbers."""
    model = tiny_lm()
    dynamic = IncrementalLM(model, output_hidden_states=True)
    windowed = StaticIncrementalLM(model, output_hidden_states=True, max_window_fraction=1.0)
    seen: list[tuple[int | None, int]] = []

    def record() -> None:
        assert windowed.cache is not None
        seen.append((windowed.cache.layers[0].window, windowed.capacity))

    drive([dynamic, windowed], steps=200, restart_every=30, reserve=60, on_step=record)
    assert windowed.compactions > 0, "the buffer never filled: the shift was not exercised"
    assert any(window is not None and window < capacity for window, capacity in seen)
    assert len({capacity for _, capacity in seen}) > 1, "the buffer never grew"


def test_other_layer_types_are_not_windowed():
    """A cache with a layer that is not a `DtypeStableStaticLayer` (a sliding-window layer, say) reads whole."""
    model = tiny_lm()
    dynamic, static = IncrementalLM(model), StaticIncrementalLM(model, max_window_fraction=1.0)
    gen = torch.Generator().manual_seed(3)
    prompts = random_sequences(gen, 3)
    assert_same(dynamic.start(prompts), static.start(prompts, reserve=100))
    assert static.cache is not None
    static.cache.layers[1].__class__ = StaticLayer  # as a model with another layer type would have
    for _ in range(4):
        tokens = torch.randint(3, VOCAB, (3,), generator=gen)
        assert_same(dynamic.step(tokens), static.step(tokens))
        assert static.cache.layers[0].window is None


def test_max_window_fraction_is_checked():
    with pytest.raises(ValueError, match="max_window_fraction"):
        StaticIncrementalLM(tiny_lm(), max_window_fraction=1.5)
    assert attention_window(100, capacity=200, max_fraction=2.0) == 128  # a fraction past 1 counts as 1


def test_prefill_after_windowed_steps_reads_the_whole_buffer():
    """A new batch in a reused buffer is prefilled with no window left over from the last step."""
    model = tiny_lm()
    # the window of 64 after three steps, whatever this device's default
    dynamic, static = IncrementalLM(model), StaticIncrementalLM(model, max_window_fraction=1.0)
    gen = torch.Generator().manual_seed(2)
    first = random_sequences(gen, 3)
    dynamic.start(first), static.start(first, reserve=120)
    for _ in range(3):
        tokens = torch.randint(3, VOCAB, (3,), generator=gen)
        assert_same(dynamic.step(tokens), static.step(tokens))
    assert static.cache is not None and static.cache.layers[0].window == MIN_ATTENTION_WINDOW < static.capacity
    cache, capacity = static.cache, static.capacity
    second = random_sequences(gen, 3, low=MIN_ATTENTION_WINDOW + 2, high=MIN_ATTENTION_WINDOW + 9)
    assert_same(dynamic.start(second), static.start(second, reserve=capacity - MIN_ATTENTION_WINDOW - 9))
    assert static.cache is cache  # the same buffers, whose layers held a window shorter than the new prompts
    tokens = torch.randint(3, VOCAB, (3,), generator=gen)
    assert_same(dynamic.step(tokens), static.step(tokens))


def run_env(decoding: str, steps: int = 40) -> list[dict]:
    venv = make_toy_env(4, stop_tokens=("good",), decoding=decoding, device=DEVICE)
    # The same sampler on both sides (on CUDA a compiled link fuses sampling by default, which may round a token
    # boundary differently; tests/test_fused_sampling.py compares the two): this test is about the decoding.
    link = venv.bind_policy(PolicyLink(toy_lm(3), decoding=decoding, fused_sampling=False))
    venv.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    good = venv.tokenizer.convert_tokens_to_ids("good")
    records = []
    for _ in range(steps):
        tokens = link.sample(gen)
        tokens[(torch.rand(4, generator=gen) < 0.15).to(tokens.device)] = good  # rows end at different times: NextStep resets
        _, rewards, terminated, _, info = venv.step(tokens)
        records.append(
            {"rewards": rewards, "terminated": terminated, **{k: info[k] for k in ("logprob", "kl")}}
        )
    return records


@pytest.mark.parametrize("decoding", ["static", "compiled"])
def test_vector_env_decoding_matches_dynamic_with_autoreset(decoding):
    """Policy and reference decode side by side (compiled: two compiled decoders alternating)."""
    dynamic, static = run_env("dynamic"), run_env(decoding)
    assert any(r["terminated"].any() for r in dynamic)
    for a, b in zip(dynamic, static, strict=True):
        np.testing.assert_array_equal(a["terminated"], b["terminated"])
        for key in ("rewards", "logprob", "kl"):
            np.testing.assert_allclose(a[key], b[key], atol=1e-4, equal_nan=True)


def test_ppo_rollout_is_the_same_with_static_decoding():
    batches = []
    for decoding in ("dynamic", "static"):
        venv = make_toy_env(4, autoreset_mode="Disabled", decoding=decoding, device=DEVICE)
        agent = PPOAgent(
            PolicyWithValueHead(toy_lm(5)),
            venv,
            PPOConfig(decoding=decoding, minibatch_size=4, micro_batch_size=4),
        )
        batches.append(agent.rollout())
    a, b = batches
    assert torch.equal(a.actions, b.actions)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.rewards, b.rewards, atol=1e-5, rtol=0)


def test_unknown_decoding_is_rejected_by_name():
    with pytest.raises(ValueError, match="decoding must be one of"):
        make_toy_env(2, decoding="fast")
    with pytest.raises(ValueError, match="decoding must be one of"):
        PolicyLink(tiny_lm(), decoding="fast")


@pytest.mark.parametrize("reserve", [6, 100])  # 100: a window of 64 columns in a buffer of ~108
@pytest.mark.parametrize("autocast_at", ["step", "start"])
def test_static_cache_across_a_change_of_autocast(autocast_at, reserve):
    """Episodes start outside the agent's autocast and step inside it (PPO with ``bf16``), or the other way:
    the static buffers, allocated at prefill, must take the other dtype as the dynamic cache does."""
    model = tiny_lm()
    dynamic, static = IncrementalLM(model), StaticIncrementalLM(model, max_window_fraction=1.0)
    gen = torch.Generator().manual_seed(0)
    prompts = random_sequences(gen, 3)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast_at == "start"):
        dynamic.start(prompts), static.start(prompts, reserve=reserve)
    for _ in range(5):
        tokens = torch.randint(3, VOCAB, (3,), generator=gen)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast_at == "step"):
            a, b = dynamic.step(tokens), static.step(tokens)
        torch.testing.assert_close(a.logits, b.logits, atol=3e-2, rtol=3e-2)
    assert static.cache is not None
    assert static.cache.layers[0].window == (None if reserve == 6 else MIN_ATTENTION_WINDOW)


def test_restart_with_a_long_prompt_when_the_buffer_is_full_and_partly_dead():
    """Compacting shortens the used part before the right shift: the long prompt must still fit exactly."""
    model = tiny_lm()
    dynamic, static = IncrementalLM(model), StaticIncrementalLM(model)
    one = [torch.tensor([5]), torch.tensor([6])]
    assert_same(dynamic.start(one), static.start(one, reserve=3))  # capacity 4
    for token in (7, 8):
        assert_same(dynamic.step(torch.tensor([token, token])), static.step(torch.tensor([token, token])))
    for row in (0, 1):  # both rows restart: columns 0 and 1 go dead
        assert_same(dynamic.replace_rows([row], [torch.tensor([9])]), static.replace_rows([row], [torch.tensor([9])]))
    long = [torch.tensor([10, 11, 12, 13, 14])]  # longer than the whole buffer
    assert_same(dynamic.replace_rows([0], long), static.replace_rows([0], long))
    assert static.compactions == 1 and static.capacity >= 5
    for token in (15, 16, 17):
        assert_same(dynamic.step(torch.tensor([token, token])), static.step(torch.tensor([token, token])))
