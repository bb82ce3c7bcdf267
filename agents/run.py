"""A training run in a folder, resumable exactly: PPO and every baseline share this format.

Any agent with this shape can be driven (`agents.ppo.PPOAgent` and the baselines in `agents/` have it):
``policy`` (an ``nn.Module`` whose ``.lm`` is the causal LM; checkpointed whole), ``optimizer``,
``generator`` (the torch RNG it samples with), ``env`` (a `TextGenerationVectorEnv`), ``iteration``,
``iteration_step() -> dict`` (one rollout + update, returning statistics with at least ``score``, ``kl``
and ``kl_coef``) and ``config_dict() -> dict``.

The folder holds what a person wants after a run and what a crash must not lose:

- ``config.json``: the agent's config and the run's settings;
- ``metrics.jsonl``: one line of statistics per iteration (also written to TensorBoard under ``tb/``);
- ``plots/``: PNGs of RM score, gold reward, KL and β over iterations;
- ``eval_before.json`` / ``eval_after.json`` and ``samples_before.jsonl`` / ``samples_after.jsonl``;
- ``checkpoint-NNNNNN/`` every N iterations (see `agents.checkpoint`): policy + value head (a LoRA policy's
  adapters, not its frozen base), optimizer, sampling RNG, the env's prompt RNGs and KL controller, and a
  PPO-ptx batch source's RNG if it has ``state_dict`` (`agents.pretraining_batches.PretrainingBatches`);
  ``resume=True`` restores them all, so a killed run continues with the same metrics as one that never
  stopped (on CPU);
- ``policy/``: the final policy LM and tokenizer via ``save_pretrained``, and ``value_head.safetensors``.
  A LoRA policy (peft) is saved with its adapters merged in (on the host: `agents.lora_weights`), so the
  folder loads as a plain LM anywhere, and its adapters alone go to ``policy_adapter/`` (peft's format, for
  `peft.PeftModel.from_pretrained`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tqdm.auto import tqdm

from agents.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_json_atomic
from agents.evaluation import EvalResult
from agents.lora_weights import save_merged_lora
from agents.plots import plot_metrics

TIMING_KEYS = ("seconds", "rollout_seconds", "update_seconds", "tokens_per_s", "rollout_tokens_per_s")


class TrainingRun:
    """Drive an agent (see the module docstring) for a number of iterations with a run folder.

    :param agent: the agent (policy, env, config).
    :param run_dir: the folder (created if missing).
    :param checkpoint_every: write a checkpoint every this many iterations (and at the end).
    :param evaluate: optional ``fn(lm) -> EvalResult`` run before and after training on held-out prompts.
    :param extra_config: more settings to record in ``config.json`` (task, model paths, …).
    """

    def __init__(
        self,
        agent: Any,
        run_dir: str | Path,
        checkpoint_every: int = 5,
        evaluate: Callable[[Any], EvalResult] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.agent = agent
        self.run_dir = Path(run_dir)
        self.checkpoint_every = checkpoint_every
        self.evaluate = evaluate
        self.extra_config = extra_config or {}
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------------------------ state
    def _save(self) -> Path:
        env = self.agent.env
        state = {
            "row_rngs": [rng.bit_generator.state for rng in env._row_rngs],
            "kl_controller": env.kl_controller.state_dict(),
        }
        rng = {"sampling": self.agent.generator.get_state()}
        ptx = self._stateful_ptx_batches()
        if ptx is not None:
            rng.update({f"ptx.{k}": v for k, v in ptx.state_dict().items()})
        return save_checkpoint(self.run_dir, self.agent.iteration, self.agent.policy, self.agent.optimizer, rng, state)

    def _stateful_ptx_batches(self) -> Any:
        """The agent's PPO-ptx batch source if it can be checkpointed (``state_dict``, as
        `agents.pretraining_batches.PretrainingBatches`); a plain callable's randomness is its own."""
        ptx = getattr(self.agent, "ptx_batches", None)
        return ptx if hasattr(ptx, "state_dict") and hasattr(ptx, "load_state_dict") else None

    def _restore(self) -> int:
        path = latest_checkpoint(self.run_dir)
        if path is None:  # killed before its first checkpoint: start over, dropping any metrics lines
            self.metrics_path.unlink(missing_ok=True)
            return 0
        rng, state = load_checkpoint(path, self.agent.policy, self.agent.optimizer)
        self.agent.generator.set_state(rng["sampling"])
        ptx = self._stateful_ptx_batches()
        saved_ptx = {k.removeprefix("ptx."): v for k, v in rng.items() if k.startswith("ptx.")}
        if ptx is not None and saved_ptx:
            ptx.load_state_dict(saved_ptx)
        env = self.agent.env
        for generator, saved in zip(env._row_rngs, state["row_rngs"], strict=True):
            generator.bit_generator.state = saved
        env.kl_controller.load_state_dict(state["kl_controller"])
        self.agent.iteration = int(state["iteration"])
        # Metrics written after the checkpoint belong to iterations that will run again.
        if self.metrics_path.exists():
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["iteration"] <= self.agent.iteration]
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
        return self.agent.iteration

    def read_metrics(self) -> list[dict[str, float]]:
        """Every iteration's statistics recorded so far."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(ln) for ln in self.metrics_path.read_text().splitlines() if ln.strip()]

    # ------------------------------------------------------------------------------ the loop
    def train(self, iterations: int, resume: bool = False, progress: bool = True) -> list[dict[str, float]]:
        """Run until ``iterations`` iterations are done in total; returns all metrics of the run."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        done = self._restore() if resume else 0
        if not resume and self.metrics_path.exists():
            raise FileExistsError(f"{self.run_dir} already holds a run; pass resume=True or choose a new folder")
        write_json_atomic(
            self.run_dir / "config.json",
            {"agent": type(self.agent).__name__, "config": self.agent.config_dict(), "iterations": iterations, "checkpoint_every": self.checkpoint_every,
             "num_envs": self.agent.env.num_envs, "max_new_tokens": self.agent.env.engine.max_new_tokens,
             **self.extra_config},
        )  # fmt: skip
        if self.evaluate is not None and done == 0:
            self._write_eval("before", self.evaluate(self.agent.policy.lm))
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=done + 1)
        bar = tqdm(total=iterations, initial=done, desc=type(self.agent).__name__, disable=not progress, unit="it")
        with self.metrics_path.open("a") as metrics_file:
            while self.agent.iteration < iterations:
                stats = self.agent.iteration_step()
                metrics_file.write(json.dumps(stats) + "\n")
                metrics_file.flush()
                for key, value in stats.items():
                    writer.add_scalar(f"train/{key}", value, self.agent.iteration)
                bar.update(1)
                bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.2f}", beta=f"{stats['kl_coef']:.3f}")
                if self.agent.iteration % self.checkpoint_every == 0 or self.agent.iteration == iterations:
                    self._save()
        bar.close()
        writer.close()
        metrics = self.read_metrics()
        plot_metrics(metrics, self.run_dir / "plots")
        self._save_policy()
        if self.evaluate is not None:
            self._write_eval("after", self.evaluate(self.agent.policy.lm))
        return metrics

    def _write_eval(self, when: str, result: EvalResult) -> None:
        write_json_atomic(self.run_dir / f"eval_{when}.json", result.metrics())
        with (self.run_dir / f"samples_{when}.jsonl").open("w") as handle:
            for sample in result.samples:
                handle.write(json.dumps(sample) + "\n")

    def _save_policy(self) -> None:
        out = self.run_dir / "policy"
        lm = self.agent.policy.lm
        if hasattr(lm, "merge_and_unload"):  # peft (LoRA): the adapters alone, then a plain LM with them merged
            lm.save_pretrained(self.run_dir / "policy_adapter")
            save_merged_lora(lm, out)  # merged on the host: the agent's own model keeps its adapters
        else:
            lm.save_pretrained(out)
        self.agent.env.tokenizer.save_pretrained(out)
        head = self.agent.policy.value_head
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(out / "value_head.safetensors"))
