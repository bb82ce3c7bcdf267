"""Weights held and checkpoint size of a LoRA policy beside its reference: shared base vs a deep copy.

Under LoRA the policy's base is frozen, so it can be the env's reference's own weights
(`agents.lora_weights.shared_weights_copy`), and a checkpoint can leave it out (`agents.checkpoint`). This
script builds one shape's reference (random weights) and, in the same process, a LoRA policy on a
``copy.deepcopy`` of it (the way before) and one on the reference itself (now). It prints, for each, the
bytes of weights (and buffers) the reference and the policy hold together (each storage once) and, on CUDA, the device
memory allocated for them; then the size of a checkpoint's weights file (the whole policy, as before, and
the adapters and value head, now); and the ratios.

    python benchmarks/lora_memory.py --shape gpt2 --bf16                  # CPU: bytes held, checkpoint size
    python benchmarks/lora_memory.py --shape gpt2 --bf16 --device cuda    # and device memory
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from agents.checkpoint import save_checkpoint  # noqa: E402
from agents.value_head import PolicyWithValueHead  # noqa: E402
from benchmarks.common import benchmark_parser, build, parse_benchmark_args  # noqa: E402
from benchmarks.live_memory import resident_bytes  # noqa: E402


def allocated(device: str) -> int:
    """CUDA memory allocated now (0 on the CPU, where the weight bytes above are the measure)."""
    return torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser(__doc__, shape="gpt2", new=None, repeats=None, textenv=False)
    parser.add_argument("--bf16", action="store_true", help="a bf16 reference and LoRA base (as `rlhf --bf16`)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--targets", default="c_attn", help="comma-separated modules to adapt")
    args = parse_benchmark_args(parser, argv)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    reference = build(args.shape, 64, args.device, dtype)["reference"]
    targets = args.targets.split(",")
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for side, source in (("deepcopy", lambda: copy.deepcopy(reference)), ("shared", lambda: reference)):
            before = allocated(args.device)
            policy = PolicyWithValueHead(source(), lora_r=args.lora_r, lora_target_modules=targets)
            result[f"{side}_device_bytes"] = allocated(args.device) - before
            result[f"{side}_weight_bytes"] = resident_bytes(reference, policy)
            if side == "shared":
                optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
                path = save_checkpoint(folder, 1, policy, optimizer, {}, {}) / "model.safetensors"
                result["checkpoint_bytes"] = path.stat().st_size
                save_model(policy, f"{folder}/whole.safetensors")  # what a checkpoint held before
                result["whole_checkpoint_bytes"] = Path(f"{folder}/whole.safetensors").stat().st_size
            del policy
    gib, mib = 2**30, 2**20
    print(f"shape={args.shape} dtype={str(dtype).removeprefix('torch.')} device={args.device} lora_r={args.lora_r} targets={targets}")
    print(f"weights held by reference + LoRA policy: deepcopy {result['deepcopy_weight_bytes'] / gib:.3f} GiB, "
          f"shared {result['shared_weight_bytes'] / gib:.3f} GiB, ratio shared/deepcopy "
          f"{result['shared_weight_bytes'] / result['deepcopy_weight_bytes']:.3f}")  # fmt: skip
    if args.device.startswith("cuda"):
        print(f"device memory allocated for the policy: deepcopy {result['deepcopy_device_bytes'] / gib:.3f} GiB, "
              f"shared {result['shared_device_bytes'] / gib:.3f} GiB")  # fmt: skip
    print(f"checkpoint weights file: whole policy {result['whole_checkpoint_bytes'] / mib:.2f} MiB, adapters and value "
          f"head {result['checkpoint_bytes'] / mib:.2f} MiB, ratio {result['checkpoint_bytes'] / result['whole_checkpoint_bytes']:.4f}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
