"""PPO's rollouts under bf16 autocast run on bf16 copies of the policy's matmul weights (`AutocastWeightCopy`),
refreshed once per batch. The copy must give the autocast outputs bit for bit (every decoding, a tied LM head,
LoRA adapters; compiled on a GPU, to bf16's tolerance), follow the weights after each update, hold nothing where
autocast converts nothing, and refuse a model that runs a matmul outside autocast. Two PPO agents, with the copy and without it, must then train alike.

The tests run on the CPU under CPU autocast. ``TEXTENV_TEST_DEVICE=cuda`` runs them on a GPU under CUDA autocast,
with ``compiled`` decoding as CUDA graphs (benchmarks/gpu_suite.sh does).
"""

import functools
import os
from contextlib import nullcontext

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import agents.ppo
from agents.autocast_weight_copy import AutocastWeightCopy
from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from textenv.incremental import IncrementalLM
from textenv.models import build_tiny_causal_lm, tiny_gpt2_config
from textenv.static_decoding import make_decoder
from textenv.toy import make_toy_env, toy_components

DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))
bf16_autocast = functools.partial(torch.autocast, DEVICE.type, dtype=torch.bfloat16)


def tiny_lm(seed: int = 0) -> GPT2LMHeadModel:
    config = tiny_gpt2_config(61, n_positions=64, n_embd=32, n_layer=2, n_head=2)  # GPT-2 ties its LM head
    return build_tiny_causal_lm(config, seed=seed).to(DEVICE).eval()


def decoded_logits(model_or_decoder, decoding: str, steps: int = 6) -> torch.Tensor:
    """Logits and last hidden states of a prefill and ``steps`` decode steps, each forward in its own autocast
    block as a link runs it (a model gets a new decoder; a decoder is reused, with its compiled step)."""
    decoder = model_or_decoder
    if not isinstance(decoder, IncrementalLM):
        decoder = make_decoder(model_or_decoder, decoding, output_hidden_states=True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 61, (n,), generator=g) for n in (5, 3, 7)]
    outputs = []
    with torch.no_grad():
        with bf16_autocast():
            out = decoder.start(prompts, reserve=steps + 1)
        outputs.append(torch.cat([out.logits.float(), out.hidden.float()], -1))
        for _ in range(steps):
            with bf16_autocast():
                out = decoder.step(torch.randint(3, 61, (3,), generator=g).to(DEVICE))
            outputs.append(torch.cat([out.logits.float(), out.hidden.float()], -1))
    return torch.stack(outputs)


def same_as(held: torch.Tensor, converted: torch.Tensor, decoding: str) -> None:
    """Bit for bit, except compiled on a GPU: inductor's kernels may fuse the float32 path's bias conversion into
    the add after it and skip its bf16 rounding (emulate_precision_casts is off), so the two compiled steps may
    differ in the last bits there."""
    if decoding == "compiled" and DEVICE.type == "cuda":
        torch.testing.assert_close(held, converted, atol=1e-2, rtol=1.6e-2)
    else:
        assert torch.equal(held, converted)


@pytest.mark.parametrize("decoding", ["dynamic", "static", "compiled"])
def test_the_copy_gives_the_autocast_outputs_bit_for_bit(decoding):
    model = tiny_lm()
    model.transformer.register_buffer("marker", torch.zeros(3, device=DEVICE))  # (GPT-2 itself has no buffers)
    copy = AutocastWeightCopy(model, bf16_autocast)
    assert copy.active and copy.module is not model
    same_as(decoded_logits(copy.module, decoding), decoded_logits(model, decoding), decoding)
    # Held: the matmul layers' weights and biases in bf16 (the tied LM head too). Shared: everything else.
    copied, own = copy.module.transformer, model.transformer
    assert copied.h[0].attn.c_attn.weight.dtype == copied.h[0].mlp.c_proj.bias.dtype == torch.bfloat16
    assert copy.module.lm_head.weight.dtype == torch.bfloat16
    assert copied.wte.weight is own.wte.weight and copied.ln_f.weight is own.ln_f.weight and copied.marker is own.marker
    assert model.lm_head.weight is own.wte.weight and own.wte.weight.dtype == torch.float32  # the model is untouched
    assert not copy.module.training and all(not held.requires_grad for held, _ in copy._pairs)
    assert all(p.requires_grad for p in model.parameters())  # sharing froze nothing of the model's


@pytest.mark.parametrize("decoding", ["static", "compiled"])
def test_refresh_brings_the_copy_up_to_date_with_the_weights(decoding):
    model = tiny_lm()
    copy = AutocastWeightCopy(model, bf16_autocast)
    decoders = {name: make_decoder(lm, decoding, output_hidden_states=True) for name, lm in (("held", copy.module), ("converted", model))}
    decoded_logits(decoders["held"], decoding)  # compiled (on a GPU: a CUDA graph recorded) before the weights move
    with torch.no_grad():  # an optimizer step, in place
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale, converted = decoded_logits(decoders["held"], decoding), decoded_logits(decoders["converted"], decoding)
    assert not torch.allclose(stale, converted, atol=1e-2, rtol=1.6e-2)
    copy.refresh()
    same_as(decoded_logits(decoders["held"], decoding), converted, decoding)


