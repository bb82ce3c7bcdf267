"""The algorithm benchmark: a grid of (task × algorithm × seed) runs, resumable, summarised in one table.

People benchmarking RL algorithms on language tasks want the same thing every time: run each learner on
each task with a few seeds under the same budget, then compare the final (gold) reward, how far each
policy drifted from the reference (KL), and what it cost (wall time, tokens). This module is that
harness, and ``textenv benchmark`` is its command line (see docs/benchmark_harness.md).

- `ALGORITHMS` maps a name (``ppo``, ``reinforce``, ``rloo``, ``grpo``, ``sb3-ppo``) to an `Algorithm`:
  a factory that builds the learner for an env, with the same learning rate, batch and KL penalty for all.
- `run_grid` runs every missing cell. Each run lives in ``out_dir/<task>/<algo>/seed<k>/``: our agents
  write a `agents.run.TrainingRun` folder (``metrics.jsonl``, checkpoints, so a half-done run resumes
  from its last checkpoint); stable-baselines3's PPO writes the same ``metrics.jsonl`` lines (one per
  rollout) and restarts from scratch if interrupted (SB3 checkpoints are pickles, which textenv never
  loads). A run ends by evaluating the policy on held-out prompts and writing ``result.json``
  atomically: its presence means *finished*, so a re-run skips it and an interrupted grid loses nothing.
- `summarize`, `write_table`, `plot_curves` and `plot_frontier` turn the result files into
  ``results.md`` / ``results.csv`` (mean ± std over seeds), learning curves per task and the
  reward-vs-KL frontier per algorithm.

**Budget** is the number of *iterations* per run. An iteration of our agents is one rollout of
``num_envs`` episodes plus its update; an SB3 iteration is one rollout of ``num_envs × max_new_tokens``
env steps (the same token budget as a full batch of episodes) plus its update.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.checkpoint import latest_checkpoint, write_json_atomic
from agents.grpo import GRPOAgent, GRPOConfig
from agents.ppo import PPOAgent, PPOConfig
from agents.reinforce import ReinforceAgent, ReinforceConfig, RLOOAgent, RLOOConfig

TOY_TASK = "toy"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
REFERENCE = "reference"
"""The pseudo-algorithm of every table's first row: the untrained reference LM, evaluated the same way."""
AUTO_REWARD = {"sentiment": "rm"}
"""``reward="auto"``: the env reward per task; ``"gold"`` (the programmatic reward) unless listed here."""


