"""`vllm-medusa bench`: offline throughput and latency through vLLM, side by side in one run.

For each batch size b (b requests in flight: `max_num_seqs=b`, all prompts queued) every
configuration gets its own engine with identical arguments except the speculative config:

    plain        no speculation
    chain        vLLM's own Medusa (a chain of each head's argmax), our heads exported to its format
    ngram        vLLM's n-gram prompt lookup
    tree-N       tree Medusa, fixed N-node tree
    adaptive     tree Medusa, tree sized each step by the measured cost model

The engines of one batch size stay up together (each in its own engine process), and the repeats
are interleaved across them (round r runs every configuration once), so machine noise hits all
alike. Same prompts (MT-Bench first turns, chat template), fixed max_tokens with ignore_eos,
one warm-up run each; the table reports medians and ratios to plain vLLM.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


def set_engine_environment() -> None:
    """Before vLLM is imported: the engines of one batch size are alive together, so each needs its own
    engine process; quiet logs, offline."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@dataclass
class Result:
    config: str
    batch: int
    temperature: float
    tokens_per_s: float
    latency_s: float  # median per-request latency (queued -> last token)
    tau: float  # tokens per verification step (1.0 without speculation)
    runs: list[float]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm-medusa bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="all 80 prompts, batch sizes 1..32")
    parser.add_argument("--prompts", type=int, default=None, help="MT-Bench questions (default 16, --full 80)")
    parser.add_argument("--batch-sizes", default=None, help="comma list (default 1,4,16; --full 1,2,4,8,16,32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperatures", default="0,0.7")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds, medians (default 1, --full 3)")
    parser.add_argument("--configs", default="plain,chain,ngram,tree-4,tree-16,adaptive")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --heads, --out: shared by the benchmarks of SmolLM2 with its shipped heads."""
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="default: the fast dtype of this machine (vllm_medusa.hardware.fast_dtype)")
    parser.add_argument("--heads", type=Path, default=None, help="default: the shipped SmolLM2 heads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def resolve_model(args: argparse.Namespace) -> tuple[Path, Path]:
    """(model directory, heads directory) for the arguments of `add_model_arguments`; fills args.dtype."""
    from vllm_medusa.convert import ensure_smollm2
    from vllm_medusa.hardware import fast_dtype
    from vllm_medusa.shipped import default_heads

    args.dtype = args.dtype or fast_dtype()
    model_dir = ensure_smollm2(args.dtype)
    return model_dir, args.heads or default_heads(model_dir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_engine_environment()
    from vllm_medusa.mtbench import chat_prompts

    model_dir, heads_dir = resolve_model(args)
    num_prompts = args.prompts or (80 if args.full else 16)
    args.repeats = args.repeats or (3 if args.full else 1)
    batches = [int(b) for b in (args.batch_sizes or ("1,2,4,8,16,32" if args.full else "1,4,16")).split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    configs = args.configs.split(",")
    prompts = chat_prompts(model_dir, num_prompts)

    with tempfile.TemporaryDirectory() as scratch:
        engine_configs = {name: engine_kwargs(name, heads_dir, Path(scratch)) for name in configs}
        results = []
        for batch in batches:
            results += run_batch(model_dir, args.dtype, engine_configs, prompts, batch, temperatures,
                                 args.max_tokens, args.repeats)
    report(results, args, model_dir, heads_dir, num_prompts)
    return 0


def engine_kwargs(name: str, heads_dir: Path, scratch: Path) -> dict:
    """Engine arguments that differ between configurations (the speculative part only)."""
    if name == "plain":
        return {}
    if name == "ngram":
        return {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4,
                                       "prompt_lookup_max": 4, "prompt_lookup_min": 2}}
    if name == "chain":
        from vllm_medusa.checkpoint import export_for_vllm_chain, load_heads

        heads, _ = load_heads(heads_dir)
        chain_dir = export_for_vllm_chain(heads, scratch / "chain-heads")
        return {"speculative_config": {"method": "medusa", "model": str(chain_dir),
                                       "num_speculative_tokens": heads.num_heads},
                "additional_config": {"medusa": {"mode": "chain"}}}
    if name.startswith("tree-"):
        return {"speculative_config": {"method": "medusa", "model": str(heads_dir)},
                "additional_config": {"medusa": {"tree": f"medusa-{name.split('-')[1]}", "adaptive": False}}}
    if name == "adaptive":
        return {"speculative_config": {"method": "medusa", "model": str(heads_dir)},
                "additional_config": {"medusa": {"adaptive": True}}}
    raise SystemExit(f"vllm-medusa bench: unknown configuration {name!r}")


def run_batch(model_dir, dtype, engine_configs, prompts, batch, temperatures, max_tokens, repeats) -> list[Result]:
    from vllm import LLM, SamplingParams

    engines = {}
    for name, extra in engine_configs.items():
        print(f"[bench] batch {batch}: starting {name}", flush=True)
        per_request = {"per_request_spec_decode_metrics": "summary"} if extra else {}
        # disable_log_stats=False: vLLM records per-request timestamps (the latency column) only with stats on
        engines[name] = LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
                            max_num_seqs=batch, disable_log_stats=False, **per_request, **extra)
    results = []
    try:
        for temperature in temperatures:
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=0)
            for llm in engines.values():
                llm.generate(prompts[: max(batch, 2)], params, use_tqdm=False)  # warm-up
            runs = {name: [] for name in engines}
            latency = {name: [] for name in engines}
            steps = {name: [0, 0] for name in engines}  # verification steps, accepted draft tokens
            for _ in range(repeats):
                for name, llm in engines.items():
                    start = time.perf_counter()
                    outputs = llm.generate(prompts, params, use_tqdm=False)
                    elapsed = time.perf_counter() - start
                    runs[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed)
                    latency[name] += [o.metrics.last_token_ts - o.metrics.queued_ts for o in outputs if o.metrics]
                    for count in map(verification_counts, outputs):
                        steps[name] = [a + b for a, b in zip(steps[name], count)]
            for name, llm in engines.items():
                num_steps, accepted = steps[name]
                tau = 1.0 + accepted / num_steps if num_steps else 1.0
                results.append(Result(name, batch, temperature, statistics.median(runs[name]),
                                      statistics.median(latency[name]) if latency[name] else float("nan"),
                                      tau, runs[name]))
                print(f"[bench] b={batch} T={temperature} {name}: {results[-1].tokens_per_s:.1f} tok/s, "
                      f"tau {tau:.2f}", flush=True)
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
        engines.clear()
        gc.collect()
    return results


def verification_counts(output) -> tuple[int, int]:
    """(verification steps, accepted draft tokens) of one request, from vLLM's per-request spec metrics."""
    metrics = output.outputs[0].spec_decode_metrics
    if metrics is None:
        return 0, 0
    return sum(metrics.histogram), sum(j * count for j, count in enumerate(metrics.histogram))


