"""LoRA without weight copies: the policy's frozen base is the env's reference's weights, and the merged save
is built on the host and equals peft's own merge. ``TEXTENV_TEST_DEVICE=cuda`` runs them on a GPU (the GPU
suite's first call), where the save moves device weights to the host one at a time."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from agents.lora_weights import save_merged_lora, shared_weights_copy
from agents.ppo import PPOAgent, PPOConfig
from agents.value_head import PolicyWithValueHead
from textenv.models import load_causal_lm
from textenv.toy import make_toy_env

pytest.importorskip("peft")  # an optional extra; the test extra installs it
DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_lora_policy_shares_the_references_weights_and_leaves_the_reference_as_it_was():
    """``PolicyWithValueHead(env.reference_model, lora_r=4)``: every base weight of the policy is the
    reference's tensor (no copy), the reference gets no adapters and keeps its flags, and after a PPO update
    that moved the policy, the reference's outputs are bit for bit what they were."""
    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4, device=DEVICE)
    reference = env.reference_model
    flags = {name: p.requires_grad for name, p in reference.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]], device=DEVICE)
    before = logits(reference, ids)

    policy = PolicyWithValueHead(reference, lora_r=4, lora_target_modules=["c_attn"])
    storage = {name: p.data_ptr() for name, p in reference.named_parameters()}
    base = {name.replace(".base_layer", ""): p for name, p in policy.lm.get_base_model().named_parameters() if "lora_" not in name}
    assert set(base) == set(storage) and all(p.data_ptr() == storage[name] for name, p in base.items())
    assert not any(p.requires_grad for p in base.values())  # the policy's own flags: its base is frozen
    assert {name: p.requires_grad for name, p in reference.named_parameters()} == flags
    assert not any("lora" in name for name, _ in reference.named_modules())

    agent = PPOAgent(policy, env, PPOConfig(learning_rate=1e-2, minibatch_size=8, micro_batch_size=8))
    assert agent.iteration_step()["approx_kl"] > 0  # the adapters moved the policy
    assert all(p.data_ptr() == storage[name] for name, p in base.items())  # still shared: nothing recast or moved
    assert torch.equal(logits(reference, ids), before)
    assert not torch.allclose(logits(policy.lm, ids), before, atol=1e-4)


def test_a_policy_gradient_agent_trains_a_lora_policy_on_the_references_weights():
    """GRPO (any `PolicyGradientAgent`) takes the same shared-base LoRA policy: it learns, the reference stays."""
    from agents.grpo import GRPOAgent, GRPOConfig

    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4, device=DEVICE)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]], device=DEVICE)
    before = logits(env.reference_model, ids)
    policy = PolicyWithValueHead(env.reference_model, lora_r=4, lora_target_modules=["c_attn"])
    agent = GRPOAgent(policy, env, GRPOConfig(learning_rate=1e-2, samples_per_prompt=4, minibatch_size=8))
    assert agent.iteration_step()["approx_kl"] > 0
    assert torch.equal(logits(env.reference_model, ids), before)
    assert not torch.allclose(logits(policy.lm, ids), before, atol=1e-4)


def test_shared_weights_copy_keeps_ties_and_its_own_flags():
    """The copy's parameters are new objects over the same storage: freezing them leaves the original's flags,
    and weights tied in the original (GPT-2's embedding and LM head) stay tied in the copy."""
    lm = copy.deepcopy(make_toy_env(2).reference_model).requires_grad_(True)
    twin = shared_weights_copy(lm).requires_grad_(False)
    assert all(a.data_ptr() == b.data_ptr() and a is not b for a, b in zip(lm.parameters(), twin.parameters(), strict=True))
    assert all(p.requires_grad for p in lm.parameters())
    assert twin.lm_head.weight is twin.get_input_embeddings().weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_merged_save_equals_peft_merge_and_leaves_the_policy_as_it_was(tmp_path, dtype, monkeypatch):
    """`save_merged_lora` writes what peft's ``merge_and_unload`` of a copy gives, bit for bit (a bf16 base
    included: summed in float32, rounded once), with tied weights still tied; the agent's model keeps its
    adapters, its base weights and its outputs."""
    lm = copy.deepcopy(make_toy_env(2, device=DEVICE).reference_model).to(dtype)
    policy = PolicyWithValueHead(lm, lora_r=4, lora_target_modules=["c_attn", "c_fc"])
    with torch.no_grad():  # peft starts B at zero, which would merge nothing
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator(p.device).manual_seed(len(name)))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]], device=DEVICE)
    base_before = {k: v.clone() for k, v in lm.state_dict().items()}
    out_before = logits(policy.lm, ids)
    expected = copy.deepcopy(policy.lm).merge_and_unload().state_dict()

    from transformers import PreTrainedModel

    handed: list[dict[str, torch.Tensor]] = []  # what save_pretrained is given: host tensors, one per tied matrix
    save_pretrained = PreTrainedModel.save_pretrained
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        lambda self, folder, **kw: (handed.append(dict(kw["state_dict"])), save_pretrained(self, folder, **kw)))  # fmt: skip
    save_merged_lora(policy.lm, tmp_path / "policy")
    assert all(t.device.type == "cpu" for t in handed[0].values())
    assert handed[0]["lm_head.weight"] is handed[0]["transformer.wte.weight"]
    saved = load_causal_lm(tmp_path / "policy", dtype=dtype)
    got = saved.state_dict()
    assert set(got) == set(expected)
    changed = {k for k in expected if not torch.equal(expected[k].cpu(), base_before[k].cpu())}
    assert changed and all("c_attn.weight" in k or "c_fc.weight" in k for k in changed)
    assert all(torch.equal(got[k], expected[k].cpu()) for k in expected)
    assert saved.lm_head.weight.data_ptr() == saved.get_input_embeddings().weight.data_ptr()
    assert all(torch.equal(v, base_before[k]) for k, v in lm.state_dict().items())
    assert hasattr(policy.lm, "peft_config") and torch.equal(logits(policy.lm, ids), out_before)