# ============================================================================================ settings
@dataclass
class BenchmarkSettings:
    """What every run of a grid shares (the grid's axes are algorithms × tasks × seeds)."""

    num_envs: int = 16
    """Episodes per iteration (the batch); SB3 collects the same number of tokens per rollout."""
    learning_rate: float = 5e-4
    """Adam learning rate of every algorithm (tiny LMs want more than the 1e-5 of large ones)."""
    samples_per_prompt: int = 4
    """K for RLOO / GRPO / REINFORCE (must divide ``num_envs``)."""
    minibatch_size: int = 8
    """Episodes per optimizer step (our agents); SB3 uses ``minibatch_size × max_new_tokens`` tokens."""
    kl_coef: float = 0.05
    """Fixed KL penalty β in the env's reward, the same for every algorithm."""
    reward: str = "auto"
    """The env's reward for built-in tasks: ``"rm"``, ``"gold"`` or ``"auto"`` (see `AUTO_REWARD`)."""
    max_new_tokens: int | None = None
    """Completion budget (default: the task's)."""
    eval_prompts: int = 64
    """Held-out prompts for the final evaluation of every run."""
    checkpoint_every: int = 5
    """Checkpoint interval (iterations) of our agents: the most an interrupted run repeats."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """More env arguments for every run."""


@dataclass(frozen=True)
class Algorithm:
    """A benchmarked learner.

    :ivar name: the name used on the command line and in folder names.
    :ivar description: one line for ``--help`` and the docs.
    :ivar build: ``build(env, settings, seed, iterations, gold_reward) -> agent``: for a vector algorithm
        an agent that `agents.run.TrainingRun` drives, for SB3 an ``stable_baselines3.PPO``.
    :ivar vectorized: our agents act in a `TextGenerationVectorEnv` (autoreset disabled); SB3 in a single env.
    """

    name: str
    description: str
    build: Callable[..., Any]
    vectorized: bool = True


def _policy(env: Any) -> Any:
    from agents.value_head import PolicyWithValueHead

    return PolicyWithValueHead(copy.deepcopy(env.reference_model))


def _build_ppo(env: Any, s: BenchmarkSettings, seed: int, iterations: int, gold: Callable | None) -> Any:
    mb = min(s.minibatch_size, env.num_envs)
    config = PPOConfig(
        learning_rate=s.learning_rate,
        anneal_lr=False,  # the same constant learning rate as every other algorithm in the grid
        total_iterations=iterations,
        minibatch_size=mb,
        micro_batch_size=mb,
        seed=seed,
    )
    return PPOAgent(_policy(env), env, config, gold_reward=gold)


def _pg_builder(agent_cls: type, config_cls: type) -> Callable[..., Any]:
    """Factory of a sequence-level baseline (`agents.policy_gradient`): the shared settings, K per prompt."""

    def build(env: Any, s: BenchmarkSettings, seed: int, iterations: int, gold: Callable | None) -> Any:
        mb = min(s.minibatch_size, env.num_envs)
        config = config_cls(
            learning_rate=s.learning_rate,
            samples_per_prompt=s.samples_per_prompt,
            minibatch_size=mb,
            seed=seed,
        )
        return agent_cls(_policy(env), env, config, gold_reward=gold)

    return build


def _build_sb3_ppo(env: Any, s: BenchmarkSettings, seed: int, iterations: int, gold: Callable | None) -> Any:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.sb3_policy import LMPolicy, connect

    tokens = s.num_envs * env.unwrapped.engine.max_new_tokens  # one "iteration": a batch's worth of tokens
    algo = PPO(
        LMPolicy, DummyVecEnv([lambda: env]), policy_kwargs=dict(model=env.unwrapped.reference_model),
        n_steps=tokens, batch_size=min(tokens, s.minibatch_size * env.unwrapped.engine.max_new_tokens), n_epochs=4,
        learning_rate=s.learning_rate, gamma=1.0, gae_lambda=0.95, seed=seed, device="cpu",
    )  # fmt: skip
    connect(algo)  # the env's KL term reads the policy's log-probs (one forward per token)
    return algo


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ppo", "token-level PPO with a value head (agents.ppo)", _build_ppo),
        Algorithm("reinforce", "REINFORCE with a moving-average baseline (agents.reinforce)",
                  _pg_builder(ReinforceAgent, ReinforceConfig)),
        Algorithm("rloo", "REINFORCE leave-one-out, K samples per prompt (agents.reinforce)",
                  _pg_builder(RLOOAgent, RLOOConfig)),
        Algorithm("grpo", "group-normalised advantages, clipped ratio (agents.grpo)",
                  _pg_builder(GRPOAgent, GRPOConfig)),
        Algorithm("sb3-ppo", "stable-baselines3 PPO with agents.sb3_policy.LMPolicy on one env", _build_sb3_ppo,
                  vectorized=False),
    )
}  # fmt: skip
"""Every benchmarked algorithm by name."""


def valid_tasks() -> list[str]:
    """The task names the harness accepts: ``toy`` and every built-in task."""
    from textenv.tasks import TASKS

    return [TOY_TASK, *sorted(TASKS)]


def check_names(algos: Sequence[str], tasks: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the valid choices if any algorithm or task is unknown (or none is given)."""
    bad_algos = [a for a in algos if a not in ALGORITHMS]
    if bad_algos or not algos:
        raise ValueError(
            f"unknown algorithm(s) {bad_algos or '(none given)'}; valid algorithms: {', '.join(ALGORITHMS)}"
        )
    bad_tasks = [t for t in tasks if t not in valid_tasks()]
    if bad_tasks or not tasks:
        raise ValueError(
            f"unknown task(s) {bad_tasks or '(none given)'}; valid tasks: {', '.join(valid_tasks())}"
        )