def report(results: list[Result], args, model_dir: Path, heads_dir: Path, num_prompts: int) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "python": platform.python_version()}
    meta = {"model": str(model_dir), "heads": str(heads_dir), "dtype": args.dtype, "prompts": num_prompts,
            "max_tokens": args.max_tokens, "repeats": args.repeats, "machine": machine,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (args.out / "offline.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    table = markdown(results, meta)
    (args.out / "offline.md").write_text(table)
    print(table)
    plot(results, args.out / "offline.png")


def markdown(results: list[Result], meta: dict) -> str:
    plain = {(r.batch, r.temperature): r.tokens_per_s for r in results if r.config == "plain"}
    lines = [f"SmolLM2-135M-Instruct {meta['dtype']}, {meta['prompts']} MT-Bench prompts x {meta['max_tokens']} "
             f"tokens (ignore_eos), median of {meta['repeats']} interleaved runs; {meta['machine']['cpus']} CPUs, "
             f"{meta['date']}", "",
             "| batch | temp | config | tokens/s | vs plain | tau | median latency (s) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r.tokens_per_s / plain[(r.batch, r.temperature)] if (r.batch, r.temperature) in plain else float("nan")
        lines.append(f"| {r.batch} | {r.temperature:g} | {r.config} | {r.tokens_per_s:.1f} | {ratio:.2f}x | "
                     f"{r.tau:.2f} | {r.latency_s:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[Result], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib missing (pip install -e '.[bench]'): no plot", flush=True)
        return
    temperatures = sorted({r.temperature for r in results})
    fig, axes = plt.subplots(1, len(temperatures), figsize=(6 * len(temperatures), 4), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        for config in dict.fromkeys(r.config for r in results):
            points = sorted((r.batch, r.tokens_per_s) for r in results
                            if r.config == config and r.temperature == temperature)
            ax.plot(*zip(*points), marker="o", label=config)
        ax.set(xscale="log", xlabel="batch size (requests in flight)", ylabel="tokens/s",
               title=f"temperature {temperature:g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
