"""Static-shape incremental decoding: a preallocated KV cache, optionally with a compiled decode step.

`IncrementalLM` grows a `DynamicCache` by one column per token (a ``torch.cat`` per layer) and every decode
forward runs eagerly, one Python-dispatched kernel at a time. On a GPU that is launch-bound: a GPT-2-small
step is ~15 ms of launches for well under 1 ms of work. The cure transformers itself uses for
``generate`` is a `StaticCache` (fixed-size buffers written in place) plus ``torch.compile`` of the decode
forward; with every shape fixed, ``mode="reduce-overhead"`` replays the whole step as one CUDA graph.

`StaticIncrementalLM` is that cure for textenv's batches of restartable rows:

- the cache holds ``capacity`` columns per row; the attention mask is ``(B, capacity)`` (or a window of
  it, below) with 1 on the real tokens, so the decode forward has the same shapes from step to step;
- all rows write their next token at the same column (the cache's ``cumulative_length``), exactly as in
  the dynamic cache, and positions still come from the mask, so outputs match the dynamic path;
- a restarted row is prefilled on its own and copied in right-aligned with the write column; when the
  buffer fills, the leading columns no row attends to are dropped by an in-place shift (the buffers keep
  their addresses, which CUDA graphs need), and if that frees too little the buffer doubles once.
- the used columns are always a prefix of the buffer, so a decode step's attention can read only a prefix
  window of it (`attention_window`: the next power of two at or past the used columns, 64 at least), not
  all ``capacity`` columns. Attention at one query reads every key it is given, so without the window a
  step's cost follows the capacity (the response length the batch reserves) instead of the columns in
  use: on the CPU, a `small` step at batch 64 took 22 ms with 80 columns and 58 ms with 1,040, and 20 ms
  with 1,040 and the window. On the CPU a strided prefix of the buffer costs more per column than a whole
  contiguous buffer, so there the window is used only when it at most halves the columns
  (`max_window_fraction`). On CUDA it is used whenever it is narrower than the buffer; that is not measured
  on a GPU yet (`benchmarks/components.py` times the compiled step both ways).

``decoding="compiled"`` compiles the decode forward (static shapes): on CUDA with
``mode="reduce-overhead"`` (CUDA graphs), on CPU with inductor's default mode. Compiling costs seconds per
model and shape once, so it pays for long runs and benchmarks, not for a single short episode.

Guards. Before every call of a compiled function, dynamo checks that what it assumed when compiling still
holds: each parameter's and buffer's shape and dtype, every module's ``training`` flag and the other
attributes the forward read, the autocast and grad mode. (Not forward hooks: dynamo skips those guards by
default, so a compiled step never sees a hook added after it compiled.) For a 12-block model that is
hundreds of checks: 0.10-0.15 ms per call on this project's CPU (`benchmarks/components.py --shape host`).
Where a step's time is the host's, as we expect of a GPT-2-small step at batch 64 on a GPU, the whole step
waits for them. With ``guards_once_per_batch`` a decoder checks them in full at the first step of each
window size after each `start` or `replace_rows`, and for the rest of the batch only the guards that tell
its compiled variants apart (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, torch >= 2.7).

That is sound when no module attribute changes within a batch, which the caller promises: textenv's
agents (whose batches run from reset to end with no update in between) and the env's frozen reference do;
a default `PolicyLink` does not, and checks every guard at every step. What the promise does not cover is
still checked:
- a change between batches (``train()``, an attribute) is seen at the next batch's first step;
- the global state (autocast, grad mode) is compared at every step with the one the checks were made in
  (dynamo's own ``GlobalStateGuard``, under a microsecond), and a change means a full check again: the
  env's reference steps in whatever autocast surrounds ``env.step``. Other context that check does not
  cover (``inference_mode``, a ``TorchFunctionMode``) makes the skipped check refuse the call before it
  runs anything, and the step is then checked in full;
- a cache with other layer types (a sliding window, whose layers count steps in Python) never skips;
- in-place weight updates are never guarded, so they need no check;
- under a caller's own compiler stance (``set_stance("force_eager")`` while debugging, say) every step runs
  as that stance says;
- skipping is only sound within one compiled graph (after a graph break the later frames' code is shared
  with other decoders), so such a decoder compiles with ``fullgraph=True``; what that refuses (a graph
  break, data-dependent control flow, `RECOMPILE_LIMIT` variants) turns it back to the usual compile, with
  a warning, and the skipping off.
A module attribute changed within a batch (``train()`` between two steps) is not seen until the next batch.
With NextStep autoreset every restart (`replace_rows`) starts the checks over, so little is saved there.
"""

