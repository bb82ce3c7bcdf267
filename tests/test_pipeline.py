"""The main job, end to end on a tiny budget: run folder, summary, resume, and bad configurations."""

import json
import os
import re
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors import safe_open

from agents.pipeline import RLHFConfig, check_same_run, run_rlhf
from agents.run import TIMING_KEYS
from textenv.cli import main
from textenv.models import load_causal_lm

# ``TEXTENV_TEST_DEVICE=cuda`` runs the reverse-task main job on a GPU, in bf16 (benchmarks/gpu_suite.sh does).
DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))

TINY = dict(
    iterations=2, num_envs=8, eval_prompts=16, checkpoint_every=1,
    stage_budget={"n_prompts": 60, "k": 2, "rm_steps": 20, "pretrain": {"n_docs": 400, "n_heldout": 50, "steps": 30}},
    ppo={"minibatch_size": 4, "micro_batch_size": 4, "ppo_epochs": 1},
)  # fmt: skip


def saved_dtypes(folder):
    """The dtypes of the tensors in a model folder's safetensors file (``{"F32"}``, ``{"BF16"}``...)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return {weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118 (no __iter__)


def untimed(metrics_path):
    """A run's metrics lines without their timings."""
    lines = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in lines]


def test_main_job_tiny_budget_and_resume(tmp_path):
    cfg = RLHFConfig(run_dir=str(tmp_path / "run"), **TINY)
    summary = run_rlhf(cfg, progress=False)
    root = tmp_path / "run"
    for name in ("summary.json", "rlhf_config.json", "models/lm/config.json", "models/rm/config.json",
                 "models/preferences.jsonl", "models/build.json", "ppo/metrics.jsonl", "ppo/policy/config.json",
                 "ppo/eval_before.json", "ppo/eval_after.json", "ppo/plots/gold.png"):  # fmt: skip
        assert (root / name).is_file(), name
    saved = json.loads((root / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("gold", "score", "kl", "perplexity", "distinct_1", "distinct_2"):
        assert key in saved["before"] and key in saved["after"]
    assert {"gold_improvement_in_std", "kl_within_bound", "gold_improved_by_1_std"} <= set(saved)
    with pytest.raises(FileExistsError, match="resume"):
        run_rlhf(cfg, progress=False)
    # Resuming a finished run reuses every artefact and changes nothing.
    metrics = (root / "ppo" / "metrics.jsonl").read_text()
    run_rlhf(cfg, resume=True, progress=False)
    assert (root / "ppo" / "metrics.jsonl").read_text() == metrics
    # Resuming with other settings would mix two runs' artefacts: refused, naming what changed.
    other = RLHFConfig(run_dir=str(tmp_path / "run"), **{**TINY, "seed": 1, "num_envs": 4})
    with pytest.raises(ValueError, match=r"num_envs: 8 -> 4, seed: 0 -> 1"):
        run_rlhf(other, resume=True, progress=False)
    # A folder started before RLHFConfig had a field (its rlhf_config.json lacks it) ran with the field's default:
    # it resumes with the default, and only a value other than the default is a change.
    saved = json.loads((root / "rlhf_config.json").read_text())
    (root / "rlhf_config.json").write_text(json.dumps({k: v for k, v in saved.items() if not k.startswith("lora")}))
    run_rlhf(cfg, resume=True, progress=False)
    (root / "rlhf_config.json").write_text(json.dumps({k: v for k, v in saved.items() if not k.startswith("lora")}))
    with pytest.raises(ValueError, match=r"lora_r: 0 -> 4"):
        run_rlhf(RLHFConfig(**{**asdict(cfg), "lora_r": 4}), resume=True, progress=False)
    # Killed in stage 3 before its first checkpoint (no latest.json yet, but metrics lines): resuming starts
    # PPO over instead of refusing the folder.
    untimed_before = untimed(root / "ppo" / "metrics.jsonl")
    (root / "ppo" / "latest.json").unlink()
    for checkpoint in (root / "ppo").glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    run_rlhf(cfg, resume=True, progress=False)
    assert untimed(root / "ppo" / "metrics.jsonl") == untimed_before  # the same iterations, run again
    # Starting from a user's LM folder and preference file: no pretraining, no simulated labels.
    lm, prefs = root / "models" / "lm", root / "models" / "preferences.jsonl"
    own = RLHFConfig(run_dir=str(tmp_path / "own"), lm=str(lm), preferences=str(prefs), **TINY)
    run_rlhf(own, progress=False)
    build = json.loads((tmp_path / "own" / "models" / "build.json").read_text())
    assert build["lm"] == str(lm) and not (tmp_path / "own" / "models" / "lm").exists()
    assert (tmp_path / "own" / "models" / "preferences.jsonl").read_text() == prefs.read_text()
    # A run may move to another device when resumed (the same computation, to float tolerance): a folder
    # started on a GPU resumes on the CPU; other changes are refused as before.
    saved = json.loads((root / "rlhf_config.json").read_text())
    (root / "rlhf_config.json").write_text(json.dumps({**saved, "device": "cuda:1"}))
    check_same_run(cfg, root)
    with pytest.raises(ValueError, match=r"bf16: True -> False"):
        (root / "rlhf_config.json").write_text(json.dumps({**saved, "device": "cuda", "bf16": True}))
        check_same_run(cfg, root)


def test_bad_main_job_configs(tmp_path, capsys):
    with pytest.raises(ValueError, match="Unknown task|unknown task|valid"):
        run_rlhf(RLHFConfig(task="nope", run_dir=str(tmp_path / "a")), progress=False)
    with pytest.raises(ValueError, match="TaskBudget fields"):
        run_rlhf(RLHFConfig(run_dir=str(tmp_path / "b"), stage_budget={"n_prompt": 3}), progress=False)
    with pytest.raises(ValueError, match="--rm needs --lm"):
        run_rlhf(RLHFConfig(run_dir=str(tmp_path / "c"), rm="some/rm"), progress=False)
    with pytest.raises(ValueError, match="decoding must be one of"):
        run_rlhf(RLHFConfig(run_dir=str(tmp_path / "d"), decoding="fast"), progress=False)
    assert not (tmp_path / "d").exists()  # refused before anything was written
    # The command line passes --decoding through to the same check (exit code 2, the message on stderr).
    assert main(["rlhf", "--run-dir", str(tmp_path / "e"), "--decoding", "fast"]) == 2
    assert not (tmp_path / "e").exists()
    # A batch smaller than PPO's minibatch is refused before stages 1-2 spend their minutes.
    with pytest.raises(ValueError, match="num_envs 8 is smaller than ppo.minibatch_size 16"):
        run_rlhf(RLHFConfig(run_dir=str(tmp_path / "g"), num_envs=8), progress=False)
    assert not (tmp_path / "g").exists()
    # A device this machine cannot run, or bf16 off CUDA, is refused before stages 1-2, with what to do instead.
    bad_devices = [({"device": "gpu0"}, "'gpu0' is not a torch device"), ({"device": "meta"}, "textenv runs on cpu or cuda"),
                   ({"bf16": True}, "bf16 needs a CUDA device"), ({"ppo": {"bf16": True}}, "set bf16 as RLHFConfig.bf16"),
                   ({"ppo": {"defer_kl": True}}, "set defer_kl as RLHFConfig.defer_kl")]
    if not torch.cuda.is_available():
        bad_devices.append(({"device": "cuda"}, "CUDA is not available to this torch"))
    for fields, message in bad_devices:
        with pytest.raises(ValueError, match=message):
            run_rlhf(RLHFConfig(run_dir=str(tmp_path / "h"), **fields), progress=False)
        assert not (tmp_path / "h").exists()
    assert main(["rlhf", "--run-dir", str(tmp_path / "h"), "--bf16"]) == 2
    assert not (tmp_path / "h").exists()
    # A config file's bf16 must be a boolean ("false" is truthy), and --no-bf16 overrides the file's true.
    config = tmp_path / "bf16.json"
    for value, message in (('"false"', "bf16 must be true or false"), ("true", "bf16 needs a CUDA device")):
        config.write_text(f'{{"bf16": {value}, "num_envs": 8}}')
        assert main(["rlhf", "--run-dir", str(tmp_path / "h"), "--config", str(config)]) == 2
        assert message in capsys.readouterr().err
    assert main(["rlhf", "--run-dir", str(tmp_path / "h"), "--config", str(config), "--no-bf16"]) == 2
    assert "num_envs 8 is smaller than ppo.minibatch_size" in capsys.readouterr().err  # past the bf16 check
    # So must its defer_kl, which --defer-kl / --no-defer-kl override.
    config.write_text('{"defer_kl": "false", "num_envs": 8}')
    assert main(["rlhf", "--run-dir", str(tmp_path / "h"), "--config", str(config)]) == 2
    assert "defer_kl must be true or false" in capsys.readouterr().err
    assert main(["rlhf", "--run-dir", str(tmp_path / "h"), "--config", str(config), "--defer-kl"]) == 2
    assert "num_envs 8 is smaller than ppo.minibatch_size" in capsys.readouterr().err  # past the defer_kl check
    assert not (tmp_path / "h").exists()
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    assert main(["rlhf", "--run-dir", str(tmp_path / "f")]) == 2  # a non-empty folder: an error line, no traceback
    assert (tmp_path / "f" / "notes.txt").read_text() == "mine"


def test_rlhf_help_names_rlhf_configs_defaults(capsys):
    """The flags default to None (a config file may set them), so their help texts state RLHFConfig's defaults."""
    with pytest.raises(SystemExit):
        main(["rlhf", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = RLHFConfig()
    for flag, value in (("--seed", defaults.seed), ("--iterations", defaults.iterations), ("--num-envs", defaults.num_envs),
                        ("--task", defaults.task), ("--run-dir", defaults.run_dir), ("--decoding", defaults.decoding),
                        ("--lora-r", defaults.lora_r), ("--device", defaults.device)):  # fmt: skip
        after = text.split(flag, 2)[-1].split(" --", 1)[0]  # the flag's entry in the options list
        assert re.search(rf"default:? {re.escape(str(value))}\b", after), (flag, after)


def test_main_job_on_a_task_with_a_programmatic_reward(tmp_path):
    """Reverse has a verifiable reward: no stage 2, PPO trains on the task's own reward (static KV caches, the
    deferred KL). On ``TEXTENV_TEST_DEVICE`` (every stage there; on CUDA with ``bf16``)."""
    budget = {"pretrain": {"n_docs": 400, "n_heldout": 50, "steps": 30}}
    cfg = RLHFConfig(task="reverse", run_dir=str(tmp_path / "rev"), decoding="static", defer_kl=True, device=str(DEVICE),
                     bf16=DEVICE.type == "cuda", **{**TINY, "stage_budget": budget})  # fmt: skip
    summary = run_rlhf(cfg, progress=False)
    assert json.loads((tmp_path / "rev" / "rlhf_config.json").read_text())["decoding"] == "static"
    ppo_config = json.loads((tmp_path / "rev" / "ppo" / "config.json").read_text())["config"]
    assert ppo_config["decoding"] == "static" and ppo_config["defer_kl"] is True
    assert not (tmp_path / "rev" / "models" / "rm").exists()
    assert summary["before"]["score"] == summary["before"]["gold"]  # the reward is the gold reward itself
    assert saved_dtypes(tmp_path / "rev" / "ppo" / "policy") == {"F32"}  # bf16 is autocast, not the weights
    metrics = [json.loads(line) for line in (tmp_path / "rev" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite([m["policy_loss"], m["value_loss"], m["kl"], m["score"]]).all() for m in metrics)


def test_main_job_from_a_bf16_lm_folder_on_the_test_device(tmp_path):
    """A user's LM folder saved in bf16, as most hub checkpoints are (transformers loads it as bf16): stage 2
    samples from it and trains the RM from its trunk, and PPO trains the policy, all in float32 weights, in
    which AdamW's small updates are not rounded away. On ``TEXTENV_TEST_DEVICE`` (every stage there; on CUDA
    with ``bf16``: autocast, with the frozen reference and RM in bf16)."""
    from textenv.pretraining import pretrain_task_lm
    from textenv.tasks import get_task

    lm = tmp_path / "lm_bf16"
    pretrain_task_lm(get_task("sentiment"), steps=30, n_docs=400, n_heldout=50, out_dir=lm, progress=False)
    load_causal_lm(lm).to(torch.bfloat16).save_pretrained(lm)
    assert saved_dtypes(lm) == {"BF16"}
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats(DEVICE)
    cfg = RLHFConfig(run_dir=str(tmp_path / "run"), lm=str(lm), decoding="static", device=str(DEVICE),
                     bf16=DEVICE.type == "cuda", **TINY)  # fmt: skip
    summary = run_rlhf(cfg, progress=False)
    root = tmp_path / "run"
    assert json.loads((root / "models" / "build.json").read_text())["lm"] == str(lm)
    assert saved_dtypes(root / "models" / "rm") == {"F32"}
    assert saved_dtypes(root / "ppo" / "policy") == {"F32"}  # bf16 is autocast, not the weights
    metrics = [json.loads(line) for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite([m["policy_loss"], m["value_loss"], m["kl"], m["score"]]).all() for m in metrics)
    assert np.isfinite([summary["after"]["gold"], summary["after"]["score"], summary["after"]["kl"]]).all()
    if DEVICE.type == "cuda":  # the models ran there: a 2-layer policy, its reference and RM, and Adam's moments
        assert torch.cuda.max_memory_allocated(DEVICE) > 2**20


def test_main_job_with_lora_saves_the_merged_policy_and_its_adapters(tmp_path, monkeypatch):
    """``lora_r``: PPO trains adapters only, on a base that is the env's reference's weights (the LM is held
    once); ``ppo/policy/`` is a plain LM with them merged in, equal to the base LM plus the saved
    ``ppo/policy_adapter/``; a LoRA run resumes from its checkpoint."""
    from peft import PeftModel

    from agents import pipeline
    from agents.ppo import PPOAgent as pipeline_agent
    from textenv.models import load_causal_lm

    agents = []
    monkeypatch.setattr(pipeline, "PPOAgent", lambda *a, **kw: agents.append(pipeline_agent(*a, **kw)) or agents[-1])

    budget = {"pretrain": {"n_docs": 400, "n_heldout": 50, "steps": 30}}
    ppo = {**TINY["ppo"], "learning_rate": 1e-2}
    settings = {**TINY, "iterations": 1, "stage_budget": budget, "ppo": ppo}
    cfg = RLHFConfig(task="reverse", run_dir=str(tmp_path / "lora"), lora_r=4, lora_target_modules=["c_attn"], **settings)
    run_rlhf(cfg, progress=False)
    run_rlhf(RLHFConfig(**{**asdict(cfg), "iterations": 2}), resume=True, progress=False)  # from checkpoint 1
    assert len(agents) == 2
    for agent in agents:
        shared = {p.data_ptr() for p in agent.env.reference_model.parameters()}
        assert all(p.data_ptr() in shared for n, p in agent.policy.lm.named_parameters() if "lora_" not in n)
    root = tmp_path / "lora"
    assert [json.loads(line)["iteration"] for line in (root / "ppo" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    base, merged = load_causal_lm(root / "models" / "lm"), load_causal_lm(root / "ppo" / "policy")
    base_weights, merged_weights = base.state_dict(), merged.state_dict()
    assert set(base_weights) == set(merged_weights)  # a plain LM folder: no peft keys
    changed = {k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])}
    assert changed and all("c_attn.weight" in k for k in changed)  # only the adapted modules moved
    reloaded = PeftModel.from_pretrained(load_causal_lm(root / "models" / "lm"), root / "ppo" / "policy_adapter")
    reloaded = reloaded.merge_and_unload().state_dict()
    assert all(torch.allclose(reloaded[k], merged_weights[k], atol=1e-6) for k in changed)
    # A negative rank is refused before the run folder is made, from Python and from the command line.
    with pytest.raises(ValueError, match="lora_r must be >= 0"):
        run_rlhf(RLHFConfig(run_dir=str(tmp_path / "neg"), lora_r=-1), progress=False)
    assert main(["rlhf", "--run-dir", str(tmp_path / "neg"), "--lora-r", "-1"]) == 2
    assert not (tmp_path / "neg").exists()


def test_evaluate_command(tmp_path, sentiment_models, capsys):
    """``textenv evaluate``: the task's pretrained LM against itself (KL 0, to rounding) on the task's RM, on
    ``--device``; a device this machine lacks is an error line before any model loads."""
    lm_dir, _ = sentiment_models
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--task", "sentiment", "--policy", str(lm_dir), "--prompts", "8", "--device", str(DEVICE),
                 "--out", str(out)]) == 0  # fmt: skip
    saved = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == saved["metrics"]
    # KL 0 to rounding: the policy and the reference are two copies of one LM, run by two decoders.
    assert len(saved["samples"]) == 8 and all(abs(s["kl"]) < 1e-4 for s in saved["samples"])
    assert abs(saved["metrics"]["kl"]) < 1e-4 and np.isfinite([saved["metrics"]["gold"], saved["metrics"]["score"]]).all()
    assert main(["evaluate", "--task", "sentiment", "--policy", str(lm_dir), "--device", "gpu0"]) == 2
    assert "'gpu0' is not a torch device" in capsys.readouterr().err