def test_a_replaced_parameter_is_refused_not_run_stale():
    model = tiny_lm()
    copy = AutocastWeightCopy(model, bf16_autocast)
    model.load_state_dict(tiny_lm(seed=1).state_dict(), assign=True)  # new Parameter objects
    with pytest.raises(RuntimeError, match="parameters were replaced"):
        copy.refresh()


def test_a_lora_policys_copy_gives_the_autocast_outputs_too():
    policy = PolicyWithValueHead(tiny_lm(), lora_r=4)
    with torch.no_grad():  # trained adapters (peft starts B at zero, which would hide them)
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    copy = AutocastWeightCopy(policy.lm, bf16_autocast)
    assert copy.active
    assert {source.dtype for _, source in copy._pairs} == {torch.float32}
    assert torch.equal(decoded_logits(copy.module, "static"), decoded_logits(policy.lm, "static"))


def test_the_check_fits_an_lm_of_five_positions():
    config = tiny_gpt2_config(61, n_positions=5, n_embd=32, n_layer=1, n_head=2)
    assert AutocastWeightCopy(build_tiny_causal_lm(config).to(DEVICE), bf16_autocast).active


def test_no_copy_without_autocast_or_without_a_weight_to_convert():
    model = tiny_lm()
    for autocast, lm in ((nullcontext, model), (bf16_autocast, tiny_lm().to(torch.bfloat16))):
        copy = AutocastWeightCopy(lm, autocast)
        assert copy.module is lm and not copy.active
        copy.refresh()  # nothing to do, and no error


class HeadOutsideAutocast(GPT2LMHeadModel):
    """A model whose LM head runs outside autocast (as a float32 router would): its copy cannot match it."""

    cast_to_weight = True

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               use_cache=use_cache)  # fmt: skip
        with torch.autocast(DEVICE.type, enabled=False):
            dtype = self.lm_head.weight.dtype if self.cast_to_weight else torch.float32
            logits = self.lm_head(out.last_hidden_state.to(dtype))
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)


@pytest.mark.parametrize("cast_to_weight", [True, False], ids=["other logits", "a dtype error"])
def test_a_model_with_a_matmul_outside_autocast_keeps_its_own_weights(cast_to_weight):
    model = HeadOutsideAutocast(tiny_lm().config).to(DEVICE).eval()
    model.cast_to_weight = cast_to_weight
    with pytest.warns(UserWarning, match="outside autocast"):
        copy = AutocastWeightCopy(model, bf16_autocast)
    assert copy.module is model and not copy.active
    assert model.lm_head.weight.dtype == torch.float32


def cpu_or_cuda_bf16_autocast(bf16: bool, device_type: str):
    """PPO's autocast, on the test device (PPO's own autocasts only on CUDA)."""
    return bf16_autocast() if bf16 else nullcontext()


@pytest.mark.parametrize("decoding", ["static", "compiled"])
def test_ppo_rolls_out_alike_with_and_without_the_copy_after_each_update(monkeypatch, decoding):
    """Two agents under bf16 autocast (the CPU's where PPO's own is CUDA's), with the rollout copy and without: the
    same tokens, log-probs, values and rewards in every batch, so the copy follows each update. After each update
    the second agent takes the first one's weights, so that a GPU's nondeterministic backward cannot tell them
    apart."""
    monkeypatch.setattr(agents.ppo, "cuda_bf16_autocast", cpu_or_cuda_bf16_autocast)
    pair = []
    for copy in (True, False):
        env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=6, decoding=decoding, device=DEVICE)
        config = PPOConfig(bf16=True, rollout_weight_copy=copy, decoding=decoding, minibatch_size=4, micro_batch_size=2,
                           learning_rate=1e-3, seed=1)  # fmt: skip
        pair.append(PPOAgent(PolicyWithValueHead(toy_components(seed=3)["model"].to(DEVICE)), env, config))
    with_copy, without = pair
    assert with_copy.rollout_weights.active and not without.rollout_weights.active
    held_at_start = [held.clone() for held, _ in with_copy.rollout_weights._pairs]
    for _ in range(3):
        batches = [agent.rollout() for agent in pair]
        for name in ("actions", "logprobs", "values", "rewards"):
            same_as(getattr(batches[0], name), getattr(batches[1], name), decoding)
        for agent, batch in zip(pair, batches, strict=True):
            agent.update(batch)
        without.policy.load_state_dict(with_copy.policy.state_dict())
    moved = [not torch.equal(before, held) for before, (held, _) in zip(held_at_start, with_copy.rollout_weights._pairs, strict=True)]
    assert all(moved)  # the copy held each update's weights


def test_every_batch_the_env_starts_runs_the_current_weights(monkeypatch):
    """Not only the agent's own rollouts: a loop of the user's over ``agent.env`` after an update runs them too."""
    monkeypatch.setattr(agents.ppo, "cuda_bf16_autocast", cpu_or_cuda_bf16_autocast)
    env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=6, device=DEVICE)
    config = PPOConfig(bf16=True, minibatch_size=4, micro_batch_size=4, learning_rate=1e-3)
    agent = PPOAgent(PolicyWithValueHead(toy_components(seed=3)["model"].to(DEVICE)), env, config)
    agent.update(agent.rollout())
    current = lambda: all(torch.equal(held, source.to(held.dtype)) for held, source in agent.rollout_weights._pairs)  # noqa: E731
    assert not current()  # updated after its batch started
    agent.env.reset()
    assert current()
