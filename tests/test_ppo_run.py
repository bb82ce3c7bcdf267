"""Run folders: artefacts, and a killed-and-resumed run reproducing an uninterrupted one exactly."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from agents.evaluation import evaluate_policy
from agents.ppo import PPOAgent, PPOConfig
from agents.pretraining_batches import PretrainingBatches
from agents.run import TIMING_KEYS, TrainingRun
from agents.value_head import PolicyWithValueHead
from textenv.kl import AdaptiveKLController
from textenv.toy import TOY_PROMPTS, make_toy_env


def make_run(run_dir, evaluate=False, ptx=False, adaptive_kl=False):
    kl_coef = AdaptiveKLController(0.05, target=0.5, horizon=16) if adaptive_kl else 0.05
    env = make_toy_env(8, autoreset_mode="Disabled", max_new_tokens=4, kl_coef=kl_coef)
    policy = PolicyWithValueHead(copy.deepcopy(env.reference_model))
    config = PPOConfig(learning_rate=1e-3, minibatch_size=4, micro_batch_size=4, total_iterations=4, seed=3,
                       ptx_coef=0.5 if ptx else 0.0)  # fmt: skip
    ptx_batches = None
    if ptx:  # documents of different lengths, so that which ones a batch draws shows in its loss
        documents = [TOY_PROMPTS[i % len(TOY_PROMPTS)] + " good" * i for i in range(12)]
        ptx_batches = PretrainingBatches.from_texts(documents, env.tokenizer, batch_size=3, max_length=24, seed=5)
    agent = PPOAgent(policy, env, config, ptx_batches=ptx_batches)
    fn = None
    if evaluate:
        def fn(lm):
            return evaluate_policy(lm, env.reference_model, env.tokenizer, env.engine.reward_fn, TOY_PROMPTS, 6, 4)
    return TrainingRun(agent, run_dir, checkpoint_every=2, evaluate=fn)


def strip_timing(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics]


def test_run_folder_contents(tmp_path):
    run = make_run(tmp_path / "run", evaluate=True)
    metrics = run.train(4, progress=False)
    root = tmp_path / "run"
    assert len(metrics) == 4 and [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    for name in ("config.json", "metrics.jsonl", "eval_before.json", "eval_after.json", "samples_before.jsonl",
                 "samples_after.jsonl", "plots/score.png", "plots/kl.png", "plots/kl_coef.png", "latest.json",
                 "policy/config.json", "policy/value_head.safetensors"):  # fmt: skip
        assert (root / name).is_file(), name
    assert list(root.glob("tb/events.out.tfevents.*"))
    assert json.loads((root / "latest.json").read_text())["iteration"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(root / "policy")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, run.agent.policy.lm(ids).logits, atol=1e-6)
    with pytest.raises(FileExistsError, match="resume=True"):
        make_run(tmp_path / "run").train(4, progress=False)


@pytest.mark.parametrize("ptx, adaptive_kl", [(False, False), (True, False), (False, True)], ids=["ppo", "ppo-ptx", "adaptive-kl"])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, ptx, adaptive_kl):
    """With PPO-ptx, the pretraining batches' generator is checkpointed too: without it the resumed run would
    draw other documents (its ``ptx_loss`` would differ from the uninterrupted run's). With the adaptive KL
    controller, its β is: a resumed run that started again from the initial β would penalise differently."""
    full = make_run(tmp_path / "full", ptx=ptx, adaptive_kl=adaptive_kl).train(4, progress=False)
    killed = make_run(tmp_path / "killed", ptx=ptx, adaptive_kl=adaptive_kl)
    killed.train(2, progress=False)  # "killed" after the checkpoint at iteration 2
    resumed = make_run(tmp_path / "killed", ptx=ptx, adaptive_kl=adaptive_kl).train(4, resume=True, progress=False)
    assert strip_timing(resumed) == strip_timing(full)
    assert all(m["ptx_loss"] > 0 for m in full) == ptx
    assert (len({m["kl_coef"] for m in full}) > 1) == adaptive_kl  # β moved between iterations


def test_resume_before_the_first_checkpoint_starts_over(tmp_path):
    run = make_run(tmp_path / "early")
    run.metrics_path.parent.mkdir(parents=True)
    run.metrics_path.write_text('{"iteration": 1, "score": 0.0}\n')  # a line from a run killed before checkpointing
    metrics = make_run(tmp_path / "early").train(2, resume=True, progress=False)
    assert [m["iteration"] for m in metrics] == [1, 2]


def agent_and_checkpoint(run_dir, device="cpu", train=False):
    """A small PPO agent on the toy env (after one iteration if ``train``) and a checkpoint of it in ``run_dir``."""
    from agents import checkpoint

    env = make_toy_env(4, autoreset_mode="Disabled", max_new_tokens=2, device=device)
    agent = PPOAgent(PolicyWithValueHead(copy.deepcopy(env.reference_model)), env, PPOConfig(minibatch_size=4, micro_batch_size=4))
    if train:
        agent.iteration_step()
    rng = {"sampling": agent.generator.get_state()}
    return agent, checkpoint.save_checkpoint(run_dir, 1, agent.policy, agent.optimizer, rng, {})


def test_checkpoint_files_reach_the_disk_before_latest_json_names_them(tmp_path, monkeypatch):
    """After a power loss (not only a kill), latest.json must not point at files still in the page cache."""
    import os

    from agents import checkpoint

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    _, path = agent_and_checkpoint(tmp_path)
    names = [os.path.basename(p) for p in synced]
    latest = next(i for i, n in enumerate(names) if n.startswith(".latest.json"))
    files = {p.name for p in path.iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "optimizer.json", "state.json"}
    assert files <= set(names[:latest])  # every file, then its folder, before the pointer
    assert synced[latest - 1] == str(tmp_path) and synced[-1] == str(tmp_path)  # the renames, too


def test_a_restored_optimizer_keeps_adams_step_on_the_cpu(tmp_path):
    """Adam's moments go to the parameters' device, its ``step`` counters stay on the CPU, as a fresh Adam keeps
    them (on a GPU, a ``step`` there would cost a device read per parameter per step). On the CPU it cannot fail
    (there is one device); ``TEXTENV_TEST_DEVICE=cuda`` runs it on a GPU, as `benchmarks/gpu_suite.sh tests` does."""
    import os

    from agents import checkpoint

    agent, path = agent_and_checkpoint(tmp_path, torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu")), train=True)
    checkpoint.load_checkpoint(path, agent.policy, agent.optimizer)
    states = list(agent.optimizer.state.values())
    assert states and all(s["step"].device.type == "cpu" for s in states)
    assert all(s["exp_avg"].device == next(agent.policy.parameters()).device for s in states)
    agent.iteration_step()  # and it trains on
