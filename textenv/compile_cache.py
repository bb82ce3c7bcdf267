"""A function's own dynamo cache: a copy of its code object per compiled instance, and a way back to eager.

Dynamo keeps its compiled graphs, and checks their guards on every call, per *code object*. Were every
decoder (or every env's step) to compile the same function, one instance's call would first evaluate (and
fail) the guards of the others' variants, and the shared cache would reach ``recompile_limit`` (8
variants) after a few models and shapes: then the function silently runs eagerly, or, with
``fullgraph=True``, raises. A copy of the code per instance gives each its own cache and its own limit.

`CompiledOrEager` runs such a copy compiled, and the function itself eagerly (with a warning) if compiling
it fails: textenv's own compiled helpers (the env step's tensor work, fused sampling) are speed-ups of
plain tensor code, so a backend that cannot compile them on some device or version must cost speed, not
the run.
"""

from __future__ import annotations

import itertools
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch

_COPIES = itertools.count()

FULLGRAPH_REFUSALS: tuple[type[Exception], ...] = tuple(
    getattr(torch._dynamo.exc, name)
    for name in ("Unsupported", "UserError", "UncapturedHigherOrderOpError", "FailOnRecompileLimitHit")
    if hasattr(torch._dynamo.exc, name)
)
"""What ``fullgraph=True`` raises where the usual compile would break the graph or run eagerly."""

COMPILE_FAILURES: tuple[type[Exception], ...] = (
    torch._dynamo.exc.BackendCompilerFailed,  # inductor's codegen errors arrive as its subclass InductorError
    *FULLGRAPH_REFUSALS,
    *(getattr(torch._inductor.exc, name) for name in ("TritonMissing", "GPUTooOldForTriton")
      if hasattr(torch._inductor.exc, name)),  # fmt: skip  (re-raised unwrapped by dynamo)
)
"""What a ``fullgraph`` compile raises when it cannot compile a call: a refusal, the backend failing, or no
Triton for this GPU. Not caught: a kernel that fails when first launched (on a GPU, Triton compiles and
autotunes some kernels then), which raises from inside the compiled call like any runtime error."""


def own_code_copy(function: Callable[..., Any]) -> types.FunctionType:
    """``function`` with a code object of its own (same body, globals and defaults; a numbered name)."""
    assert isinstance(function, types.FunctionType)
    code = function.__code__
    own = code.replace(co_name=f"{code.co_name}_{next(_COPIES)}")
    copy = types.FunctionType(own, function.__globals__, own.co_name, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = None if function.__kwdefaults__ is None else dict(function.__kwdefaults__)
    return copy


class CompiledOrEager:
    """``function`` compiled on a code copy of its own (``torch.compile(..., **options)``), or run eagerly from
    the first call whose compilation fails (`COMPILE_FAILURES`; warned once, never retried, also for shapes
    that had compiled).

    Only for pure, out-of-place tensor functions compiled with ``fullgraph``: a compile that fails has run
    none of the function, so the eager call that follows starts from the same inputs. (An exception the
    function itself raises while being traced also stops the compiling; the eager call then raises it.)
    """

    def __init__(self, function: Callable[..., Any], **options: Any) -> None:
        self.function = function
        self._compiled = torch.compile(own_code_copy(function), **options)
        self.compiled = True  # False once compiling failed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled:
            try:
                return self._compiled(*args, **kwargs)
            except COMPILE_FAILURES as error:
                self.compiled = False
                cause = getattr(error, "inner_exception", None) or error  # BackendCompilerFailed wraps the cause
                first_line = str(cause).splitlines()[0] if str(cause) else ""
                warnings.warn(
                    f"{self.function.__name__} could not be compiled ({type(cause).__name__}: {first_line}); "
                    "it runs eagerly from now on (same results, slower)",
                    stacklevel=2,
                )
        return self.function(*args, **kwargs)