# ============================================================================================ one run
@dataclass
class TaskWorld:
    """What a run needs to know about its task: how to make envs, the held-out prompts and the gold reward."""

    name: str
    make_env: Callable[[int | None], Any]
    eval_prompts: Callable[[int, int], list[str]]
    gold_reward: Callable | None
    join: Callable[[str, str], str]


def task_world(task: str, settings: BenchmarkSettings) -> TaskWorld:
    """The env factory (``num_envs`` or ``None`` for a single env), prompts and gold reward of a task."""
    kwargs: dict[str, Any] = {"kl_coef": settings.kl_coef, **settings.env_kwargs}
    if settings.max_new_tokens is not None:
        kwargs["max_new_tokens"] = settings.max_new_tokens
    if task == TOY_TASK:
        from textenv.rewards import join_text
        from textenv.toy import make_toy_env, toy_prompts

        def make_toy(num_envs: int | None) -> Any:
            extra = {"autoreset_mode": "Disabled"} if num_envs is not None else {}
            return make_toy_env(num_envs, **kwargs, **extra)

        return TaskWorld(
            task, make_toy, lambda seed, n: toy_prompts(np.random.default_rng([seed, 99]), n), None, join_text
        )

    from textenv.task_env import make_task_env
    from textenv.tasks import get_task

    spec = get_task(task)
    reward = AUTO_REWARD.get(task, "gold") if settings.reward == "auto" else settings.reward

    def make(num_envs: int | None) -> Any:
        extra = {"autoreset_mode": "Disabled"} if num_envs is not None else {}
        return make_task_env(task, num_envs, reward=reward, **kwargs, **extra)

    return TaskWorld(
        task,
        make,
        lambda seed, n: spec.prompts(np.random.default_rng([seed, 99]), n),
        spec.gold_reward,
        spec.join,
    )