from __future__ import annotations

import inspect
import types
import warnings
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer

from textenv.compile_cache import FULLGRAPH_REFUSALS, own_code_copy
from textenv.host_transfer import index_on
from textenv.incremental import DEFAULT_RESERVE, IncrementalLM, StepOutput
from textenv.models import pad_left_to, position_ids_from_mask

DECODINGS = ("dynamic", "static", "compiled")
"""How `make_decoder` runs the decode step: growing cache (eager), static cache (eager), static + compiled."""


class DtypeStableStaticLayer(StaticLayer):
    """A `StaticLayer` that stores in its buffers' dtype and answers in the caller's.

    The buffers take the dtype of the prefill that allocates them; a decoder stepped in another autocast
    state (a `PolicyLink` prefills and steps in its own ``autocast``, but a caller driving a decoder may not)
    would hand bf16 keys to float32 buffers, and ``index_copy_`` refuses mixed dtypes (the dynamic cache's
    ``torch.cat`` promotes instead). This layer casts what it stores to the buffers' dtype, and what it
    returns to the new keys' dtype, so attention sees one dtype whichever way the autocast state changed
    (at the cost of converting the window at every step: prefill in the autocast you step in).
    """

    window: int | None = None
    """Attention reads only the first ``window`` columns (all when None); see `StaticIncrementalLM.step`."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        dtype = key_states.dtype
        if self.is_initialized:
            key_states, value_states = key_states.to(self.keys.dtype), value_states.to(self.values.dtype)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.window is not None:  # views of a prefix: the writes above still go to the whole buffer
            keys, values = keys[:, :, : self.window], values[:, :, : self.window]
        return keys.to(dtype), values.to(dtype)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The key length the attention mask must have: the window's, as the keys returned by `update`."""
        return (self.max_cache_len if self.window is None else self.window), 0


def new_static_cache(model: PreTrainedModel, capacity: int) -> StaticCache:
    """A transformers `StaticCache` of ``capacity`` columns whose full-attention layers keep one dtype."""
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    cache.layers = [
        DtypeStableStaticLayer(max_cache_len=capacity) if type(layer) is StaticLayer else layer
        for layer in cache.layers
    ]
    return cache


MIN_ATTENTION_WINDOW = 64
"""The narrowest attention window: short prompts share one compiled variant, where a few columns save little."""


def attention_window(columns: int, capacity: int, max_fraction: float = 1.0) -> int:
    """Columns a decode step attends to when ``columns`` are in use: the next power of two, 64 at least.

    A compiled step has one variant per window size (compiled when first reached), so the sizes are few: one
    per doubling. A window wider than ``max_fraction × capacity`` gives way to the whole buffer. The prompt's
    columns are in use from the first step, so a batch reaches only the sizes between its prompt and its
    prompt plus response: a 64-token prompt with 128 new tokens (capacity 192) attends to 128 columns for its
    first 64 decode steps and to all 192 after (with ``max_fraction`` 1).
    """
    window = max(MIN_ATTENTION_WINDOW, 1 << (columns - 1).bit_length())
    return window if window <= min(max_fraction, 1.0) * capacity else capacity


def default_max_window_fraction(device: torch.device) -> float:
    """Any narrower window on CUDA; on the CPU, only one that halves the columns (see the module docstring)."""
    return 1.0 if device.type == "cuda" else 0.5


RECOMPILE_LIMIT = 128
"""Compiled variants (batch × cache capacity × attention window × autocast) one decoder keeps before dynamo
runs it eagerly (a ``guards_once_per_batch`` decoder, compiled with ``fullgraph``, first falls back to the
usual compile). Capacities only grow within a decoder and windows are one per doubling, so a run reaches a
few tens at most."""


