"""Where a decode step's time goes: one cached forward, HF's sampling vs textenv's, the RM per step.

Explains the rollout ratio of `benchmarks/rollout.py`. Per token, HF ``generate`` runs one forward and
softmax + ``multinomial``, while textenv runs two forwards (policy and reference), inverse-CDF sampling,
and the reward model once per finished sequence, which is spread here over the decode steps.

The compiled decode step is also timed the way textenv's agents run it, with dynamo's guards checked in
full once per batch and window size and otherwise only those that tell the compiled variants apart
(``guards_once_per_batch``, see "Guards" in `textenv.static_decoding`; torch >= 2.7, else that row is
left out): the difference is what checking every guard at every step costs. Another variant keeps every
guard except those on ``nn.Module`` attributes (``guard_filter_fn=torch.compiler.
skip_guard_on_all_nn_modules_unsafe``, torch >= 2.8, a measurement only): the part of that cost the
modules' attributes (``training`` flags, hooks and the like) make. ``--shape host`` (GPT-2's 12 blocks,
almost no arithmetic) shows these host costs at GPT-2's depth.

The compiled step is timed a last way, attending to the whole static buffer at every step
(``StaticIncrementalLM(windowed=False)``) instead of a window over the columns in use: the difference is
what the attention window (`textenv.static_decoding.attention_window`) saves over one batch's steps. With
more than one window size there is more than one compiled variant, and even with guard evaluation skipped
dynamo checks the guards that tell them apart.

Sampling is timed from the policy's logits too, as a `PolicyLink` samples: the sampling distribution's
log-softmax and the inverse-CDF draw eagerly, and the same in one compiled call (`textenv.fused_sampling`,
the default of a ``compiled`` link on CUDA).

The LM head (the last hidden states times the ``V × H`` output embedding) is timed on its own, at a decode
step's rows (the batch) and at the update's (the batch × (new + 1) positions PPO's forward keeps logits
for), and again with the embedding padded by zero rows to a multiple of 64. On an H100 the head ran a
pre-Hopper kernel at GPT-2's vocabulary (50,257, not a multiple of 8), which may keep cuBLAS off its
Hopper kernels; the two rows tell whether padding the vocabulary would pay before anything pads it.

    python benchmarks/components.py --shape small --batch 64 --threads 1
    python benchmarks/components.py --shape gpt2 --prompt 64 --new 128 --batch 256 --device cuda --bf16
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.common import (  # noqa: E402
    benchmark_parser,
    build,
    parse_benchmark_args,
    random_prompts,
    timed,
    timed_alternating,
)
from textenv.fused_sampling import FusedSampler  # noqa: E402
from textenv.incremental import IncrementalLM  # noqa: E402
from textenv.rewards import RewardModelScorer  # noqa: E402
from textenv.sampling import SamplingConfig, sample_tokens, uniform_draws  # noqa: E402
from textenv.static_decoding import StaticIncrementalLM, can_skip_guards, make_decoder  # noqa: E402


def compiled_without_module_guards(model: torch.nn.Module) -> StaticIncrementalLM | None:
    """A compiled decoder whose dynamo guards skip ``nn.Module`` attributes; None if this torch cannot."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip is None:
        return None
    decoder = make_decoder(model, "compiled")
    assert isinstance(decoder, StaticIncrementalLM)
    decoder._decode = decoder._compiled_decode(guard_filter_fn=skip)
    return decoder


