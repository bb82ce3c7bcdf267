"""The benchmark scripts run end to end on the tiny shape (their figures are measured by hand, not here)."""

import math
import os
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from benchmarks import (
    autocast_weights,
    components,
    lora_memory,
    ppo_vs_trl,
    profile_rollout,
    rollout,
    scaling,
    update_memory,
)
from benchmarks.common import apply_agent_options, build, random_prompts
from benchmarks.live_memory import LiveTensorPeak, resident_bytes


@pytest.mark.parametrize(
    "decoding, extra",
    [("dynamic", []), ("static", []), ("static", ["--defer-kl"]), ("static", ["--defer-kl", "--no-prefetch"])],
)
def test_rollout_benchmark_prints_a_ratio(decoding, extra, capsys):
    result = rollout.main(["--batch", "4", "--prompt", "4", "--new", "6", "--repeats", "1", "--decoding", decoding, *extra])
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    out = capsys.readouterr().out
    assert "ratio textenv/HF" in out and f"defer_kl={'--defer-kl' in extra}" in out
    assert f"prefetch={'--no-prefetch' not in extra}" in out
    assert "fused_sampling=False" in out  # the default on the CPU


def test_no_fused_sampling_turns_a_links_fused_sampling_off():
    models = build("tiny", 12, "cpu", torch.float32)
    settings = types.SimpleNamespace(prompt=4, new=4, bf16=False, decoding="static", defer_kl=False, no_prefetch=False,
                                     guards_every_step=False, no_fused_sampling=False)  # fmt: skip
    agent = rollout.rollout_agent(models, random_prompts(models["tokenizer"], 2, 4), settings)
    agent.link.fused_sampling = True  # the default of compiled decoding on CUDA
    apply_agent_options(agent, settings)
    assert agent.link.fused_sampling
    settings.no_fused_sampling = True
    apply_agent_options(agent, settings)
    assert not agent.link.fused_sampling


def test_scaling_benchmark_reports_every_length():
    rows = scaling.main(["--batch", "2", "--prompt", "4", "--lengths", "4,8", "--repeats", "1", "--decoding", "static"])
    assert [r["new_tokens"] for r in rows] == [4, 8]
    assert all(r["ms_per_step"] > 0 and r["uncached_ms_per_step"] > 0 for r in rows)
    rows = scaling.main(["--batch", "2", "--prompt", "4", "--lengths", "4", "--repeats", "1", "--no-uncached"])
    assert rows[0]["ms_per_step"] > 0 and math.isnan(rows[0]["uncached_ms_per_step"])


def test_lora_memory_benchmark_finds_one_copy_of_the_weights_and_a_small_checkpoint(capsys):
    result = lora_memory.main(["--shape", "tiny", "--lora-r", "4"])
    assert result["shared_weight_bytes"] < 0.55 * result["deepcopy_weight_bytes"]  # the reference's, plus adapters
    assert result["checkpoint_bytes"] < 0.1 * result["whole_checkpoint_bytes"]
    assert "ratio shared/deepcopy" in capsys.readouterr().out


def run_tiny_textenv_side(decoding: str, cpu_memory: bool, defer_kl: bool = False, warmup: int = 0):
    """textenv's side of `ppo_vs_trl` on the tiny shape (4 episodes, 2 minibatches); returns the models too."""
    models = build("tiny", 12, "cpu", torch.float32)
    prompts = random_prompts(models["tokenizer"], 4, 4)
    args = types.SimpleNamespace(batch=4, minibatches=2, prompt=4, new=8, iterations=1, device="cpu", bf16=False,
                                 decoding=decoding, cpu_memory=cpu_memory, defer_kl=defer_kl, warmup=warmup, no_prefetch=False,
                                 guards_every_step=False, no_fused_sampling=False)  # fmt: skip
    return models, ppo_vs_trl.run_textenv(models, prompts, args)


def test_ppo_benchmark_textenv_side_runs_without_trl():
    """TRL is an optional extra; textenv's side of the comparison must not need it."""
    _, (episodes_per_s, memory, split) = run_tiny_textenv_side("static", cpu_memory=False, defer_kl=True, warmup=1)
    assert episodes_per_s > 0 and memory is None
    assert split["rollout_seconds"] > 0 and split["update_seconds"] > 0
    assert split["rollout_seconds"] + split["update_seconds"] < 4 / episodes_per_s  # both within the iteration
    (iteration,) = split["iteration_seconds"]  # one timed iteration; the warm-up one is not timed
    assert iteration == pytest.approx(4 / episodes_per_s)


