"""Measure t(x), the step time for x tokens, on the running engine; cache it per machine and model."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from vllm_medusa.adaptive import GRID, StepCost


def cache_path(vllm_config: Any) -> Path:
    """~/.cache/vllm-medusa/cost/<hash of machine, threads, model, dtype>.json ($VLLM_MEDUSA_CACHE honoured)."""
    root = Path(os.environ.get("VLLM_MEDUSA_CACHE", Path.home() / ".cache" / "vllm-medusa"))
    model = vllm_config.model_config
    key = json.dumps([platform.processor(), platform.machine(), os.cpu_count(), str(model.model), str(model.dtype),
                      vllm_config.parallel_config.tensor_parallel_size])
    return root / "cost" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def measure(runner: Any, repeats: int = 3) -> StepCost:
    """Time the model's forward at each grid size up to the step token budget (median of `repeats`).

    The forward excludes tree attention and scheduling; real steps refine the curve online.
    """
    budget = runner.scheduler_config.max_num_batched_tokens
    points = {}
    for size in [x for x in GRID if x <= min(budget, 512)]:
        runner._dummy_run(size)  # warm-up of this shape
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner._dummy_run(size)
            times.append(time.perf_counter() - start)
        points[size] = float(np.median(times))
    return StepCost.from_points(points)


def measure_and_cache(runner: Any, repeats: int = 3, **meta: str) -> tuple[StepCost, Path]:
    """measure() and write the curve where engines of this machine, model, dtype and parallelism read it."""
    cost = measure(runner, repeats)
    path = cache_path(runner.vllm_config)
    cost.save(path, {"model": str(runner.vllm_config.model_config.model), **meta})
    return cost, path


def load_or_measure(runner: Any) -> StepCost:
    cost = StepCost.load(cache_path(runner.vllm_config))
    return cost if cost is not None else measure_and_cache(runner)[0]


def _measure_and_save(worker: Any, repeats: int) -> dict[str, Any]:
    cost, path = measure_and_cache(worker.model_runner, repeats, command="vllm-medusa calibrate")
    return {"path": str(path), **cost.to_json()}


def main(argv: list[str]) -> int:
    """`vllm-medusa calibrate BASE`: measure the step-cost curve now and cache it for the adaptive tree."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="vllm-medusa calibrate",
        description="Measure t(tokens), the model's step time by tokens in the step, on this machine, and cache it "
        "where engines with the same model, dtype and tensor parallelism read it at start-up (otherwise the "
        "first Medusa step measures it). Run it on an idle machine: a busy one makes every tree look costly.",
    )
    parser.add_argument("model", help="base model directory (as given to vLLM)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="timings per size (the median is kept)")
    args = parser.parse_args(argv)
    if os.sep in args.model and not Path(args.model).is_dir():
        parser.error(f"model directory {args.model} does not exist")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the measuring function runs in-process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    llm = LLM(model=args.model, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=True)
    result = llm.collective_rpc(_measure_and_save, args=(args.repeats,))[0]
    base = result["seconds"][0]
    print("| tokens in the step | ms | relative to 1 token |\n|---|---|---|")
    for size, seconds in zip(result["sizes"], result["seconds"]):
        print(f"| {size} | {seconds * 1e3:.1f} | {seconds / base:.2f}x |")
    print(f"cached in {result['path']}")
    return 0
