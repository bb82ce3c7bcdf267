"""Atomic training checkpoints in safetensors + JSON: weights, optimizer, RNG and controller state.

A checkpoint is a folder ``checkpoint-NNNNNN`` built under a temporary name and renamed into place, then
``latest.json`` is replaced atomically to point at it, so a run killed at any moment leaves either the old
or the new checkpoint complete, never a half-written one. Nothing here uses pickle: tensors go to
safetensors (the optimizer's per-parameter state flattened as ``"<param index>.<name>"``) and everything
else to JSON, so loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

LATEST = "latest.json"
BASE_FINGERPRINT = "textenv_lora_base_fingerprint"
"""The metadata key of a LoRA checkpoint's weights file under which `lora_base_fingerprint` is stored."""


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


def tensor_identity(name: str, tensor: torch.Tensor) -> Any:
    """A key equal for two state-dict entries exactly when they are one tensor (tied weights): the same storage,
    offset, dtype and shape. Empty tensors, which all share address 0, keep their own name as key."""
    if not tensor.numel():
        return name
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.dtype, tuple(tensor.shape)


def lora_base_names(model: nn.Module) -> set[str]:
    """Names (in ``model.state_dict()``) of the frozen base weights of any peft model inside ``model``.

    A LoRA base never changes during training and comes back from the LM it was built on, so a checkpoint
    leaves it out: for a 7B model that is 14 GB less to write at every checkpoint, against a few MB of adapters.
    """
    frozen = {id(p) for m in model.modules() if hasattr(m, "peft_config") for p in m.parameters() if not p.requires_grad}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in frozen}


def lora_base_fingerprint(model: nn.Module, base: set[str], samples: int = 256) -> str:
    """A digest of a LoRA base's weights: each one's name, shape and ``samples`` evenly spaced values.

    A LoRA checkpoint leaves its base out (`lora_base_names`), so without this nothing would notice adapters
    restored onto another LM of the same shapes (another fine-tune of the same model, say): training would go
    on, on the wrong base, without a word. Sampling keeps the cost to one small copy per weight even for a 7B
    model; a different base differs at essentially every element. Values are hashed as float32, so a bf16 base
    held as float32 still matches, while the same weights rounded to bf16 do not (a different function)."""
    state = model.state_dict()
    digest = hashlib.sha256()
    seen: set[Any] = set()
    for name in sorted(base):
        tensor = state[name].detach()
        if (key := tensor_identity(name, tensor)) in seen:  # a tied weight: hashed once, under its first name
            continue
        seen.add(key)
        flat = tensor.reshape(-1)
        count = min(samples, flat.numel())  # integer steps: a float index rounds past the end of a long tensor
        index = torch.arange(count, device=flat.device) * max(flat.numel() - 1, 0) // max(count - 1, 1)
        values = flat[index].float().cpu().contiguous()
        digest.update(f"{name}{list(tensor.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _save_weights(model: nn.Module, path: Path) -> None:
    """The model's weights, less a LoRA base (whose fingerprint goes in the file's metadata), to one
    safetensors file."""
    base = lora_base_names(model)
    if not base:
        save_model(model, str(path))  # every weight (tied ones once)
        return
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in base}, str(path),
              metadata={"format": "pt", BASE_FINGERPRINT: lora_base_fingerprint(model, base)})  # fmt: skip


def _checked_weight_names(path: Path, model: nn.Module) -> set[str]:
    """Raise, naming them, if the checkpoint has weights ``model`` lacks or of another shape, or lacks weights
    it has (a LoRA base may be absent; of weights tied to each other, one name is enough), or if it holds
    adapters trained on another LoRA base than ``model``'s. Returns the names to load: the file's, less a
    LoRA base (an older checkpoint's copy of it is not written into the base, whose storage the env's
    reference shares; older checkpoints have no fingerprint to compare)."""
    state = model.state_dict()
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        saved = set(handle.keys())
        saved_base = (handle.metadata() or {}).get(BASE_FINGERPRINT)
        unexpected = sorted(saved - set(state))
        if unexpected:
            raise ValueError(f"checkpoint {path} has weights the model lacks: {unexpected[:5]}")
        reshaped = sorted(k for k in saved if list(handle.get_slice(k).get_shape()) != list(state[k].shape))
    if reshaped:
        shapes = [f"{k}: {list(state[k].shape)}" for k in reshaped[:5]]
        raise ValueError(f"checkpoint {path} has weights of other shapes than the model's (the model's: {shapes})")
    tied: dict[Any, set[str]] = {}
    for name, tensor in state.items():
        tied.setdefault(tensor_identity(name, tensor), set()).add(name)
    base = lora_base_names(model)
    lacking = sorted(min(names) for names in tied.values() if not names & saved and not names <= base)
    if lacking:
        raise ValueError(f"checkpoint {path} lacks weights the model has: {lacking[:5]}")
    if saved_base is not None and base and saved_base != lora_base_fingerprint(model, base):
        raise ValueError(
            f"checkpoint {path} holds LoRA adapters trained on another base LM than the model's (its frozen "
            "weights differ: another LM, or the same one rounded to another dtype); build the agent on the LM "
            "the run was started with"
        )
    return saved - base


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
    _save_weights(model, tmp / "model.safetensors")
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
    """Restore weights and optimizer in place; returns ``(rng tensors, state dict)``.

    A LoRA base is not in the checkpoint (`lora_base_names`): ``model`` keeps the base it was built on.
    """
    path = Path(path)
    names = _checked_weight_names(path, model)  # before anything is loaded: a mismatch leaves the model as it was
    with safe_open(str(path / "model.safetensors"), "pt", device=str(next(model.parameters()).device)) as handle:
        model.load_state_dict({name: handle.get_tensor(name) for name in names}, strict=False)
    # Loaded on the CPU: `load_state_dict` moves each state to its parameter's device, except Adam's ``step``,
    # which stays where it is given and must be on the CPU (on a GPU, non-capturable Adam reads it back per
    # parameter at every step).
    _load_optimizer(optimizer, load_file(str(path / "optimizer.safetensors"), device="cpu"),
                    json.loads((path / "optimizer.json").read_text()))  # fmt: skip
    return load_file(str(path / "rng.safetensors")), json.loads((path / "state.json").read_text())
