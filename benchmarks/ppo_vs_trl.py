"""One PPO iteration, textenv vs TRL's PPOTrainer: episodes per second and peak GPU memory, same process.

Both sides run the same policy / reference / reward-model shape (random weights), batch, prompt length,
response length, 4 PPO epochs and the same number of minibatches. TRL needs a separate value model (a
sequence classifier of the same shape), as its PPOTrainer always does; textenv reads the value from a head
on the policy's trunk. TRL is an optional benchmark dependency: ``pip install -e ".[bench]"``.

    python benchmarks/ppo_vs_trl.py --shape tiny --batch 16 --prompt 16 --new 32 --iterations 3      # CPU
    python benchmarks/ppo_vs_trl.py --shape gpt2 --batch 64 --prompt 64 --new 128 --device cuda --bf16 --decoding compiled

With ``--decoding compiled`` one rollout runs before the timed iterations so that compiling is not timed.
``--warmup N`` runs N whole iterations on each side before the timed ones (first-use costs such as CUDA's
lazy kernel loading, cuBLAS workspaces and the allocator's growth then fall outside the timing; the peak
memory still covers them). Both sides' times per iteration are printed, so a slow first iteration shows.
On a GPU the peak memory is ``torch.cuda.max_memory_allocated``: everything on the GPU, the shared models
that both sides copy from included. On the CPU, ``--cpu-memory`` counts the same things (every model's
parameters and buffers plus the peak of the tensors the iterations allocate, `benchmarks.live_memory`);
its bookkeeping slows both sides, so take the speeds from a run without it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.metadata
import itertools
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from agents.ppo import PPOAgent, PPOConfig  # noqa: E402
from agents.value_head import PolicyWithValueHead  # noqa: E402
from benchmarks.common import (  # noqa: E402
    agent_options,
    apply_agent_options,
    benchmark_parser,
    build,
    parse_benchmark_args,
    random_prompts,
    synchronized_clock,
)
from benchmarks.live_memory import LiveTensorPeak, resident_bytes  # noqa: E402
from textenv.kl import FixedKLController  # noqa: E402
from textenv.models import build_tiny_reward_model  # noqa: E402
from textenv.rewards import RewardModelScorer  # noqa: E402
from textenv.vector_env import TextGenerationVectorEnv  # noqa: E402


class PeakMemory:
    """Peak memory of the timed block: CUDA's allocator statistics, or on the CPU (``cpu_memory``) the models'
    bytes plus a `LiveTensorPeak` of the block; ``gib`` is None on the CPU without ``cpu_memory``.

    On a GPU ``gib`` is the peak of allocated memory, and the peak the allocator reserved is printed next to
    it: a CUDA graph's intermediates live in a private pool that its replays use without allocating, so
    they count in the reserved figure only (textenv's compiled decode steps have graphs; TRL has none).
    """

    def __init__(self, device: str, cpu_memory: bool, label: str = "") -> None:
        self.device = device
        self.label = label
        self.cuda = device.startswith("cuda")
        self.probe = LiveTensorPeak() if cpu_memory and not self.cuda else None
        self.gib: float | None = None
        self.reserved_gib: float | None = None

    @contextlib.contextmanager
    def measure(self, *models: torch.nn.Module | None):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        with self.probe if self.probe is not None else contextlib.nullcontext():
            yield
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.reserved_gib = torch.cuda.max_memory_reserved(self.device) / 2**30
            print(f"{self.label} peak GPU memory: {self.gib:.2f} GiB allocated, {self.reserved_gib:.2f} GiB reserved")
        elif self.probe is not None:
            self.gib = (resident_bytes(*models) + self.probe.peak_bytes) / 2**30


def models_of(models: dict) -> list[torch.nn.Module]:
    """The shared models of `benchmarks.common.build` (on a GPU they count in both sides' peaks)."""
    return [m for m in models.values() if isinstance(m, torch.nn.Module)]


def frozen_copy(model: torch.nn.Module, args) -> torch.nn.Module:
    """A side's own copy of a frozen model (reference, RM): bf16 with --bf16 on both sides, as they need no fp32
    master weights (the policies keep fp32 weights under bf16 autocast). TRL's mixed precision (accelerate's
    autocast) wraps only its prepared policy-and-value forward, not its reference and reward forwards, so
    fp32 copies would run those in fp32."""
    return copy.deepcopy(model).to(torch.bfloat16 if args.bf16 else torch.float32)


def textenv_agent(models, prompts, args, total_iterations: int) -> tuple[PPOAgent, torch.nn.Module, torch.nn.Module]:
    """textenv's side: a PPO agent on its own policy copy (float32 weights, bf16 autocast with ``--bf16``) and its
    own copies of the frozen reference and RM (returned with it), 4 epochs of ``--minibatches`` minibatches
    (`benchmarks/profile_rollout.py --update` profiles its update)."""
    reference, reward = frozen_copy(models["reference"], args), frozen_copy(models["reward"], args)
    env = TextGenerationVectorEnv(
        reference, RewardModelScorer(reward, models["tokenizer"], batch_size=len(prompts), compile=args.decoding == "compiled"),
        prompts, num_envs=len(prompts), tokenizer=models["tokenizer"], max_prompt_tokens=args.prompt,
        max_new_tokens=args.new, kl_coef=FixedKLController(0.05), autoreset_mode="Disabled",
        decoding=args.decoding,
    )  # fmt: skip
    minibatch = args.batch // args.minibatches
    agent = PPOAgent(
        PolicyWithValueHead(copy.deepcopy(models["policy"])), env,
        PPOConfig(ppo_epochs=4, minibatch_size=minibatch, micro_batch_size=minibatch, bf16=args.bf16,
                  total_iterations=total_iterations, decoding=args.decoding, defer_kl=args.defer_kl),
    )  # fmt: skip
    apply_agent_options(agent, args)
    return agent, reference, reward


def run_textenv(models, prompts, args) -> tuple[float, float | None, dict]:
    agent, reference, reward = textenv_agent(models, prompts, args, args.warmup + args.iterations)
    if args.decoding == "compiled":
        agent.rollout()  # compile the decode steps outside the timed iterations
    peak = PeakMemory(args.device, args.cpu_memory, "textenv")
    split: dict = {"rollout_seconds": 0.0, "update_seconds": 0.0, "iteration_seconds": []}
    with peak.measure(*models_of(models), agent.policy, reference, reward):
        for _ in range(args.warmup):
            agent.iteration_step()
        start = stamp = synchronized_clock(args.device)
        for _ in range(args.iterations):
            stats = agent.iteration_step()
            now = synchronized_clock(args.device)
            split["iteration_seconds"].append(now - stamp)
            stamp = now
            for key in ("rollout_seconds", "update_seconds"):
                split[key] += stats[key] / args.iterations
    return args.batch * args.iterations / (stamp - start), peak.gib, split


class IterationClock(TrainerCallback):
    """Stamps the time when TRL's training starts and after each of its PPO iterations (``on_step_end``)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def on_train_begin(self, *args, **kwargs) -> None:
        self.stamps.append(synchronized_clock(self.device))

    def on_step_end(self, *args, **kwargs) -> None:
        self.stamps.append(synchronized_clock(self.device))


def import_trl_ppo() -> tuple[type, type]:
    """TRL's ``(PPOTrainer, PPOConfig)``, or an ImportError that says which TRL releases have them.

    TRL moved its PPO trainer to ``trl.experimental.ppo`` in 1.10 and removed it in 1.13
    (huggingface/trl#7020), so the ``bench`` extra pins ``trl>=1.10,<1.13``; a newer TRL installed by hand
    would otherwise fail here with a bare ``No module named 'trl.experimental.ppo'``.
    """
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError as error:
        try:
            found = f"trl {importlib.metadata.version('trl')} is installed"
        except importlib.metadata.PackageNotFoundError:
            found = "trl is not installed"
        raise ImportError(
            f"the TRL side needs trl.experimental.ppo.PPOTrainer, which TRL 1.10 to 1.12 have ({found}; TRL removed "
            'its PPO trainer in 1.13): pip install -e ".[bench]" installs a release that has it'
        ) from error
    return PPOTrainer, PPOConfig


def run_trl(models, prompts, args, config) -> tuple[float, float | None, list[float]]:
    from datasets import Dataset

    PPOTrainer, TRLConfig = import_trl_ppo()

    tokenizer = models["tokenizer"]
    iterations = args.warmup + args.iterations
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts * iterations]})
    value_model = build_tiny_reward_model(config, seed=3).to(device=args.device)
    clock = IterationClock(args.device)
    trl_args = TRLConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=args.minibatches, num_ppo_epochs=4, response_length=args.new,
        total_episodes=args.batch * iterations, local_rollout_forward_batch_size=args.batch,
        num_sample_generations=0, report_to="none", save_strategy="no", bf16=args.bf16, kl_coef=0.05,
        temperature=1.0, stop_token=None, use_cpu=not args.device.startswith("cuda"), logging_steps=10**6,
        seed=0, dataloader_num_workers=0, gradient_checkpointing=False,  # textenv does not checkpoint either
    )  # fmt: skip
    trainer = PPOTrainer(
        args=trl_args, processing_class=tokenizer, model=copy.deepcopy(models["policy"]),
        ref_model=frozen_copy(models["reference"], args), reward_model=frozen_copy(models["reward"], args),
        train_dataset=dataset, value_model=value_model, callbacks=[clock],
    )  # fmt: skip
    peak = PeakMemory(args.device, args.cpu_memory, "TRL")
    # trainer.model: the policy and the value model
    with peak.measure(*models_of(models), trainer.model, trainer.ref_model, trainer.reward_model):
        trainer.train()
    seconds, per_iteration = timed_iterations(clock.stamps, args.warmup)
    return args.batch * args.iterations / seconds, peak.gib, per_iteration


def timed_iterations(stamps: list[float], warmup: int) -> tuple[float, list[float]]:
    """TRL's timed window and its iterations from `IterationClock`'s stamps (train start, then one per
    iteration): from the end of the last warm-up iteration (or the start) to the end of the last one.

    Like textenv's, the window is the sum of its iterations. TRL empties the CUDA cache and runs
    ``gc.collect()`` after its ``on_step_end``, so each interval holds the previous iteration's clean-up;
    the first interval with no warm-up holds none, which is one reason to compare with ``--warmup 1``.
    """
    per_iteration = [b - a for a, b in itertools.pairwise(stamps[warmup:])]
    return stamps[-1] - stamps[warmup], per_iteration


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, batch=16, new=32, repeats=None)
    parser.add_argument("--minibatches", type=int, default=1, help="minibatches per PPO epoch (both sides)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0, help="untimed whole iterations before the timed ones (both sides)")
    parser.add_argument("--cpu-memory", action="store_true", help="measure peak memory on the CPU too (slower)")
    args = parse_benchmark_args(parser, argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.batch % args.minibatches:
        parser.error("--minibatches must divide --batch")
    if args.warmup < 0 or args.iterations < 1:
        parser.error("--warmup must be >= 0 and --iterations >= 1")
    if args.cpu_memory and args.decoding == "compiled":
        parser.error("--cpu-memory counts eager tensors: use it with --decoding dynamic or static")
    torch.manual_seed(0)
    models = build(args.shape, args.prompt + args.new, args.device, torch.float32)
    config = models["policy"].config
    prompts = random_prompts(models["tokenizer"], args.batch, args.prompt)
    # TRL first: a compiled textenv run must not leave anything (compiled kernels' threads, cached memory)
    # behind that TRL's timing or peak memory would pay for.
    trl, trl_mem, trl_iterations = run_trl(models, prompts, args, config)
    gc.collect()  # TRL's trainer is gone before textenv's peak is measured
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    ours, ours_mem, split = run_textenv(models, prompts, args)
    print(f"shape={args.shape} batch={args.batch} minibatches={args.minibatches} prompt={args.prompt} new={args.new} "
          f"epochs=4 iterations={args.iterations} warmup={args.warmup} device={args.device} bf16={args.bf16} "
          f"decoding={args.decoding} defer_kl={args.defer_kl} {agent_options(args)}")  # fmt: skip
    print(f"TRL PPOTrainer : {trl:8.2f} episodes/s" + (f"  peak {trl_mem:.2f} GiB" if trl_mem is not None else ""))
    print(f"textenv PPO    : {ours:8.2f} episodes/s" + (f"  peak {ours_mem:.2f} GiB" if ours_mem is not None else "")
          + f"  (per iteration: rollout {split['rollout_seconds']:.3f} s, update {split['update_seconds']:.3f} s)")
    print(f"ratio textenv/TRL: {ours / trl:.2f}x episodes/s" + (f", {ours_mem / trl_mem:.2f}x memory" if trl_mem else ""))
    seconds = lambda times: ", ".join(f"{t:.3f}" for t in times)  # noqa: E731
    print(f"seconds per timed iteration: TRL {seconds(trl_iterations)}; textenv {seconds(split['iteration_seconds'])}")
    return {"textenv": ours, "trl": trl, "ratio": ours / trl, "textenv_mem": ours_mem, "trl_mem": trl_mem,
            "trl_iteration_seconds": trl_iterations, **split}  # fmt: skip


if __name__ == "__main__":
    main()