def can_skip_guards() -> bool:
    """Whether this torch can skip guard evaluation (``set_stance(skip_guard_eval_unsafe=...)``, torch >= 2.7)
    and check dynamo's global-state guard on its own (``GlobalStateGuard``)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return (
        set_stance is not None
        and "skip_guard_eval_unsafe" in inspect.signature(set_stance).parameters
        and hasattr(getattr(torch._C, "_dynamo", None), "guards")
        and hasattr(torch._C._dynamo.guards, "GlobalStateGuard")
    )


def in_default_stance() -> bool:
    """Whether ``torch.compile`` runs in its default stance, with no backend forced (read from dynamo's state:
    torch has no public getter). Another stance is the caller's, for the guard skipping not to override."""
    stance = getattr(getattr(torch._dynamo, "eval_frame", None), "_stance", None)
    return getattr(stance, "stance", None) == "default" and getattr(stance, "backend", "unknown") is None


def default_compile_mode(device: torch.device) -> str:
    """CUDA graphs on CUDA (the launch overhead is the cost there); inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


class StaticIncrementalLM(IncrementalLM):
    """`IncrementalLM` over a preallocated `StaticCache`; same interface, same outputs.

    :param model: a Hugging Face causal LM whose forward accepts a transformers `Cache`.
    :param output_hidden_states: also return the last-layer hidden state of the newest position.
    :param pad_token_id: id written into padding columns (never attended to).
    :param compile: compile the decode forward with ``torch.compile`` (static shapes).
    :param compile_mode: ``torch.compile`` mode; default `default_compile_mode` of the model's device.
    :param windowed: attend to a prefix window of the buffer that covers the used columns (`attention_window`);
        False reads all ``capacity`` columns at every step (one compiled variant; the benchmarks compare both).
    :param max_window_fraction: the widest window, as a fraction of the capacity in (0, 1], used instead of
        the whole buffer; default `default_max_window_fraction` of the model's device.
    :param guards_once_per_batch: with ``compile``, check the compiled step's guards in full only at the first
        step of each window size after each `start` or `replace_rows` (see "Guards" in the module docstring).
        Only for callers that change no module attribute (``training`` flags and the like) between those calls
        and the steps that follow them; what else the guards cover is still checked.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        output_hidden_states: bool = False,
        pad_token_id: int = 0,
        compile: bool = False,
        compile_mode: str | None = None,
        windowed: bool = True,
        max_window_fraction: float | None = None,
        guards_once_per_batch: bool = False,
    ) -> None:
        super().__init__(model, output_hidden_states, pad_token_id)
        if self._cache_kw != "cache":
            raise ValueError(
                "static decoding needs a model whose forward takes transformers' `cache=` argument "
                "(transformers >= 5); use decoding='dynamic' for this model"
            )
        self.compile = compile
        self.windowed = windowed
        if max_window_fraction is not None and not 0 < max_window_fraction <= 1:
            raise ValueError(f"max_window_fraction must be in (0, 1], got {max_window_fraction}")
        self.max_window_fraction = max_window_fraction or default_max_window_fraction(self.device)
        self.compile_mode = compile_mode or default_compile_mode(self.device)
        # The torch.compile modes that replay CUDA graphs, whose outputs live in memory the next replay reuses.
        self._cuda_graphs = compile and self.compile_mode in ("reduce-overhead", "max-autotune")
        self.cache: StaticCache | None = None  # type: ignore[assignment]
        self.length = 0  # the column the next token is written to (= columns in use)
        self.guards_once_per_batch = guards_once_per_batch and compile and can_skip_guards()
        self._guarded_windows: set[int | None] = set()  # window sizes whose guards were checked in this batch
        self._global_state = None  # dynamo's check of the global state those checks were made in
        self._fullgraph = self.guards_once_per_batch  # see `_checked_decode`
        self._decode = self._compiled_decode(fullgraph=self._fullgraph) if compile else self._eager_decode
        self.compactions = 0  # in-place shifts when the buffer filled (counted for tests)

    @property
    def _static_layers(self) -> bool:
        """Every cache layer is a `DtypeStableStaticLayer` (what windows and skipped guards rely on)."""
        return self.cache is not None and all(isinstance(layer, DtypeStableStaticLayer) for layer in self.cache.layers)

    @property
    def capacity(self) -> int:
        return 0 if self.cache_mask is None else self.cache_mask.shape[1]

    # ------------------------------------------------------------------------------- decode forward
    def _eager_decode(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True,
            output_hidden_states=self.output_hidden_states, logits_to_keep=1,
        )  # fmt: skip
        hidden = out.hidden_states[-1][:, -1] if self.output_hidden_states else None
        return out.logits[:, -1], hidden

    def _compiled_decode(self, guard_filter_fn=None, fullgraph: bool = False):
        """The decode forward compiled for this decoder alone (`textenv.compile_cache`); ``guard_filter_fn``
        (torch.compile's option) drops some of dynamo's guards, which `benchmarks/components.py` measures;
        rollouts never pass it."""
        decode = types.MethodType(own_code_copy(StaticIncrementalLM._eager_decode), self)
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        # Not fullgraph unless guards are checked once per batch: like transformers' own CompileConfig, a graph
        # break then costs speed, not the run (TORCH_LOGS=graph_breaks,recompiles shows them;
        # benchmarks/gpu_suite.sh sets it).
        if guard_filter_fn is None:
            return torch.compile(decode, mode=self.compile_mode, dynamic=False, fullgraph=fullgraph)
        # torch.compile takes a mode or options, not both: the mode's own options, plus the filter.
        options = {**torch._inductor.list_mode_options(self.compile_mode), "guard_filter_fn": guard_filter_fn}
        return torch.compile(decode, dynamic=False, fullgraph=fullgraph, options=options)

    def _checked_decode(self, window: int | None, *inputs: torch.Tensor):
        """The decode forward with dynamo's guards checked in full, or (``guards_once_per_batch``) only those that
        tell the compiled variants apart once this window size was checked in this batch and the global state
        (autocast, grad mode, ...) is the one it was checked in.

        Only a cache whose layers are all `DtypeStableStaticLayer` skips: others (a sliding window) keep Python
        counters that change every step, which only the full check sees. Skipping is only sound in one compiled
        graph (after a graph break the later frames' code is shared with other decoders), so this decoder
        compiles with ``fullgraph=True``; what that refuses (a graph break, data-dependent control flow,
        `RECOMPILE_LIMIT` variants) turns it back to the usual compile, with a warning, and stops the skipping.
        """
        once = self.guards_once_per_batch and self._static_layers and in_default_stance()  # keep a caller's stance
        if once and window in self._guarded_windows and self._global_state is not None and self._global_state.check():
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return self._decode(*inputs)
            except RuntimeError as error:  # state no per-step check covers (inference_mode, a TorchFunctionMode)
                if "skip_guard_eval_unsafe" not in str(error):
                    raise
                self._guarded_windows.clear()  # raised before running anything: check in full below
        try:
            out = self._decode(*inputs)
        except FULLGRAPH_REFUSALS as error:
            if not self._fullgraph:
                raise
            warnings.warn(
                f"the compiled decode step of {type(self.model).__name__} cannot be one graph "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); it is compiled as "
                "usual and its guards are checked at every step",
                stacklevel=4,
            )
            self.guards_once_per_batch = self._fullgraph = False
            self._decode = self._compiled_decode()
            return self._decode(*inputs)
        if once:
            if self._global_state is None or not self._global_state.check():
                self._guarded_windows.clear()  # checked in other global state: those checks no longer hold
                self._global_state = torch._C._dynamo.guards.GlobalStateGuard()
            self._guarded_windows.add(window)
        return out

    # ------------------------------------------------------------------------------- cache buffers
    def _new_cache(self, batch: int, capacity: int) -> None:
        """Allocate the static buffers (and their mask), reusing the current ones when shapes match."""
        if self.cache is not None and self.batch_size == batch and self.capacity == capacity:
            self.cache_mask.zero_()  # type: ignore[union-attr]
        else:
            self.cache = new_static_cache(self.model, capacity)
            self.cache_mask = torch.zeros((batch, capacity), dtype=torch.long, device=self.device)
        self._set_length(0)

    def _set_length(self, length: int) -> None:
        """Move the write column of every layer (in place: compiled graphs hold these tensors' addresses)."""
        assert self.cache is not None
        self.length = length
        for layer in self.cache.layers:
            if not hasattr(layer, "cumulative_length"):
                raise RuntimeError("this transformers version's StaticCache has no cumulative_length")
            if isinstance(layer.cumulative_length, torch.Tensor):
                layer.cumulative_length.fill_(length)
            else:
                layer.cumulative_length = length

    def _set_window(self, window: int | None) -> None:
        """Make every layer's attention read its first ``window`` columns (None: all of them)."""
        assert self.cache is not None
        for layer in self.cache.layers:
            if isinstance(layer, DtypeStableStaticLayer):
                layer.window = window

    def _step_window(self) -> int | None:
        """The columns the next decode step attends to; None (all) unless every layer can be windowed."""
        assert self.cache is not None
        if not self.windowed or not self._static_layers:
            return None  # sliding-window or other layer types keep transformers' own sizes
        window = attention_window(self.length + 1, self.capacity, self.max_window_fraction)
        return None if window >= self.capacity else window  # the whole buffer: no slices, the unwindowed variant

    def _initialized_layers(self) -> list:
        assert self.cache is not None
        return [layer for layer in self.cache.layers if getattr(layer, "is_initialized", True)]

    def _shift_left(self, first: int) -> None:
        """Drop columns ``[0, first)``: move the used columns to the front of the same buffers."""
        used = self.length - first
        assert self.cache_mask is not None
        self.cache_mask[:, :used] = self.cache_mask[:, first : self.length].clone()
        self.cache_mask[:, used:] = 0
        for layer in self._initialized_layers():
            for tensor in (layer.keys, layer.values):
                tensor[:, :, :used] = tensor[:, :, first : self.length].clone()
        self._set_length(used)
        self.compactions += 1

    def _shift_right(self, by: int) -> None:
        """Open ``by`` empty columns at the front (a restarted row's prompt is longer than the used part)."""
        assert self.cache_mask is not None
        end = self.length + by
        assert end <= self.capacity, "make room first"
        self.cache_mask[:, by:end] = self.cache_mask[:, : self.length].clone()
        self.cache_mask[:, :by] = 0
        for layer in self._initialized_layers():
            for tensor in (layer.keys, layer.values):
                tensor[:, :, by:end] = tensor[:, :, : self.length].clone()
        self._set_length(end)

    def _ensure_room(self, columns: int) -> None:
        """Make ``columns`` free columns after the write column: shift out dead columns, or grow once."""
        assert self.cache_mask is not None
        if self.length + columns <= self.capacity:
            return
        live = self.cache_mask[:, : self.length].any(dim=0).nonzero()  # one host sync, only when full
        first = int(live[0]) if len(live) else self.length
        if first > 0:
            self._shift_left(first)
        if self.length + columns > self.capacity or self.capacity - self.length < self.capacity // 4:
            self._grow(max(2 * self.capacity, self.length + columns))

    def _grow(self, capacity: int) -> None:
        """Reallocate bigger buffers (a new shape: a compiled decode step recompiles once)."""
        old_cache, old_mask, length = self.cache, self.cache_mask, self.length
        assert old_cache is not None and old_mask is not None
        self.cache = new_static_cache(self.model, capacity)
        self.cache_mask = torch.zeros((old_mask.shape[0], capacity), dtype=torch.long, device=self.device)
        self.cache_mask[:, :length] = old_mask[:, :length]
        for layer, old in zip(self.cache.layers, old_cache.layers, strict=True):
            if getattr(old, "is_initialized", True):
                layer.lazy_initialization(old.keys, old.values)
                layer.keys[:, :, :length] = old.keys[:, :, :length]
                layer.values[:, :, :length] = old.values[:, :, :length]
        self._set_length(length)
        self._guarded_windows.clear()  # new buffers: new guards

    # ------------------------------------------------------------------------------- public interface
    @torch.no_grad()
    def start(self, sequences: Sequence[torch.Tensor], reserve: int = DEFAULT_RESERVE) -> StepOutput:
        """Forget every row and prefill a new batch; keep ``reserve`` columns for tokens to come."""
        if any(len(s) == 0 for s in sequences):
            raise ValueError("cannot prefill an empty sequence")
        ids, mask = pad_left_to(sequences, self.pad_token_id, self.device)
        self._new_cache(len(sequences), max(ids.shape[1] + reserve, self.capacity))
        assert self.cache_mask is not None
        self.cache_mask[:, : ids.shape[1]] = mask
        self._set_window(None)  # the prefill writes and reads the whole buffer (a reused cache keeps its window)
        self._guarded_windows.clear()  # a new batch: every guard is checked again
        self.forward_calls += 1
        self.tokens_processed += ids.numel()
        out = self.model(
            input_ids=ids, attention_mask=self.cache_mask, position_ids=position_ids_from_mask(mask),
            cache=self.cache, use_cache=True, output_hidden_states=self.output_hidden_states, logits_to_keep=1,
        )  # fmt: skip
        self.length = ids.shape[1]
        hidden = out.hidden_states[-1][:, -1].float() if self.output_hidden_states else None
        return StepOutput(out.logits[:, -1].float(), hidden)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> StepOutput:
        """Append one token ``(B,)`` to every row and return the next-token outputs."""
        if self.cache is None or self.cache_mask is None:
            raise RuntimeError("IncrementalLM.step called before start()")
        self._ensure_room(1)
        tokens = tokens.to(self.cache_mask.device).long().view(-1, 1)
        positions = self.cache_mask.sum(-1, keepdim=True)
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are consumed
        window = self._step_window()
        self._set_window(window)
        mask = self.cache_mask if window is None else self.cache_mask[:, :window]
        self.cache_mask[:, self.length] = 1
        try:
            logits, hidden = self._checked_decode(window, tokens, mask, positions)
        except BaseException:
            # A failed step appends nothing: the decoder stays usable. The layers the forward reached have moved
            # their write column already.
            self.cache_mask[:, self.length] = 0
            self._set_length(self.length)
            raise
        self.forward_calls += 1
        self.tokens_processed += tokens.numel()
        self.length += 1
        return StepOutput(self._owned(logits), None if hidden is None else self._owned(hidden))

    def _owned(self, output: torch.Tensor) -> torch.Tensor:
        """A step output in float32 that the next step cannot overwrite: a CUDA-graph replay reuses its output
        memory, so a float32 output is copied; a bf16 one is already copied by the cast (no second copy)."""
        owned = output.float()
        return owned.clone() if self._cuda_graphs and owned is output else owned

    @torch.no_grad()
    def replace_rows(self, rows: Sequence[int], sequences: Sequence[torch.Tensor]) -> StepOutput:
        """Restart ``rows`` with new sequences; other rows keep their cache. Returns outputs for ``rows``."""
        if self.cache is None or self.cache_mask is None:
            raise RuntimeError("IncrementalLM.replace_rows called before start()")
        self._guarded_windows.clear()  # a restart ends what `guards_once_per_batch` trusts
        new_out, new_cache, new_mask = self._prefill(sequences)
        n = new_mask.shape[1]
        if n > self.length:
            self._ensure_room(n)  # compacting may shorten the used part, so make room for all n columns
            self._shift_right(n - self.length)
        index = index_on(rows, self.device)
        self.cache_mask[index, : self.length] = 0
        self.cache_mask[index, self.length - n : self.length] = new_mask
        for layer, new_layer in zip(self._initialized_layers(), new_cache.layers, strict=True):
            for name in ("keys", "values"):
                tensor = getattr(layer, name)
                tensor[index, :, self.length - n : self.length] = getattr(new_layer, name).to(tensor.dtype)
        return new_out


def make_decoder(
    model: PreTrainedModel,
    decoding: str = "dynamic",
    output_hidden_states: bool = False,
    pad_token_id: int = 0,
    compile_mode: str | None = None,
    guards_once_per_batch: bool = False,
) -> IncrementalLM:
    """The incremental decoder for ``decoding``: ``dynamic``, ``static`` or ``compiled`` (see `DECODINGS`).

    ``guards_once_per_batch`` is `StaticIncrementalLM`'s (``compiled`` only).
    """
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
    if decoding == "dynamic":
        return IncrementalLM(model, output_hidden_states, pad_token_id)
    return StaticIncrementalLM(
        model, output_hidden_states, pad_token_id, compile=decoding == "compiled", compile_mode=compile_mode,
        guards_once_per_batch=guards_once_per_batch,
    )  # fmt: skip