def test_adapters_it_does_not_merge_itself_go_to_peft(tmp_path):
    """A variant such as DoRA is left to peft's own merge (of a copy): the folder still equals it."""
    from peft import LoraConfig, get_peft_model

    lm = copy.deepcopy(make_toy_env(2).reference_model)
    config = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True, init_lora_weights=False)
    peft_lm = get_peft_model(lm, config)
    with torch.no_grad():  # DoRA starts its magnitudes at the adapted weights' norms, where it merges as LoRA does
        for name, p in peft_lm.named_parameters():
            if "magnitude" in name:
                p.mul_(1.5)
    expected = copy.deepcopy(peft_lm).merge_and_unload().state_dict()
    save_merged_lora(peft_lm, tmp_path / "policy")
    got = load_causal_lm(tmp_path / "policy").state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert hasattr(peft_lm, "peft_config") and "lora_A" in str(peft_lm)


def test_a_lora_checkpoint_holds_what_trains_and_restores_it(tmp_path):
    """A LoRA agent's checkpoint holds the adapters and the value head, not the frozen base (which comes back
    from the LM the agent is built on); restored into a fresh agent on the same reference, the policy gives
    the saved one's outputs. A checkpoint of another policy, or of adapters on another base, is refused,
    naming the weights or the base, before anything loads."""
    from safetensors import safe_open

    from agents import checkpoint

    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4, device=DEVICE)
    config = PPOConfig(learning_rate=1e-2, minibatch_size=8, micro_batch_size=8)

    def lora_agent() -> PPOAgent:
        return PPOAgent(PolicyWithValueHead(env.reference_model, lora_r=4, lora_target_modules=["c_attn"]), env, config)

    trained = lora_agent()
    trained.iteration_step()
    path = checkpoint.save_checkpoint(tmp_path / "run", 1, trained.policy, trained.optimizer, {}, {})
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
    assert saved == {name for name, p in trained.policy.named_parameters() if p.requires_grad}
    assert saved and all("lora_" in name or name.startswith("value_head") for name in saved)

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]], device=DEVICE)
    mask = torch.ones_like(ids)
    fresh = lora_agent()
    assert not torch.equal(fresh.policy(ids, mask)[0], trained.policy(ids, mask)[0])
    checkpoint.load_checkpoint(path, fresh.policy, fresh.optimizer)
    assert all(torch.equal(a, b) for a, b in zip(fresh.policy(ids, mask), trained.policy(ids, mask), strict=True))

    full = PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env, config)
    full_path = checkpoint.save_checkpoint(tmp_path / "full", 1, full.policy, full.optimizer, {}, {})
    with safe_open(str(full_path / "model.safetensors"), "pt") as handle:  # every weight, tied ones once
        assert len(set(handle.keys())) == len(list(full.policy.parameters()))
    head = full.policy.value_head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"has weights the model lacks: \['lm.base_model.model.transformer.h.0.attn"):
        checkpoint.load_checkpoint(path, full.policy, full.optimizer)
    assert torch.equal(full.policy.value_head.weight, head)  # the refused load changed nothing
    wider = PolicyWithValueHead(env.reference_model, lora_r=4, lora_target_modules=["c_attn", "c_fc"])
    with pytest.raises(ValueError, match=r"lacks weights the model has: \['lm.base_model.model.transformer.h.0.mlp.c_fc"):
        checkpoint.load_checkpoint(path, wider, torch.optim.Adam(wider.parameters()))
    checkpoint.load_checkpoint(full_path, full.policy, full.optimizer)  # a full checkpoint loads as before
    rank8 = PolicyWithValueHead(env.reference_model, lora_r=8, lora_target_modules=["c_attn"])
    head = rank8.value_head.weight.detach().clone()
    with pytest.raises(ValueError, match=r"other shapes than the model's .*lora_A.default.weight: \[8, 32\]"):
        checkpoint.load_checkpoint(path, rank8, torch.optim.Adam(rank8.parameters()))
    assert torch.equal(rank8.value_head.weight, head)  # refused before the value head, which fits, was loaded
    tuned = copy.deepcopy(env.reference_model)  # another LM of the same shapes: one weight 1% off
    with torch.no_grad():
        tuned.transformer.h[1].mlp.c_proj.weight.mul_(1.01)
    elsewhere = PolicyWithValueHead(tuned, lora_r=4, lora_target_modules=["c_attn"])
    head = elsewhere.value_head.weight.detach().clone()
    with pytest.raises(ValueError, match="LoRA adapters trained on another base LM than the model's"):
        checkpoint.load_checkpoint(path, elsewhere, torch.optim.Adam(elsewhere.parameters()))
    assert torch.equal(elsewhere.value_head.weight, head)


