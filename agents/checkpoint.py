"""Atomic training checkpoints in safetensors + JSON: weights, optimizer, RNG and controller state.

A checkpoint is a folder ``checkpoint-NNNNNN`` built under a temporary name and renamed into place, then
``latest.json`` is replaced atomically to point at it, so a run killed at any moment leaves either the old
or the new checkpoint complete, never a half-written one. Nothing here uses pickle: tensors go to
safetensors (the optimizer's per-parameter state flattened as ``"<param index>.<name>"``) and everything
else to JSON, so loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

LATEST = "latest.json"


def fsync_path(path: Path) -> None:
    """Flush a written file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside ``path``, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(obj, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: str | Path,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``checkpoint-<iteration>`` atomically and point ``latest.json`` at it.

    :param rng: named RNG states as uint8 tensors (``torch.Generator.get_state()``).
    :param state: everything else, JSON-serialisable (iteration counters, controller, NumPy RNG states).
    :param keep: how many most recent checkpoints to keep.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{iteration:06d}"
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{final.name}."))
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, **state}, indent=2))
    for path in (*tmp.iterdir(), tmp):  # on disk before latest.json names them (a power loss, not only a kill)
        fsync_path(path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(run_dir)  # the rename itself, before the pointer's
    write_json_atomic(run_dir / LATEST, {"checkpoint": final.name, "iteration": iteration})
    for old in sorted(run_dir.glob("checkpoint-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest.json`` points at, or None if the run has none."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = Path(run_dir) / json.loads(pointer.read_text())["checkpoint"]
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} points at {path.name}, which is missing")
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore weights and optimizer in place; returns ``(rng tensors, state dict)``."""
    path = Path(path)
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / "model.safetensors"), device=str(device))
    if unexpected:
        raise ValueError(f"checkpoint {path} has weights the model lacks: {sorted(unexpected)[:5]}")
    # Loaded on the CPU: `load_state_dict` moves each state to its parameter's device, except Adam's ``step``,
    # which stays where it is given and must be on the CPU (on a GPU, non-capturable Adam reads it back per
    # parameter at every step).
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors"), device="cpu"),
                    json.loads((path / "optimizer.json").read_text()))  # fmt: skip
    return load_file(str(path / "rng.safetensors")), json.loads((path / "state.json").read_text())
