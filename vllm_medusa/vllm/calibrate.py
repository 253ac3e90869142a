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


def load_or_measure(runner: Any) -> StepCost:
    path = cache_path(runner.vllm_config)
    cost = StepCost.load(path)
    if cost is None:
        cost = measure(runner)
        cost.save(path, {"model": str(runner.vllm_config.model_config.model)})
    return cost
