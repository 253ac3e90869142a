"""The machinery shared by both training stages: devices and processes, the schedule, checkpoints."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class Runtime:
    """One training process: its device, and its rank among `world` (torchrun / accelerate launch)."""

    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast where the hardware has it fast (CUDA); fp32 elsewhere."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    def autocast(self) -> Any:
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_runtime(device: str | None) -> Runtime:
    """Joins the process group when launched by torchrun / accelerate (WORLD_SIZE > 1), one GPU per rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Runtime(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group("nccl")
        return Runtime(torch.device("cuda", local_rank), rank, world)
    torch.distributed.init_process_group("gloo")
    return Runtime(torch.device("cpu"), rank, world)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       hold_steps: tuple[int, ...] = ()) -> LambdaLR:
    """Linear warm-up to each group's lr, then cosine decay to 0 at total_steps.

    hold_steps[g] (optional, per param group) keeps group g at lr 0 for its first steps: Medusa-2 warms the
    heads up on a still-frozen backbone before training both.
    """

    def factor(step: int, hold: int = 0) -> float:
        if step < hold:
            return 0.0
        step -= hold
        span = max(1, total_steps - hold)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, span - warmup_steps))))

    holds = hold_steps or (0,) * len(optimizer.param_groups)
    return LambdaLR(optimizer, [lambda step, h=h: factor(step, h) for h in holds])


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (heads, LoRA adapters): a checkpoint need not copy a frozen backbone."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LambdaLR) -> None:
    path = out_dir / CHECKPOINT
    state = {"step": step, "trainable": trainable_state(module), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # atomic: an interrupted save keeps the previous checkpoint


def load_checkpoint(out_dir: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LambdaLR) -> int:
    """Restores a checkpoint of out_dir if there is one; returns the step to continue from (0 if none)."""
    path = out_dir / CHECKPOINT
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    unexpected = module.load_state_dict(state["trainable"], strict=False).unexpected_keys
    if unexpected:  # strict=False only because frozen weights are not saved
        raise ValueError(f"checkpoint {path} does not match the model: unexpected keys {unexpected[:3]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float) -> None:
    """Clip each parameter group's gradient norm on its own (Medusa-2: the heads' gradients are far larger than
    the backbone's, one joint clip would starve the backbone), step the optimizer and the schedule, clear."""
    for group in optimizer.param_groups:
        torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
