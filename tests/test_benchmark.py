"""The benchmark harness: a tiny grid's files, resume after an interruption, the table's numbers, bad names."""

import csv
import json

import numpy as np
import pytest

import agents.benchmark as bench
from agents.benchmark import (
    BenchmarkSettings,
    check_names,
    finished_runs,
    read_metrics,
    run_dir_of,
    run_grid,
    run_one,
)
from agents.ppo import PPOAgent
from textenv.cli import main

TINY = BenchmarkSettings(num_envs=8, eval_prompts=8, checkpoint_every=1)


def result_mtimes(out_dir):
    return {p: p.stat().st_mtime_ns for p in sorted(out_dir.glob("*/*/seed*/result.json"))}


def test_tiny_grid_writes_table_and_plots_and_rerun_skips(tmp_path, monkeypatch):
    rows = run_grid(["ppo", "rloo"], ["toy"], 2, 2, tmp_path, TINY, progress=False)
    for name in ("results.md", "results.csv", "curves_toy.png", "frontier.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert [(r["task"], r["algo"], r["seeds"]) for r in rows] == [
        ("toy", "reference", 2),
        ("toy", "ppo", 2),
        ("toy", "rloo", 2),
    ]
    assert rows[0]["tokens_mean"] == 0 and rows[0]["kl_mean"] == pytest.approx(
        0, abs=1e-6
    )  # the untrained LM
    for algo in ("ppo", "rloo"):
        for seed in (0, 1):
            run = run_dir_of(tmp_path, "toy", algo, seed)
            assert [m["iteration"] for m in read_metrics(run)] == [1, 2]
            result = json.loads((run / "result.json").read_text())
            assert result["algo"] == algo and result["seed"] == seed and result["tokens"] > 0
    markdown = (tmp_path / "results.md").read_text()
    assert "| toy | ppo | 2 | 2 |" in markdown and "±" in markdown

    # Re-running the same grid trains nothing and leaves every finished run as it was.
    before = result_mtimes(tmp_path)
    calls = []
    monkeypatch.setattr(bench, "_train_vectorized", lambda *a: calls.append(a))
    run_grid(["ppo", "rloo"], ["toy"], 2, 2, tmp_path, TINY, progress=False)
    assert calls == [] and result_mtimes(tmp_path) == before
    # ... but the same folder with another budget or settings is refused: its table would mix two grids.
    with pytest.raises(ValueError, match="holds a run .* with iterations 2, not 3"):
        run_grid(["ppo"], ["toy"], 1, 3, tmp_path, TINY, progress=False)
    with pytest.raises(ValueError, match="holds a run .* with settings"):
        run_grid(["ppo"], ["toy"], 1, 2, tmp_path, BenchmarkSettings(num_envs=8, eval_prompts=8, kl_coef=0.1), progress=False)
    run_grid(["ppo"], ["toy"], 1, 2, tmp_path, BenchmarkSettings(num_envs=8, eval_prompts=8, checkpoint_every=2), progress=False)
    assert calls == [] and result_mtimes(tmp_path) == before
    with pytest.raises(ValueError, match="holds a run .* with iterations 2, not 3"):  # growing it at another budget
        run_grid(["grpo"], ["toy"], [5], 3, tmp_path, TINY, progress=False)
    assert calls == [] and not run_dir_of(tmp_path, "toy", "grpo", 5).exists()


def test_interrupted_grid_is_completed_and_loses_nothing(tmp_path, monkeypatch):
    original = PPOAgent.iteration_step
    count = {"n": 0}

    def crash_on_fifth(self):  # seed 0 runs iterations 1-3, seed 1 dies in its iteration 2
        count["n"] += 1
        if count["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    monkeypatch.setattr(PPOAgent, "iteration_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run_grid(["ppo"], ["toy"], 2, 3, tmp_path, TINY, progress=False)
    finished = result_mtimes(tmp_path)
    assert [(p.parent.parent.name, p.parent.name) for p in finished] == [
        ("ppo", "seed0"),
        ("reference", "seed0"),
        ("reference", "seed1"),
    ]
    half_done = run_dir_of(tmp_path, "toy", "ppo", 1)
    assert not (half_done / "result.json").exists() and len(read_metrics(half_done)) == 1

    monkeypatch.setattr(PPOAgent, "iteration_step", original)
    run_grid(["ppo"], ["toy"], 2, 3, tmp_path, TINY, progress=False)
    assert {p: m for p, m in result_mtimes(tmp_path).items() if p in finished} == finished  # not re-run
    assert [m["iteration"] for m in read_metrics(half_done)] == [
        1,
        2,
        3,
    ]  # resumed after its checkpoint, once each
    assert (half_done / "result.json").exists()

    # A finished run whose result file is lost is finished again from its final checkpoint, not retrained.
    (half_done / "result.json").unlink()
    run_grid(["ppo"], ["toy"], 2, 3, tmp_path, TINY, progress=False)
    assert [m["iteration"] for m in read_metrics(half_done)] == [1, 2, 3]
    assert len(finished_runs(tmp_path)) == 4


def test_sb3_ppo_run_writes_the_same_metrics_and_restarts_cleanly(tmp_path):
    run = run_dir_of(tmp_path, "toy", "sb3-ppo", 0)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"iteration": 1, "score": 0.0, "kl": 0.0}\n')  # left by a killed run
    result = run_one("sb3-ppo", "toy", 0, 2, tmp_path, TINY)
    metrics = read_metrics(run)
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all({"score", "kl", "kl_coef", "seconds", "tokens"} <= set(m) for m in metrics)
    assert result["tokens"] == 2 * TINY.num_envs * 8  # two rollouts of num_envs × max_new_tokens env steps
    assert np.isfinite(result["reward"]) and np.isfinite(result["kl"])