def test_the_bench_extra_installs_a_trl_that_has_its_ppo_trainer():
    """TRL moved PPOTrainer to trl.experimental in 1.10 and removed it in 1.13: the extra must stay inside."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (trl,) = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["bench"] if r.startswith("trl")]
    assert "1.10.0" in trl.specifier and "1.12.0" in trl.specifier
    assert "1.9.2" not in trl.specifier and "1.13.0" not in trl.specifier and "1.16.0" not in trl.specifier


def test_a_trl_without_its_ppo_trainer_gets_an_error_naming_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl.experimental.ppo", None)  # as on TRL >= 1.13 (or no TRL at all)
    with pytest.raises(ImportError, match=r"removed its PPO trainer in 1\.13.*pip install -e \"\.\[bench\]\""):
        ppo_vs_trl.import_trl_ppo()


def test_trl_window_is_the_sum_of_its_timed_iterations():
    stamps = [10.0, 11.5, 12.0, 12.75, 13.0]  # train start, then the end of each of 4 iterations
    assert ppo_vs_trl.timed_iterations(stamps, warmup=0) == (3.0, [1.5, 0.5, 0.75, 0.25])
    seconds, per_iteration = ppo_vs_trl.timed_iterations(stamps, warmup=2)
    assert seconds == 1.0 and per_iteration == [0.75, 0.25]


def test_ppo_benchmark_measures_cpu_memory_on_request():
    models, (_, memory, _) = run_tiny_textenv_side("dynamic", cpu_memory=True)
    trunk_gib = resident_bytes(models["policy"]) / 2**30  # the reference and the reward model are about as big
    # The three shared models and the env's and agent's copies of them, the policy's gradients and Adam's two
    # moments (allocated during the iteration), and the activations on top.
    assert 9 * trunk_gib < memory < 15 * trunk_gib


def test_components_benchmark_times_each_part(monkeypatch):
    argv = ["--shape", "tiny", "--batch", "4", "--prompt", "4", "--new", "6", "--repeats", "1"]
    ms = components.main(argv)
    assert len(ms) == 14 and all(v > 0 for v in ms.values())
    assert "  the same, attending to the whole buffer" in ms and "  the same, fused (one compiled call)" in ms
    assert "LM head, update 28 rows, V 1024 (padded)" in ms  # tiny's vocabulary of 1,000, padded to 64
    monkeypatch.setattr(components, "can_skip_guards", lambda: False)  # a torch older than 2.7
    monkeypatch.setattr(components, "compiled_without_module_guards", lambda model: None)  # older than 2.8
    ms = components.main(argv)
    assert len(ms) == 12 and "  the same, guards checked once per batch" not in ms


def test_autocast_weights_benchmark_compares_the_two_rollout_steps(capsys):
    ms = autocast_weights.main(["--shape", "tiny", "--batch", "2", "--prompt", "4", "--new", "4", "--repeats", "1",
                                "--decoding", "static"])  # fmt: skip
    assert set(ms) == {"converted per forward", "bf16 copy", "refresh (once per batch)", "ratio"}
    assert all(math.isfinite(v) and v > 0 for v in ms.values())
    assert "same logits bit for bit: True" in capsys.readouterr().out


def test_padded_lm_head_has_the_vocabulary_rows_first():
    weight = torch.randn(1000, 8)
    padded = components.padded_rows(weight)
    assert padded.shape == (1024, 8) and torch.equal(padded[:1000], weight) and not padded[1000:].any()
    assert components.padded_rows(padded).shape == (1024, 8)  # already a multiple: no more rows


def test_profile_benchmark_reports_the_rollouts_operators(capsys):
    ms = profile_rollout.main(["--batch", "4", "--prompt", "4", "--new", "6", "--rows", "5"])
    assert ms["aten::addmm"] > 0  # the models' linear layers ran inside the profiled rollout
    assert not any("backward" in name.lower() for name in ms)  # a rollout has no backward pass
    assert "Self CPU time total" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # counting GPU synchronisations needs a GPU
        profile_rollout.main(["--batch", "4", "--new", "6", "--syncs"])


def test_profile_benchmark_reports_an_updates_operators(capsys):
    ms = profile_rollout.main(["--batch", "4", "--prompt", "4", "--new", "6", "--rows", "5", "--update", "--minibatches", "2"])
    assert any("backward" in name.lower() for name in ms)  # the profiled work was an update: forward and backward
    assert "profiled update" in capsys.readouterr().out


def test_live_tensor_peak_counts_what_a_block_allocates():
    weight = torch.randn(100, 100, requires_grad=True)  # allocated before the block: not counted
    with LiveTensorPeak() as probe:
        a = torch.zeros(1000)  # 4,000 bytes
        b = a + 1  # 8,000 live
        del a
        c = b * 2  # 8,000 live again: the peak stays
        del b, c
        view = weight.t()  # a view of a storage that existed before: not new
        (torch.ones(100) @ weight).sum().backward()  # the gradient is new
    assert view.shape == (100, 100) and probe.live_bytes == weight.grad.untyped_storage().nbytes() == 40_000
    assert 40_000 < probe.peak_bytes < 41_000  # the gradient and the backward's small temporaries, each once


def test_update_memory_benchmark_compares_both_paths(capsys):
    # Chunks of one sequence (33 positions x 1,000 logits): the tiny shape's batch would fit in one chunk.
    argv = ["--batch", "16", "--prompt", "4", "--new", "32", "--repeats", "1", "--chunk-elements", "33000"]
    result = update_memory.main(argv)
    assert result["chunked_gib"] > 0 and result["speed_ratio"] > 0
    assert result["memory_ratio"] < 0.8  # the float32 distributions were the peak of the plain side
    assert "chunked/plain" in capsys.readouterr().out


class _Parsed(Exception):
    """Raised by the stand-in model builder below: a command line passed its script's checks, and the benchmark
    itself does not run."""


def _refuse_to_build(*args, **kwargs):
    raise _Parsed


def test_every_gpu_suite_command_parses_with_its_scripts_arguments(monkeypatch):
    """The GPU suite runs only where a GPU is lent, for minutes that are few and costly: a flag that a script
    no longer takes, or a test that moved, would waste them. Its dry run lists every command; each benchmark
    command must pass its script's parser and own checks (up to where the script builds its models), and each
    test it names must exist. Every part the script runs is in its list of parts, and an unknown part is refused."""
    import re
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine")
    suite = root / "benchmarks" / "gpu_suite.sh"
    known = re.search(r'^known="([^"]+)"', suite.read_text(), re.M).group(1).split()
    assert set(re.findall(r"want (\w+)", suite.read_text())) == set(known)
    dry = lambda *parts: subprocess.run(  # noqa: E731
        [bash, str(suite), *parts], cwd=root, env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True
    )
    assert dry("no_such_part").returncode == 2
    listing = dry("all")
    assert listing.returncode == 0, listing.stderr
    commands = [line.removeprefix("$ ").split() for line in listing.stdout.splitlines() if line.startswith("$ ")]
    scripts = {module.__name__.rsplit(".", 1)[1]: module for module in (
        autocast_weights, components, lora_memory, ppo_vs_trl, profile_rollout, rollout, scaling, update_memory)}  # fmt: skip
    parsed, tests = 0, 0
    for words in commands:
        while words[0] == "env" or "=" in words[0]:  # `env NAME=value ... python3 ...`
            words = words[1:]
        assert words[0] == "python3", words
        if words[1] == "-m":  # pytest: every file and test named exists
            for node in (w for w in words if w.startswith("tests/")):
                path, _, name = node.partition("::")
                assert (root / path).is_file(), node
                assert not name or re.search(rf"^def {name}\(", (root / path).read_text(), re.M), node
                tests += 1
            continue
        module = scripts[Path(words[1]).stem]
        monkeypatch.setattr(module, "build", _refuse_to_build)  # argparse exits (SystemExit 2) on a bad flag first
        with pytest.raises(_Parsed):
            module.main(words[2:])
        parsed += 1
    assert parsed >= 20 and tests >= 10, (parsed, tests)
