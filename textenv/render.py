"""ANSI rendering of an episode: the prompt, then each generated token with its reward and KL.

Reading an episode token by token is how people learn what the KL penalty does (which tokens the
reference finds surprising) and where the reward arrives (only at the last token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from textenv.episodes import EpisodeBatch, TokenRecord

BOLD, DIM, GREEN, RED, RESET = "\x1b[1m", "\x1b[2m", "\x1b[32m", "\x1b[31m", "\x1b[0m"


def render_episode(
    prompt: str,
    tokens: Sequence[TokenRecord],
    decode_token: Callable[[int], str],
    kl_coef: float,
    score: float | None = None,
    color: bool = True,
) -> str:
    """A terminal-readable view of one episode (finished or not)."""
    b, d, g, r, x = (BOLD, DIM, GREEN, RED, RESET) if color else ("",) * 5
    lines = [f"{b}prompt{x}: {prompt}"]
    completion = " ".join(decode_token(t.token_id) for t in tokens)
    lines.append(f"{b}completion{x}: {completion}")
    lines.append(f"{d}{'step':>4}  {'token':<14}{'ref logp':>10}{'KL':>9}{'reward':>10}{x}")
    for i, t in enumerate(tokens):
        colour = g if t.reward > 0 else r if t.reward < 0 else ""
        lines.append(
            f"{i:>4}  {decode_token(t.token_id)[:13]:<14}{t.ref_logprob:>10.3f}{t.kl:>9.3f}{colour}{t.reward:>10.3f}{x}"
        )
    total_kl = sum(t.kl for t in tokens)
    total = sum(t.reward for t in tokens)
    summary = f"β={kl_coef:.4g}  Σ KL={total_kl:.3f}  return={total:.3f}"
    if score is not None:
        summary = f"score={score:.3f}  " + summary
    lines.append(f"{b}{summary}{x}")
    return "\n".join(lines) + "\n"


def token_label(tokenizer) -> Callable[[int], str]:
    """How one token id is shown (special tokens visible, ids past the tokenizer as ``<id>``)."""

    def label(token_id: int) -> str:
        if token_id >= len(tokenizer):
            return f"<{token_id}>"
        return str(tokenizer.convert_ids_to_tokens(token_id))

    return label


def render_row(engine: EpisodeBatch, row: int, color: bool = True) -> str:
    """The ANSI view of one row of an `EpisodeBatch` (single env: row 0; vector env: each row)."""
    prompt = engine.prompts[row]
    score = engine.last_scores[row]
    return render_episode(
        prompt.text if prompt is not None else "",
        engine.history[row],
        token_label(engine.tokenizer),
        engine.kl_controller.value,
        None if score != score else float(score),
        color,
    )