def test_summary_is_mean_and_std_over_seeds(tmp_path):
    rewards = [0.2, 0.5, 0.8]
    for seed, reward in enumerate(rewards):
        path = run_dir_of(tmp_path, "toy", "grpo", seed) / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"task": "toy", "algo": "grpo", "seed": seed, "iterations": 4, "reward": reward,
                                    "score": reward, "kl": seed, "train_seconds": 1.0, "wall_seconds": 2.0, "tokens": 100}))  # fmt: skip
    rows = bench.summarize(tmp_path)
    md, csv_path = bench.write_table(rows, tmp_path)
    (row,) = list(csv.DictReader(csv_path.open()))
    assert float(row["reward_mean"]) == pytest.approx(np.mean(rewards))
    assert float(row["reward_std"]) == pytest.approx(np.std(rewards, ddof=1))
    assert float(row["kl_mean"]) == pytest.approx(1.0) and row["seeds"] == "3"
    assert f"{np.mean(rewards):.3f} ± {np.std(rewards, ddof=1):.3f}" in md.read_text()


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--algos", "nope"], list(bench.ALGORITHMS)),
        (["--algos", "ppo", "--tasks", "toy,nope"], bench.valid_tasks()),
    ],
)
def test_unknown_names_exit_2_listing_the_valid_ones(tmp_path, capsys, argv, names):
    assert main(["benchmark", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and all(name in err for name in names)
    assert not any(tmp_path.iterdir())  # nothing ran
    with pytest.raises(ValueError, match="valid algorithms"):
        check_names(["ppo", "pp0"], ["toy"])


def test_cli_runs_a_grid(tmp_path, capsys):
    argv = ["benchmark", "--algos", "grpo", "--tasks", "toy", "--seeds", "1", "--budget", "1", "--num-envs", "8",
            "--eval-prompts", "8", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert "| toy | grpo | 1 | 1 |" in capsys.readouterr().out
    assert (tmp_path / "results.csv").is_file() and (tmp_path / "frontier.png").is_file()


def test_a_task_with_a_gold_reward_records_it(arithmetic_models, tmp_path):
    result = run_one("rloo", "arithmetic", 0, 1, tmp_path, BenchmarkSettings(num_envs=4, eval_prompts=8))
    assert result["gold"] is not None and result["reward"] == result["gold"]
    assert "gold" in read_metrics(run_dir_of(tmp_path, "arithmetic", "rloo", 0))[0]


def test_cli_help_shows_each_options_default(capsys):
    """Every subcommand's --help gives the defaults a user would otherwise read from the code, and none that
    only means "taken from the task or config" (None) or an unset flag."""
    from textenv.cli import build_parser

    parser = build_parser()
    for command, expected in (("benchmark", "(default: ppo,rloo,grpo,sb3-ppo)"), ("train-rm", "(default: 1000)"),
                              ("preferences", "(default: 100)")):  # fmt: skip
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert expected in out, (command, out)
    with pytest.raises(SystemExit):
        parser.parse_args(["rlhf", "--help"])
    out = capsys.readouterr().out
    assert "--iterations" in out and "(default: None)" not in out and "(default: False)" not in out


def test_ppo_seeds_draw_disjoint_prompt_streams_and_keep_the_grids_constant_lr():
    """Row ``i`` of a seed-``s`` PPO run draws prompts with seed ``s·B + i``: with Gymnasium's ``s + i`` per row,
    seed 1 would train on seed 0's prompts shifted by one row. And the grid gives PPO the constant learning rate
    every other algorithm has (PPOConfig anneals it by default)."""
    world = bench.task_world("toy", TINY)
    agents = [bench.ALGORITHMS["ppo"].build(world.make_env(8), TINY, seed, 2, None) for seed in (0, 1)]
    streams = [[tuple(rng.integers(10**9, size=4)) for rng in agent.env._row_rngs] for agent in agents]
    assert not set(streams[0]) & set(streams[1])
    agent = agents[0]
    for _ in range(2):
        agent.iteration_step()
        assert agent.optimizer.param_groups[0]["lr"] == TINY.learning_rate
