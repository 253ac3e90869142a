"""`vllm-medusa demo`: plain vLLM vs tree Medusa on MT-Bench prompts, SmolLM2-135M-Instruct.

Both engines run in this process with identical arguments except the speculative config; each
prompt is generated alone (batch 1) by each, greedy, and the table shows tokens, tau (tokens per
verification step), tokens/s of both and whether the outputs match token for token.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vllm_medusa.hardware import fast_dtype

# In-process engines start in seconds; must be set before vLLM is imported.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the table readable


@dataclass
class Row:
    question_id: int
    category: str
    tokens: int
    tau: float | None  # None: the adaptive schedule verified no tree for this prompt
    plain_tps: float
    medusa_tps: float
    match: bool


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm-medusa demo", description=__doc__)
    parser.add_argument("--prompts", type=int, default=6, help="MT-Bench questions (first turns)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                        help="default: the fast dtype of this machine (bfloat16 with CUDA, AMX or AVX-512 BF16, else float32); "
                        "float32 for exact matches")
    parser.add_argument("--heads", type=Path, default=None, help="heads directory (default: the shipped ones)")
    parser.add_argument("--tree", default=None, help="tree preset or size (default: the heads' own tree)")
    parser.add_argument("--smoke", action="store_true", help="2 prompts, 24 tokens, float32: the test suite's check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.prompts, args.max_tokens, args.dtype = 2, 24, args.dtype or "float32"
    dtype = args.dtype or fast_dtype()

    from vllm_medusa.convert import ensure_smollm2
    from vllm_medusa.shipped import default_heads

    print(f"[demo] base model SmolLM2-135M-Instruct ({dtype}) ...", flush=True)
    model_dir = ensure_smollm2(dtype)
    heads_dir = args.heads or default_heads(model_dir)
    print(f"[demo] heads: {heads_dir}", flush=True)
    rows = run(model_dir, heads_dir, dtype, args.prompts, args.max_tokens, args.tree)
    print(format_table(rows, dtype))
    return 0


def run(model_dir: Path, heads_dir: Path, dtype: str, num_prompts: int, max_tokens: int, tree: str | None) -> list[Row]:
    from vllm import LLM, SamplingParams

    from vllm_medusa.mtbench import load_mtbench

    questions = load_mtbench(limit=num_prompts)
    messages = [[{"role": "user", "content": q.turns[0]}] for q in questions]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine_args = dict(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0)
    medusa_options = {"tree": tree} if tree else {}

    results = {}
    for name, extra in (
        ("plain", {}),
        ("medusa", dict(speculative_config={"method": "medusa", "model": str(heads_dir)},
                        additional_config={"medusa": medusa_options})),
    ):
        print(f"[demo] {name}: starting vLLM", flush=True)
        llm = LLM(**engine_args, **extra)
        llm.chat(messages[:1], params, use_tqdm=False)  # warm-up
        results[name] = [timed_chat(llm, m, params, name == "medusa") for m in messages]
        llm.llm_engine.engine_core.shutdown()
        del llm

    rows = []
    for q, (plain_tokens, plain_s, _), (medusa_tokens, medusa_s, tau) in zip(questions, results["plain"], results["medusa"]):
        rows.append(Row(q.question_id, q.category, len(medusa_tokens), tau,
                        len(plain_tokens) / plain_s, len(medusa_tokens) / medusa_s, plain_tokens == medusa_tokens))
    return rows


def timed_chat(llm, messages, params, medusa: bool) -> tuple[list[int], float, float | None]:
    if medusa:
        llm.collective_rpc(_reset_stats)
    start = time.perf_counter()
    out = llm.chat([messages], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    tau = llm.collective_rpc(_read_tau)[0] if medusa else 1.0
    return list(out.outputs[0].token_ids), elapsed, tau


def _reset_stats(worker) -> None:
    worker.model_runner._medusa.reset_stats()


def _read_tau(worker) -> float | None:
    """Tokens per step with a tree; None when the adaptive schedule chose no tree at all."""
    stats = worker.model_runner._medusa.stats
    return stats.tau if stats.trees else None


def format_table(rows: list[Row], dtype: str) -> str:
    lines = [
        "",
        f"Plain vLLM vs tree Medusa, SmolLM2-135M-Instruct, {dtype}, greedy, batch 1",
        "| question | category | tokens | tau | plain tok/s | medusa tok/s | speedup | same output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.question_id} | {r.category} | {r.tokens} | {'-' if r.tau is None else f'{r.tau:.2f}'} | "
            f"{r.plain_tps:.1f} | "
            f"{r.medusa_tps:.1f} | {r.medusa_tps / r.plain_tps:.2f}x | {'yes' if r.match else 'no'} |"
        )
    with_tree = [r for r in rows if r.tau is not None]
    mean_tau = sum(r.tau * r.tokens for r in with_tree) / max(sum(r.tokens for r in with_tree), 1)
    speedup = sum(r.medusa_tps / r.plain_tps for r in rows) / max(len(rows), 1)
    lines.append(f"\nmean tau {mean_tau:.2f} (tokens per step with a tree), mean speedup {speedup:.2f}x, "
                 f"{sum(r.match for r in rows)}/{len(rows)} outputs identical")
    if dtype == "bfloat16":
        lines.append("(bfloat16: different batch shapes round differently, so long outputs may diverge; "
                     "run with --dtype float32 for the exactness check)")
    return "\n".join(lines)
