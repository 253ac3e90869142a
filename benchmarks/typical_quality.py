"""Typical acceptance: speed against quality, next to lossless sampling and plain vLLM, at one temperature.

Typical acceptance (Medusa paper, section 2.3.1) accepts a draft token when the base model gives it
probability > min(eps, delta * exp(-entropy)); it is not lossless, so its text can drift from what the
base model would sample. For each eps, and for lossless acceptance, one engine with a fixed tree
generates the same prompts with the same seeds (modes interleaved per round); plain vLLM samples them
once as the quality reference. Quality proxies, measured on every output:

- mean log-likelihood per token of the generated text under the base model (float32, temperature 1);
- repetition rate: share of the output's 4-grams that already occurred earlier in the same output.

    python -m benchmarks.typical_quality [--eps 0.01,0.05,0.09,0.2] [--temperature 0.7] [--prompts 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # tree statistics through collective_rpc
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", default="0.01,0.05,0.09,0.2")
    parser.add_argument("--delta", type=float, default=0.3, help="typical_delta (the paper's sqrt(eps)-like cap)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tree", default="medusa-16")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                        help="default: the fast dtype of this machine (vllm_medusa.hardware.fast_dtype)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/typical_quality"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from vllm_medusa.convert import ensure_smollm2
    from vllm_medusa.hardware import fast_dtype
    from vllm_medusa.mtbench import chat_prompts
    from vllm_medusa.shipped import default_heads

    args.dtype = args.dtype or fast_dtype()
    model_dir = ensure_smollm2(args.dtype)
    prompts = chat_prompts(model_dir, args.prompts)
    modes = {f"typical eps={e}": {"medusa_acceptance": "typical", "typical_eps": float(e), "typical_delta": args.delta}
             for e in args.eps.split(",")}
    modes["lossless"] = {"medusa_acceptance": "lossless"}

    outputs: dict[str, list[list[int]]] = {}
    speed: dict[str, list[float]] = {name: [] for name in ["plain vLLM", *modes]}
    tau: dict[str, float] = {}
    outputs["plain vLLM"] = _generate(model_dir, args, prompts, {}, None, speed["plain vLLM"])
    heads = default_heads(model_dir)
    spec = {"speculative_config": {"method": "medusa", "model": str(heads)},
            "additional_config": {"medusa": {"tree": args.tree, "adaptive": False}}}
    engine = _engine(model_dir, args, spec)
    try:
        for _ in range(args.rounds):
            for name, extra in modes.items():
                engine.collective_rpc(lambda worker: worker.model_runner._medusa.reset_stats())
                outputs[name] = _generate(model_dir, args, prompts, extra, engine, speed[name])
                tau[name] = engine.collective_rpc(lambda worker: worker.model_runner._medusa.stats.tau)[0]
                print(f"[typical] {name}: {speed[name][-1]:.1f} tok/s, tau {tau[name]:.2f}", flush=True)
    finally:
        engine.llm_engine.engine_core.shutdown()

    quality = _quality(model_dir, prompts, outputs)
    rows = [{"mode": name, "tokens_per_s": statistics.median(speed[name]), "tau": tau.get(name, 1.0),
             "tokens": sum(map(len, outputs[name])), **quality[name]} for name in outputs]
    meta = {"model": str(model_dir), "dtype": args.dtype, "tree": args.tree, "temperature": args.temperature,
            "delta": args.delta, "prompts": args.prompts, "max_tokens": args.max_tokens, "rounds": args.rounds,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = _markdown(rows, meta)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def _engine(model_dir: Path, args: argparse.Namespace, extra: dict):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0,
               max_num_seqs=args.prompts, **extra)


def _generate(model_dir, args, prompts, extra_args, engine, speeds: list[float]) -> list[list[int]]:
    """Output token ids per prompt (request i seeded with i); appends the run's tokens/s to `speeds`.
    engine None: a plain engine for this call only."""
    from vllm import SamplingParams

    own = engine is None
    engine = _engine(model_dir, args, {}) if own else engine
    try:
        params = [SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=i,
                                 extra_args=extra_args or None) for i in range(len(prompts))]
        engine.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
        start = time.perf_counter()
        results = engine.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        if own:
            engine.llm_engine.engine_core.shutdown()
    tokens = [list(r.outputs[0].token_ids) for r in results]
    speeds.append(sum(map(len, tokens)) / elapsed)
    return tokens


def _quality(model_dir: Path, prompts: list[str], outputs: dict[str, list[list[int]]]) -> dict[str, dict]:
    """Per mode: mean log-likelihood per generated token under the base model, and the repetition rate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    result = {}
    for name, per_prompt in outputs.items():
        logliks, repeats = [], []
        for prompt, out in zip(prompt_ids, per_prompt):
            if not out:
                continue
            ids = torch.tensor([prompt + out])
            with torch.no_grad():
                logprobs = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            logliks.append(logprobs.gather(1, torch.tensor(out)[:, None]).squeeze(1))
            repeats.append(repetition_rate(out))
        all_ll = torch.cat(logliks)
        result[name] = {"mean_loglik": float(all_ll.mean()), "repetition_rate": statistics.mean(repeats)}
    return result


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of `tokens` that already occurred earlier in `tokens` (0 for short outputs)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeated = set(), 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams)


def _markdown(rows: list[dict], meta: dict) -> str:
    lossless = next(r for r in rows if r["mode"] == "lossless")
    lines = [f"SmolLM2-135M-Instruct {meta['dtype']}, tree {meta['tree']}, temperature {meta['temperature']}, "
             f"delta {meta['delta']}, {meta['prompts']} MT-Bench prompts x <= {meta['max_tokens']} tokens, "
             f"{meta['cpus']} CPUs, {meta['date']}", "",
             "| acceptance | tokens/s | vs lossless | tau | mean log-lik / token | repetition (4-grams) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / lossless['tokens_per_s']:.2f}x | "
                     f"{r['tau']:.2f} | {r['mean_loglik']:.3f} | {r['repetition_rate']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