def padded_rows(weight: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """``weight`` (``V × H``) with zero rows appended up to a multiple of ``multiple`` rows (a copy)."""
    pad = -weight.shape[0] % multiple
    return torch.cat([weight, weight.new_zeros(pad, weight.shape[1])]) if pad else weight.clone()


def lm_head_timings(model: torch.nn.Module, rows: dict[str, int], device: str, repeats: int) -> dict[str, float]:
    """Seconds of the LM head's matmul at each row count, with the vocabulary as it is and padded to 64."""
    weight = model.get_output_embeddings().weight.detach()
    padded = padded_rows(weight)
    out: dict[str, float] = {}
    with torch.no_grad():
        for label, n in rows.items():
            hidden = torch.randn(n, weight.shape[1], device=weight.device, dtype=weight.dtype)
            heads = {"as is": functools.partial(torch.nn.functional.linear, hidden, weight),
                     "padded": functools.partial(torch.nn.functional.linear, hidden, padded)}  # fmt: skip
            for head in heads.values():
                head()  # warm-up (cuBLAS picks its kernel)
            both = timed_alternating(heads, device, repeats)
            out[f"LM head, {label}, V {weight.shape[0]}"] = both["as is"][0]
            out[f"LM head, {label}, V {padded.shape[0]} (padded)"] = both["padded"][0]
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = benchmark_parser(__doc__, shape="small", textenv=False)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (GPU)")
    args = parse_benchmark_args(parser, argv)
    models = build(args.shape, args.prompt + args.new, args.device, torch.bfloat16 if args.bf16 else torch.float32)
    tokenizer, B, steps = models["tokenizer"], args.batch, args.new - 1
    prompts = random_prompts(tokenizer, B, args.prompt)
    completions = random_prompts(tokenizer, B, args.new, seed=1)
    sequences = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    decoders = {"dynamic": IncrementalLM(models["policy"]), "compiled": make_decoder(models["policy"], "compiled")}
    logits = torch.randn(B, len(tokenizer), device=args.device)
    logprobs = torch.log_softmax(logits, -1)
    policy_logits = logits  # float32 whatever the weights: what the decode step hands over
    sampling, fused = SamplingConfig(), FusedSampler(SamplingConfig())
    fused.logprobs_and_tokens(policy_logits, uniform_draws(B, None, logits.device))  # compiles
    scorer = RewardModelScorer(models["reward"], tokenizer, batch_size=B, normalize=False)

    @torch.no_grad()
    def decode(decoder: IncrementalLM) -> None:
        decoder.start(sequences, reserve=args.new)
        for _ in range(steps):
            decoder.step(torch.full((B,), 5, device=args.device))

    # The compiled step with and without the guard check, and without the window, timed in turns: the
    # differences are small.
    whole_buffer = StaticIncrementalLM(models["policy"], compile=True, windowed=False)
    compiled_steps = {"guarded": lambda: decode(decoders["compiled"]), "whole buffer": lambda: decode(whole_buffer)}
    if (filtered := compiled_without_module_guards(models["policy"])) is not None:
        compiled_steps["module guards skipped"] = lambda: decode(filtered)
    if can_skip_guards():
        once = make_decoder(models["policy"], "compiled", guards_once_per_batch=True)
        compiled_steps["once per batch"] = lambda: decode(once)
    for run in compiled_steps.values():
        run()  # compiles
    compiled = timed_alternating(compiled_steps, args.device, args.repeats)
    ms = {
        "decode forward": timed(lambda: decode(decoders["dynamic"]), args.device, args.repeats)[0] / steps,
        "decode forward, decoding='compiled'": compiled["guarded"][0] / steps,
        **({"  the same, nn.Module guards skipped": compiled["module guards skipped"][0] / steps}
           if "module guards skipped" in compiled else {}),  # fmt: skip
        **({"  the same, guards checked once per batch": compiled["once per batch"][0] / steps}
           if "once per batch" in compiled else {}),  # fmt: skip
        "  the same, attending to the whole buffer": compiled["whole buffer"][0] / steps,
        "HF sampling (softmax + multinomial)": timed(
            lambda: torch.multinomial(torch.softmax(logits, -1), 1), args.device, args.repeats
        )[0],
        "textenv sampling (inverse CDF)": timed(lambda: sample_tokens(logprobs), args.device, args.repeats)[0],
        "  from logits: log-softmax + inverse CDF": timed(
            lambda: sample_tokens(sampling.logprobs(policy_logits)), args.device, args.repeats
        )[0],
        "  the same, fused (one compiled call)": timed(
            lambda: fused.logprobs_and_tokens(policy_logits, uniform_draws(B, None, logits.device)),
            args.device, args.repeats,
        )[0],  # fmt: skip
        "reward model, per step": timed(lambda: scorer(prompts, completions), args.device, args.repeats)[0]
        / args.new,
        **lm_head_timings(models["policy"], {f"decode step {B} rows": B, f"update {B * (args.new + 1)} rows":
                                             B * (args.new + 1)}, args.device, args.repeats),  # fmt: skip
    }
    print(f"shape={args.shape} batch={B} prompt={args.prompt} new={args.new} device={args.device} bf16={args.bf16}")
    for name, seconds in ms.items():
        print(f"{name:<44}: {1000 * seconds:8.2f} ms")
    hf = ms["decode forward"] + ms["HF sampling (softmax + multinomial)"]
    ours = 2 * ms["decode forward"] + ms["textenv sampling (inverse CDF)"] + ms["reward model, per step"]
    print(f"per step, HF generate ~ {1000 * hf:.1f} ms; textenv ~ {1000 * ours:.1f} ms + KL and bookkeeping")
    return {name: 1000 * seconds for name, seconds in ms.items()}


if __name__ == "__main__":
    main()
