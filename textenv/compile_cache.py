"""A function's own dynamo cache: a copy of its code object per compiled instance.

Dynamo keeps its compiled graphs, and checks their guards on every call, per *code object*. Were every
decoder (or every env's step) to compile the same function, one instance's call would first evaluate (and
fail) the guards of the others' variants, and the shared cache would reach ``recompile_limit`` (8
variants) after a few models and shapes: then the function silently runs eagerly, or, with
``fullgraph=True``, raises. A copy of the code per instance gives each its own cache and its own limit.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

_COPIES = itertools.count()


def own_code_copy(function: Callable[..., Any]) -> types.FunctionType:
    """``function`` with a code object of its own (same body, globals and defaults; a numbered name)."""
    assert isinstance(function, types.FunctionType)
    code = function.__code__
    own = code.replace(co_name=f"{code.co_name}_{next(_COPIES)}")
    copy = types.FunctionType(own, function.__globals__, own.co_name, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = None if function.__kwdefaults__ is None else dict(function.__kwdefaults__)
    return copy
