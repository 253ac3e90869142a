"""tau (tokens per verification step) of tree Medusa on MT-Bench, through vLLM, for several tree sizes.

Both turns of all 80 questions (`--turns 1`: first turns only), greedy, 128 new tokens per turn: turn 1 is
generated, then turn 2 is asked with turn 1's answer in the conversation. Each tree size gets its own engine (fixed tree, no
adaptive sizing); tau and per-depth acceptance come from the plugin's tree statistics.

    python -m benchmarks.mtbench_tau [--trees 4,16,32,64] [--heads DIR] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", default="4,16,32,64")
    parser.add_argument("--heads", type=Path, default=None)
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="default: the fast dtype of this machine (vllm_medusa.hardware.fast_dtype)")
    parser.add_argument("--questions", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=2, choices=(1, 2), help="1: first turns only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mtbench_tau.json"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from vllm import LLM, SamplingParams

    from vllm_medusa.convert import ensure_smollm2
    from vllm_medusa.shipped import default_heads
    from vllm_medusa.mtbench import load_mtbench

    from vllm_medusa.hardware import fast_dtype

    args.dtype = args.dtype or fast_dtype()
    model_dir = ensure_smollm2(args.dtype)
    heads_dir = args.heads or default_heads(model_dir)
    questions = load_mtbench(limit=args.questions)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = []
    for size in [int(s) for s in args.trees.split(",")]:
        llm = LLM(model=str(model_dir), dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0,
                  speculative_config={"method": "medusa", "model": str(heads_dir)},
                  additional_config={"medusa": {"tree": size, "adaptive": False}})
        per_turn = []
        conversations = [[{"role": "user", "content": q.turns[0]}] for q in questions]
        for turn in range(args.turns):
            llm.collective_rpc(_reset)
            outputs = llm.chat(conversations, params, use_tqdm=False)
            per_turn.append(llm.collective_rpc(_stats)[0])
            for conv, q, out in zip(conversations, questions, outputs):
                conv += [{"role": "assistant", "content": out.outputs[0].text},
                         {"role": "user", "content": q.turns[1]}]
        llm.llm_engine.engine_core.shutdown()
        del llm
        trees = sum(s["trees"] for s in per_turn)
        emitted = sum(s["emitted"] for s in per_turn)
        depth = [sum(s["accepted_per_depth"][d] for s in per_turn) / trees for d in range(len(per_turn[0]["accepted_per_depth"]))]
        by_turn = {f"tau_turn{t + 1}": round(s["tau"], 4) for t, s in enumerate(per_turn)}
        rows.append({"nodes": size, "tau": emitted / trees, **by_turn, "p_depth_at_least": depth})
        print(f"tree {size:3d}: tau {rows[-1]['tau']:.3f} {by_turn}; P(path depth >= d) "
              f"{[round(p, 3) for p in depth]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"heads": str(heads_dir), "dtype": args.dtype, "rows": rows}, indent=1))
    return 0


def _reset(worker) -> None:
    worker.model_runner._medusa.reset_stats()


def _stats(worker) -> dict:
    return worker.model_runner._medusa.stats.as_dict()


if __name__ == "__main__":
    sys.exit(main())
