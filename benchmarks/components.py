"""Where a decode step's time goes: one cached forward, HF's sampling vs textenv's, the RM per step.

Explains the rollout ratio of `benchmarks/rollout.py`. Per token, HF ``generate`` runs one forward and
softmax + ``multinomial``, while textenv runs two forwards (policy and reference), inverse-CDF sampling,
and the reward model once per finished sequence, which is spread here over the decode steps.

The compiled decode step is also timed with dynamo's guard evaluation skipped
(``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): the difference is what checking the
compiled graph's guards costs per call. Skipping them is unsafe in a real run (a changed autocast state,
train/eval mode or cache shape would reuse the wrong graph), so this is a measurement only. It needs
torch >= 2.7; with an older torch that row is left out. A third variant keeps every guard except those on
``nn.Module`` attributes (``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe``, torch >=
2.8): the part of the guard cost that the modules' attributes (``training`` flags and the like) make.

The compiled step is timed a last way, attending to the whole static buffer at every step
(``StaticIncrementalLM(windowed=False)``) instead of a window over the columns in use: the difference is
what the attention window (`textenv.static_decoding.attention_window`) saves over one batch's steps. With
more than one window size there is more than one compiled variant, and even with guard evaluation skipped
dynamo checks the guards that tell them apart.

    python benchmarks/components.py --shape small --batch 64 --threads 1
    python benchmarks/components.py --shape gpt2 --prompt 64 --new 128 --batch 256 --device cuda --bf16
"""

from __future__ import annotations

import inspect
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
from textenv.incremental import IncrementalLM  # noqa: E402
from textenv.rewards import RewardModelScorer  # noqa: E402
from textenv.sampling import sample_tokens  # noqa: E402
from textenv.static_decoding import StaticIncrementalLM, make_decoder  # noqa: E402


def can_skip_guards() -> bool:
    """Whether this torch's ``set_stance`` can skip guard evaluation (torch >= 2.7)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance is not None and "skip_guard_eval_unsafe" in inspect.signature(set_stance).parameters


def compiled_without_module_guards(model: torch.nn.Module) -> StaticIncrementalLM | None:
    """A compiled decoder whose dynamo guards skip ``nn.Module`` attributes; None if this torch cannot."""
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip is None:
        return None
    decoder = make_decoder(model, "compiled")
    assert isinstance(decoder, StaticIncrementalLM)
    decoder._decode = decoder._compiled_decode(guard_filter_fn=skip)
    return decoder


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
    scorer = RewardModelScorer(models["reward"], tokenizer, batch_size=B, normalize=False)

    @torch.no_grad()
    def decode(decoder: IncrementalLM) -> None:
        decoder.start(sequences, reserve=args.new)
        for _ in range(steps):
            decoder.step(torch.full((B,), 5, device=args.device))

    def decode_without_guards() -> None:
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            decode(decoders["compiled"])

    # The compiled step with and without the guard check, and without the window, timed in turns: the
    # differences are small.
    whole_buffer = StaticIncrementalLM(models["policy"], compile=True, windowed=False)
    compiled_steps = {"guarded": lambda: decode(decoders["compiled"]), "whole buffer": lambda: decode(whole_buffer)}
    if (filtered := compiled_without_module_guards(models["policy"])) is not None:
        compiled_steps["module guards skipped"] = lambda: decode(filtered)
    if can_skip_guards():
        compiled_steps["unguarded"] = decode_without_guards
    for run in compiled_steps.values():
        run()  # compiles
    compiled = timed_alternating(compiled_steps, args.device, args.repeats)
    ms = {
        "decode forward": timed(lambda: decode(decoders["dynamic"]), args.device, args.repeats)[0] / steps,
        "decode forward, decoding='compiled'": compiled["guarded"][0] / steps,
        **({"  the same, nn.Module guards skipped": compiled["module guards skipped"][0] / steps}
           if "module guards skipped" in compiled else {}),  # fmt: skip
        **({"  the same, guards not checked": compiled["unguarded"][0] / steps} if "unguarded" in compiled else {}),
        "  the same, attending to the whole buffer": compiled["whole buffer"][0] / steps,
        "HF sampling (softmax + multinomial)": timed(
            lambda: torch.multinomial(torch.softmax(logits, -1), 1), args.device, args.repeats
        )[0],
        "textenv sampling (inverse CDF)": timed(lambda: sample_tokens(logprobs), args.device, args.repeats)[0],
        "reward model, per step": timed(lambda: scorer(prompts, completions), args.device, args.repeats)[0]
        / args.new,
    }
    print(f"shape={args.shape} batch={B} prompt={args.prompt} new={args.new} device={args.device} bf16={args.bf16}")
    for name, seconds in ms.items():
        print(f"{name:<42}: {1000 * seconds:8.2f} ms")
    hf = ms["decode forward"] + ms["HF sampling (softmax + multinomial)"]
    ours = 2 * ms["decode forward"] + ms["textenv sampling (inverse CDF)"] + ms["reward model, per step"]
    print(f"per step, HF generate ~ {1000 * hf:.1f} ms; textenv ~ {1000 * ours:.1f} ms + KL and bookkeeping")
    return {name: 1000 * seconds for name, seconds in ms.items()}


if __name__ == "__main__":
    main()
