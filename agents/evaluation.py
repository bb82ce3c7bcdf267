"""Evaluate a policy on held-out prompts: what RLHF papers report, measured the same way every time.

- **score**: the reward function the policy was trained on (usually the learned RM);
- **gold**: the task's hidden true reward, where there is one: the gap between score and gold is reward
  hacking;
- **kl**: per-sequence KL(π ‖ π_ref), summing the *exact* per-token KL of the two next-token distributions
  (no sampling noise beyond the visited states);
- **perplexity**: of the completions under the reference LM (fluency as the original model sees it);
- **distinct-1/2**: unique n-grams over all n-grams of the completions (diversity; collapse shows here).

The evaluation runs its own vector env (sharing the models, with a fixed β of 0 so the adaptive
controller of a training env is untouched) and its own seeded generator, so it never perturbs training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from textenv.kl import FixedKLController
from textenv.policy_link import PolicyLink
from textenv.rewards import RewardFunction, join_text
from textenv.sampling import SamplingConfig
from textenv.vector_env import TextGenerationVectorEnv


@dataclass
class EvalResult:
    """Means over the evaluated prompts, plus the samples themselves."""

    score: float
    kl: float
    perplexity: float
    distinct_1: float
    distinct_2: float
    length: float
    gold: float | None = None
    gold_std: float | None = None
    samples: list[dict] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float | None]:
        return {k: v for k, v in asdict(self).items() if k != "samples"}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over whitespace words of all texts (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def evaluate_policy(
    policy: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reward_fn: RewardFunction | Callable,
    prompts: Sequence[str],
    max_prompt_tokens: int,
    max_new_tokens: int,
    gold_reward: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 64,
    join: Callable[[str, str], str] = join_text,
) -> EvalResult:
    """Sample one completion per prompt from ``policy`` and measure it (see the module docstring).

    :param policy: the LM to evaluate (``reference`` itself gives the before-training baseline).
    :param reference: the frozen reference LM the KL and perplexity are measured against.
    """
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    generator = torch.Generator().manual_seed(seed)
    scores, kls, ref_lps, lengths, samples = [], [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        env = TextGenerationVectorEnv(
            reference, reward_fn, chunk, num_envs=len(chunk), tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens, kl_coef=FixedKLController(0.0), kl_estimator="full",
            autoreset_mode="Disabled", join=join,
        )  # fmt: skip
        link = env.bind_policy(PolicyLink(policy, sampling, pad_token_id=env.engine.pad_id))
        env.reset(options={"prompts": chunk, "defer_scores": True})  # one reward call per chunk
        kl = np.zeros(len(chunk))
        ref_lp_sum = np.zeros(len(chunk))
        score = np.zeros(len(chunk))
        while not env.done.all():
            assert link is not None
            # Drawn on the policy's device (the generator's uniform numbers are copied there): a copy of the
            # whole distribution to the host would be a wait and B × V floats per step on a GPU.
            _, _, _, _, info = env.step(link.sample(generator))
            active = info["_kl"]
            kl[active] += info["kl"][active]
            ref_lp_sum[active] += info["ref_logprob"][active]
            if "score" in info:
                score[info["_score"]] = info["score"][info["_score"]]
        n_tokens = env.engine.gen_len.cpu().numpy()
        completions = env.engine.completion_texts(range(len(chunk)))
        for r, prompt in enumerate(env.engine.prompts):
            samples.append({"prompt": prompt.text, "completion": completions[r], "score": float(score[r]), "kl": float(kl[r])})  # type: ignore[union-attr]
        scores.append(score)
        kls.append(kl)
        ref_lps.append(ref_lp_sum)
        lengths.append(n_tokens)
    score, kl, ref_lp, length = (np.concatenate(x) for x in (scores, kls, ref_lps, lengths))
    texts = [s["completion"] for s in samples]
    result = EvalResult(
        score=float(score.mean()),
        kl=float(kl.mean()),
        perplexity=float(np.exp(-ref_lp.sum() / max(length.sum(), 1))),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        length=float(length.mean()),
        samples=samples,
    )
    if gold_reward is not None:
        gold = np.asarray(gold_reward([s["prompt"] for s in samples], texts), dtype=float)
        for s, g in zip(samples, gold, strict=True):
            s["gold"] = float(g)
        result.gold, result.gold_std = float(gold.mean()), float(gold.std())
    return result
