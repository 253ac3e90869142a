"""`vllm-medusa bench-serve`: the OpenAI server under load, measured by vLLM's own `vllm bench serve` client.

For each configuration (the names of `vllm-medusa bench`: plain, chain, ngram, tree-N, adaptive) one
`vllm-medusa serve` starts with identical arguments except the speculative config; vLLM's serving
benchmark (`vllm.benchmarks.serve`, the code behind `vllm bench serve`) then sends the MT-Bench first
turns (chat template applied, fixed output length, ignore_eos) at each client concurrency, and the
server stops before the next configuration starts. Reports output tokens/s, TTFT, TPOT and end-to-end
latency (medians) side by side, with ratios to plain vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from vllm_medusa import server_process
from vllm_medusa.bench import add_model_arguments, engine_kwargs, resolve_model, set_engine_environment

METRICS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")
START_TIMEOUT_S = 600


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm-medusa bench-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="MT-Bench questions")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,4,16", help="comma list of client concurrencies")
    parser.add_argument("--configs", default="plain,ngram,tree-16,adaptive")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    set_engine_environment()
    from vllm_medusa.mtbench import chat_prompts

    model_dir, heads_dir = resolve_model(args)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, dict[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        dataset = Path(scratch) / "mtbench.jsonl"
        dataset.write_text("".join(json.dumps({"prompt": p, "output_tokens": args.max_tokens}) + "\n"
                                   for p in chat_prompts(model_dir, args.prompts)))
        for name in args.configs.split(","):
            extra = engine_kwargs(name, heads_dir, Path(scratch))
            with _server(model_dir, args.dtype, extra, Path(scratch) / f"{name}.log") as url:
                results[name] = {c: _client(url, model_dir, dataset, args, c) for c in concurrencies}
            print(f"[bench-serve] {name}: " + ", ".join(
                f"c={c} {r['output_throughput']:.1f} tok/s" for c, r in results[name].items()), flush=True)
    _report(results, args, model_dir)
    return 0


class _server:
    """`vllm-medusa serve` on a free port (see server_process); the context value is its base URL."""

    def __init__(self, model_dir: Path, dtype: str, extra: dict, log: Path) -> None:
        self.port = server_process.free_port()
        self.args = [str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype,
                     "--enforce-eager", "--max-model-len", "2048", "--seed", "0", "--max-num-seqs", "64"]
        for key, value in extra.items():  # speculative_config -> --speculative-config JSON
            self.args += [f"--{key.replace('_', '-')}", json.dumps(value)]
        self.log = log

    def __enter__(self) -> str:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               "HF_HUB_OFFLINE": "1"}
        self.process = server_process.start(self.args, env, self.log)
        url = f"http://127.0.0.1:{self.port}"
        try:
            server_process.wait_ready(self.process, url, self.log, START_TIMEOUT_S)
        except server_process.ServerStartError as error:
            self.__exit__()
            raise SystemExit(f"vllm-medusa bench-serve: {error}") from None
        return url

    def __exit__(self, *exc) -> None:
        server_process.stop(self.process)


def _client(url: str, model_dir: Path, dataset: Path, args: argparse.Namespace, concurrency: int) -> dict:
    """One `vllm bench serve` run: every prompt once, `concurrency` in flight; its summary metrics."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    bench_args = parser.parse_args([
        "--backend", "vllm", "--base-url", url, "--model", str(model_dir), "--tokenizer", str(model_dir),
        "--dataset-name", "custom", "--dataset-path", str(dataset), "--skip-chat-template",
        "--num-prompts", str(args.prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
        "--disable-shuffle", "--seed", "0", "--temperature", "0", "--num-warmups", str(min(concurrency, 4)),
        "--percentile-metrics", "ttft,tpot,itl,e2el",
    ])
    result = serve.main(bench_args)
    if result.get("failed"):
        raise SystemExit(f"vllm-medusa bench-serve: {result['failed']} requests failed against {url}")
    return {key: float(result[key]) for key in METRICS}


def _report(results: dict[str, dict[int, dict[str, float]]], args: argparse.Namespace, model_dir: Path) -> None:
    import platform

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(model_dir), "dtype": args.dtype, "prompts": args.prompts, "max_tokens": args.max_tokens,
            "cpus": os.cpu_count(), "machine": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M")}
    (args.out / "serve.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = [f"`vllm bench serve` client against `vllm-medusa serve`, SmolLM2-135M-Instruct {args.dtype}, "
             f"{args.prompts} MT-Bench prompts x {args.max_tokens} tokens (ignore_eos, greedy), {meta['cpus']} CPUs, "
             f"{meta['date']}", "",
             "| concurrency | config | output tok/s | vs plain | median TTFT ms | median TPOT ms | median E2E ms |",
             "|---|---|---|---|---|---|---|"]
    for concurrency in sorted({c for per in results.values() for c in per}):
        plain = results.get("plain", {}).get(concurrency, {}).get("output_throughput", float("nan"))
        for name, per in results.items():
            r = per[concurrency]
            lines.append(f"| {concurrency} | {name} | {r['output_throughput']:.1f} | "
                         f"{r['output_throughput'] / plain:.2f}x | {r['median_ttft_ms']:.0f} | "
                         f"{r['median_tpot_ms']:.1f} | {r['median_e2el_ms']:.0f} |")
    table = "\n".join(lines) + "\n"
    (args.out / "serve.md").write_text(table)
    print(table)