def run_dir_of(out_dir: str | Path, task: str, algo: str, seed: int) -> Path:
    """``out_dir/<task>/<algo>/seed<k>``: where one run of the grid lives."""
    return Path(out_dir) / task / algo / f"seed{seed}"


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The ``metrics.jsonl`` lines of a run folder (empty if there are none yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train_vectorized(algorithm: Algorithm, world: TaskWorld, settings: BenchmarkSettings, seed: int,
                      iterations: int, run_dir: Path) -> Any:  # fmt: skip
    from agents.run import TrainingRun

    env = world.make_env(settings.num_envs)
    agent = algorithm.build(env, settings, seed, iterations, world.gold_reward)
    resume = latest_checkpoint(run_dir) is not None
    if not resume and run_dir.exists():  # killed before its first checkpoint: start over cleanly
        shutil.rmtree(run_dir)
    run = TrainingRun(
        agent,
        run_dir,
        settings.checkpoint_every,
        extra_config={"task": world.name, "algorithm": algorithm.name},
    )
    run.train(iterations, resume=resume, progress=False)
    return env, agent.policy.lm


def _train_sb3(algorithm: Algorithm, world: TaskWorld, settings: BenchmarkSettings, seed: int,
               iterations: int, run_dir: Path) -> Any:  # fmt: skip
    from stable_baselines3.common.callbacks import BaseCallback

    if run_dir.exists():  # SB3 runs are not checkpointed (pickles): an interrupted one starts over
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = world.make_env(None)
    algo = algorithm.build(env, settings, seed, iterations, world.gold_reward)
    write_json_atomic(run_dir / "config.json", {"agent": "stable_baselines3.PPO", "task": world.name, "algorithm": algorithm.name,
                                                "iterations": iterations, "n_steps": algo.n_steps, "settings": asdict(settings)})  # fmt: skip

    class MetricsCallback(BaseCallback):
        """Writes one `TrainingRun`-style metrics line per rollout from the finished episodes' infos."""

        def __init__(self) -> None:
            super().__init__()
            self.iteration, self.episodes, self.started = 0, [], time.perf_counter()
            self.handle = (run_dir / METRICS_FILE).open("a")

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "score" in info:
                    self.episodes.append(info)
            return True

        def _on_rollout_end(self) -> None:  # the update follows; log the rollout's episodes
            eps, self.episodes = self.episodes, []
            if not eps:
                return
            self.iteration += 1
            now = time.perf_counter()
            stats = {"iteration": self.iteration, "score": float(np.mean([e["score"] for e in eps])),
                     "kl": float(np.mean([e["episode_kl"] for e in eps])), "kl_coef": float(eps[-1]["kl_coef"]),
                     "episodes": len(eps), "tokens": algo.n_steps, "seconds": now - self.started}  # fmt: skip
            if world.gold_reward is not None:
                stats["gold"] = float(
                    np.mean(world.gold_reward([e["prompt"] for e in eps], [e["text"] for e in eps]))
                )
            self.started = now
            self.handle.write(json.dumps(stats) + "\n")
            self.handle.flush()

    callback = MetricsCallback()
    try:
        algo.learn(total_timesteps=iterations * algo.n_steps, callback=callback)
    finally:
        callback.handle.close()
    return env.unwrapped, algo.policy.lm


def _tokens(metrics: Sequence[dict[str, float]], num_envs: int) -> float:
    """Generated tokens over the run: SB3 lines count them; our agents' lines give the mean length."""
    return float(sum(m["tokens"] if "tokens" in m else m["response_length"] * num_envs for m in metrics))


def check_same_grid(out_dir: str | Path, budget: int, settings: BenchmarkSettings) -> None:
    """Refuse to add to (or re-run in) a grid folder whose finished runs used another budget or other settings
    (the checkpoint interval aside): its table would mix two grids. The reference rows record 0 iterations."""
    asked = {k: v for k, v in json.loads(json.dumps(asdict(settings))).items() if k != "checkpoint_every"}
    for result in finished_runs(out_dir):
        iterations = 0 if result.get("algo") == REFERENCE else budget
        had = {k: v for k, v in (result.get("settings") or {}).items() if k != "checkpoint_every"}
        for key, old, new in (("iterations", result.get("iterations"), iterations), ("settings", had, asked)):
            if old != new:
                where = f"{result.get('task')}/{result.get('algo')}/seed{result.get('seed')}"
                raise ValueError(
                    f"{out_dir} holds a run ({where}) with {key} {old}, not {new}: use another output folder for "
                    "these settings, or remove the old results"
                )


def run_one(algo: str, task: str, seed: int, budget: int, out_dir: str | Path,
            settings: BenchmarkSettings | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or finish, or skip) one cell of the grid; returns its result (also in ``result.json``).

    :param algo: a key of `ALGORITHMS`, or `REFERENCE` (evaluate the untrained reference LM).
    :param task: ``"toy"`` or a key of ``textenv.tasks.TASKS``.
    :param seed: seeds the agent (sampling, prompts, minibatches); the reference LM is the task's.
    :param budget: iterations (see the module docstring).
    :param out_dir: the grid's folder.
    :param settings: what every run shares.
    """
    from agents.evaluation import evaluate_policy

    check_names(["ppo" if algo == REFERENCE else algo], [task])  # the reference row exists for every task
    settings = settings or BenchmarkSettings()
    run_dir = run_dir_of(out_dir, task, algo, seed)
    check_same_grid(out_dir, budget, settings)
    if (run_dir / RESULT_FILE).exists():
        return json.loads((run_dir / RESULT_FILE).read_text())
    started = time.perf_counter()
    world = task_world(task, settings)
    if algo == REFERENCE:  # no training: the starting point every algorithm is compared with
        env, budget, metrics = world.make_env(None).unwrapped, 0, []
        lm = env.reference_model
    else:
        algorithm = ALGORITHMS[algo]
        train = _train_vectorized if algorithm.vectorized else _train_sb3
        env, lm = train(algorithm, world, settings, seed, budget, run_dir)
        metrics = read_metrics(run_dir)
    engine = env.engine
    lm.eval()
    final = evaluate_policy(
        lm, env.reference_model, env.tokenizer, engine.reward_fn, world.eval_prompts(seed, settings.eval_prompts),
        engine.max_prompt_tokens, engine.max_new_tokens, gold_reward=world.gold_reward, seed=seed, join=world.join,
    ).metrics()  # fmt: skip
    result = {
        "task": task, "algo": algo, "seed": seed, "iterations": budget,
        "reward": final["gold"] if final.get("gold") is not None else final["score"],
        "score": final["score"], "gold": final.get("gold"), "kl": final["kl"], "eval": final,
        "train_seconds": float(sum(m["seconds"] for m in metrics)), "tokens": _tokens(metrics, settings.num_envs),
        "wall_seconds": time.perf_counter() - started, "settings": asdict(settings),
    }  # fmt: skip
    write_json_atomic(run_dir / RESULT_FILE, result)
    return result


def run_grid(algos: Sequence[str], tasks: Sequence[str], seeds: int | Sequence[int], budget: int, out_dir: str | Path,
             settings: BenchmarkSettings | None = None, progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Run every cell of ``tasks × algos × seeds`` that has no ``result.json`` yet, then write the table and plots.

    :param algos: names in `ALGORITHMS`.
    :param tasks: ``"toy"`` and/or names in ``textenv.tasks.TASKS``.
    :param seeds: a number of seeds (``0 … n-1``) or the seeds themselves.
    :param budget: iterations per run.
    :param out_dir: the grid's folder (``results.md``, ``results.csv``, ``curves_<task>.png``, ``frontier.png``).
    :param settings: what every run shares.
    :param progress: show a progress bar over the runs.
    :return: the table rows (see `summarize`).
    """
    from tqdm.auto import tqdm

    check_names(algos, tasks)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 iteration, got {budget}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError("at least one seed is needed")
    cells = [(t, a, s) for t in tasks for a in (REFERENCE, *algos) for s in seed_list]
    bar = tqdm(cells, desc="benchmark", unit="run", disable=not progress)
    for task, algo, seed in bar:
        bar.set_postfix(task=task, algo=algo, seed=seed)
        run_one(algo, task, seed, budget, out_dir, settings)
    rows = summarize(out_dir)
    write_table(rows, out_dir)
    plot_curves(out_dir)
    plot_frontier(out_dir)
    return rows


# ============================================================================================ results
def finished_runs(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``out_dir``, in task / algorithm / seed order."""
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob(f"*/*/seed*/{RESULT_FILE}"))]


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


SUMMARY_FIELDS = ("reward", "score", "kl", "train_seconds", "wall_seconds", "tokens")


def summarize(out_dir: str | Path) -> list[dict[str, Any]]:
    """One row per (task, algorithm): mean and std over seeds of every field in ``SUMMARY_FIELDS``.

    ``reward`` is the final held-out gold reward where the task has one, else the env's reward (the toy
    keyword score); ``score`` is the env's reward (RM or gold), ``kl`` the per-sequence KL to the reference.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in finished_runs(out_dir):
        groups.setdefault((result["task"], result["algo"]), []).append(result)
    rows = []
    for (task, algo), results in groups.items():
        row: dict[str, Any] = {
            "task": task,
            "algo": algo,
            "seeds": len(results),
            "iterations": results[0]["iterations"],
        }
        for name in SUMMARY_FIELDS:
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([r.get(name) for r in results])
        rows.append(row)
    order = [REFERENCE, *ALGORITHMS]
    return sorted(
        rows, key=lambda r: (r["task"], order.index(r["algo"]) if r["algo"] in order else len(order))
    )


def write_table(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """``results.md`` (mean ± std) and ``results.csv`` (every number) in ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "results.csv", out_dir / "results.md"
    columns = [
        "task",
        "algo",
        "seeds",
        "iterations",
        *(f"{n}_{s}" for n in SUMMARY_FIELDS for s in ("mean", "std")),
    ]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    header = "| task | algorithm | seeds | iterations | final reward | RM/env score | KL | train time (s) | wall time (s) | tokens |"
    lines = [header, "|" + " --- |" * 10]
    for r in rows:
        cells = [f"{r[f'{n}_mean']:.3f} ± {r[f'{n}_std']:.3f}" for n in ("reward", "score", "kl")]
        cells += [f"{r[f'{n}_mean']:.1f} ± {r[f'{n}_std']:.1f}" for n in ("train_seconds", "wall_seconds")]
        cells.append(f"{r['tokens_mean']:.0f}")
        lines.append(
            f"| {r['task']} | {r['algo']} | {r['seeds']} | {r['iterations']} | " + " | ".join(cells) + " |"
        )
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def _curves(out_dir: Path, task: str, algo: str) -> dict[str, np.ndarray]:
    """Per-iteration mean and std over seeds of the reward (gold, else score) and the KL."""
    runs = [read_metrics(p.parent) for p in sorted((out_dir / task / algo).glob(f"seed*/{RESULT_FILE}"))]
    runs = [m for m in runs if m]
    n = min((len(m) for m in runs), default=0)
    key = "gold" if runs and "gold" in runs[0][0] else "score"
    reward = np.array([[m[i][key] for i in range(n)] for m in runs]).reshape(len(runs), n)
    kl = np.array([[m[i]["kl"] for i in range(n)] for m in runs]).reshape(len(runs), n)
    return {"x": np.arange(1, n + 1), "reward": reward.mean(0), "reward_std": reward.std(0), "kl": kl.mean(0),
            "kl_std": kl.std(0), "key": np.array(key)}  # fmt: skip


def plot_curves(out_dir: str | Path) -> list[Path]:
    """``curves_<task>.png`` per task: training reward and KL per iteration, mean ± std over seeds per algorithm.

    On `matplotlib.figure.Figure` objects, as `agents.plots`: the caller's pyplot backend and figures are left alone.
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    paths = []
    for task in sorted({r["task"] for r in finished_runs(out_dir)}):
        fig = Figure(figsize=(10, 3.6), dpi=100)
        ax_r, ax_kl = fig.subplots(1, 2)
        for algo in sorted({r["algo"] for r in finished_runs(out_dir) if r["task"] == task} - {REFERENCE}):
            c = _curves(out_dir, task, algo)
            for ax, name in ((ax_r, "reward"), (ax_kl, "kl")):
                line = ax.plot(c["x"], c[name], marker=".", label=algo)[0]
                ax.fill_between(
                    c["x"],
                    c[name] - c[f"{name}_std"],
                    c[name] + c[f"{name}_std"],
                    color=line.get_color(),
                    alpha=0.2,
                )
            ax_r.set_ylabel(f"training {c['key']}")
        ax_kl.set_ylabel("KL(π ‖ π_ref) per episode")
        for ax in (ax_r, ax_kl):
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        ax_r.legend()
        fig.suptitle(f"{task}: mean ± std over seeds")
        fig.tight_layout()
        path = out_dir / f"curves_{task}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_frontier(out_dir: str | Path) -> Path:
    """``frontier.png``: final held-out reward against KL, one panel per task, one colour per algorithm.

    Each run is a dot; the line traces its algorithm's mean (KL, reward) over training iterations, so the
    plot shows both where each algorithm ends and what reward it buys per nat of drift.
    """
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    results = finished_runs(out_dir)
    tasks = sorted({r["task"] for r in results}) or ["(no runs)"]
    fig = Figure(figsize=(5 * len(tasks), 3.8), dpi=100)
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        reference = [r for r in results if r["task"] == task and r["algo"] == REFERENCE]
        if reference:
            ax.scatter([r["kl"] for r in reference], [r["reward"] for r in reference], color="black", marker="x",
                       label="reference LM")  # fmt: skip
        for algo in sorted({r["algo"] for r in results if r["task"] == task} - {REFERENCE}):
            c = _curves(out_dir, task, algo)
            line = ax.plot(c["kl"], c["reward"], alpha=0.5, label=f"{algo} (training)")[0]
            final = [r for r in results if r["task"] == task and r["algo"] == algo]
            ax.scatter(
                [r["kl"] for r in final],
                [r["reward"] for r in final],
                color=line.get_color(),
                label=f"{algo} (final)",
            )
        ax.set_xlabel("KL(π ‖ π_ref) per sequence")
        ax.set_ylabel("reward (gold where known)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "frontier.png"
    fig.savefig(path)
    return path