def test_an_older_lora_checkpoint_with_its_base_loads_without_writing_into_the_reference(tmp_path):
    """Checkpoints from before held the whole LoRA policy, base included. Restoring one loads its adapters
    and value head and leaves the base, which is the env's reference's storage, alone (even where the saved
    base differs)."""
    from safetensors.torch import save_model

    from agents import checkpoint

    env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=2, device=DEVICE)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]], device=DEVICE)
    before = logits(env.reference_model, ids)
    other = PolicyWithValueHead(copy.deepcopy(env.reference_model), lora_r=4, lora_target_modules=["c_attn"])
    with torch.no_grad():  # trained adapters and head, and a base unlike the reference's
        for name, p in other.named_parameters():
            if "value_head" in name or "lora_B" in name or "wte" in name:
                p.add_(0.1)
    optimizer = torch.optim.Adam([p for p in other.parameters() if p.requires_grad])
    path = checkpoint.save_checkpoint(tmp_path, 1, other, optimizer, {}, {})
    save_model(other, str(path / "model.safetensors"))  # the old format: every weight, the (changed) base too

    policy = PolicyWithValueHead(env.reference_model, lora_r=4, lora_target_modules=["c_attn"])
    checkpoint.load_checkpoint(path, policy, torch.optim.Adam([p for p in policy.parameters() if p.requires_grad]))
    assert torch.equal(logits(env.reference_model, ids), before)
    trained = {n: p for n, p in other.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, trained[n]) for n, p in policy.named_parameters() if p.requires_grad)


def test_the_base_fingerprint_follows_the_weights_values_not_their_storage_dtype():
    """bf16 weights held as float32 are the same function and fingerprint alike; float32 weights rounded to bf16
    are not. A tied weight counts once, and a change to any weight changes the digest."""
    from agents.checkpoint import lora_base_fingerprint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50, bias=False))
    model[1].weight = model[0].weight  # tied, as GPT-2's head and embedding
    names = set(model.state_dict())
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert lora_base_fingerprint(bf16, names) == lora_base_fingerprint(copy.deepcopy(bf16).float(), names)
    assert lora_base_fingerprint(model, names) != lora_base_fingerprint(bf16, names)
    assert lora_base_fingerprint(model, names) == lora_base_fingerprint(model, {"0.weight"})  # tied: hashed once
    before = lora_base_fingerprint(model, names)
    with torch.no_grad():
        model[0].weight[-1, -1] += 1e-3  # the last element, which the evenly spaced samples include
    assert lora_base_fingerprint(model, names) != before


def test_the_base_fingerprint_samples_inside_a_weight_of_more_than_2_24_elements():
    """Float32 sample positions round past the end of a weight this long (33,558,528 elements); integer ones reach
    its last element exactly."""
    from agents.checkpoint import lora_base_fingerprint

    model = torch.nn.Linear(2**13, 2**12 + 1, bias=False)
    before = lora_base_fingerprint(model, {"weight"})
    with torch.no_grad():
        model.weight[-1, -1] += 1.0
    assert lora_base_fingerprint(model, {"weight"}) != before
