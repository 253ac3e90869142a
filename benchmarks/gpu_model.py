"""Model-level timing on one GPU: Medusa vs plain greedy decoding, both CUDA-graph captured (no vLLM needed).

    python benchmarks/gpu_model.py --model SMOLLM2_BF16_DIR [--heads DIR] [--trees 16,64] --out $OUT/gpu_model.json

Plain: `plain_generate`, one graph replay per token over a static cache. Medusa: `MedusaGenerator` with the
heads, one graph replay per step (propose, verify the tree, accept greedily, move the accepted KV), one sync
per step to read the emitted tokens. Both use the same attention code (GQA folded into SDPA). Per MT-Bench
question (first turn, chat template, `--max-tokens` new tokens): wall time of the whole generation after a
warm-up generation, tokens/s, tau (tokens per step) and whether the two outputs match (bf16: a tree forward
and a one-token forward may round differently, so an occasional split is expected; float32 matches exactly).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_medusa.checkpoint import load_heads  # noqa: E402
from vllm_medusa.mtbench import load_mtbench  # noqa: E402
from vllm_medusa.reference import MedusaGenerator, plain_generate  # noqa: E402
from vllm_medusa.shipped import default_heads  # noqa: E402
from vllm_medusa.tree import TreeSpec  # noqa: E402


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model directory (SmolLM2-135M-Instruct)")
    p.add_argument("--heads", type=Path, default=None, help="heads directory (default: the shipped ones)")
    p.add_argument("--trees", default="16,64", help="tree sizes (greedy sparse trees from the heads' accuracies)")
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_medusa.tree import build_sparse_tree

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    heads_dir = args.heads or default_heads(Path(args.model))
    heads, _ = load_heads(heads_dir)
    heads = heads.to(device, dtype).eval()
    accuracy = json.loads((heads_dir / "accuracy.json").read_text())
    rank_acc = torch.tensor(accuracy["rank_accuracies"])
    trees = {int(n): build_sparse_tree(rank_acc, int(n)) for n in args.trees.split(",")}
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q.turns[0]}], add_generation_prompt=True)["input_ids"]
        for q in load_mtbench(limit=args.questions)
    ]
    eos = tokenizer.eos_token_id
    graphs = device.type == "cuda"

    def plain(ids):
        return plain_generate(model, ids, args.max_tokens, eos_token_id=eos, cuda_graph=graphs)

    def medusa(tree: TreeSpec):
        generator = MedusaGenerator(model, heads, tree, cuda_graph=graphs)
        return lambda ids: generator.generate(ids, args.max_tokens, eos_token_id=eos)

    runners = {"plain": plain, **{f"medusa-{n}": medusa(tree) for n, tree in trees.items()}}
    plain_tokens: list[list[int]] = []  # per question, the reference for "same output"
    reports = []
    for name, run in runners.items():
        run(prompts[0])  # warm-up: kernels, cuBLAS workspaces, allocator
        times, tokens, steps, same = [], 0, 0, 0
        for index, ids in enumerate(prompts):
            result, seconds = timed(lambda: run(ids))
            times.append(seconds)
            tokens += len(result.tokens)
            steps += result.steps + 1  # + the prefill, which emits the first token
            if name == "plain":
                plain_tokens.append(result.tokens)
            else:
                same += result.tokens == plain_tokens[index]
        total = sum(times)
        report = {"runner": name, "tokens": tokens, "seconds": round(total, 4),
                  "tokens_per_s": round(tokens / total, 1), "tokens_per_step": round(tokens / steps, 3),
                  "median_s_per_question": round(statistics.median(times), 4)}
        if name != "plain":
            report["same_output"] = f"{same}/{len(prompts)}"
        print(json.dumps(report), flush=True)
        reports.append(report)
    plain_rate = reports[0]["tokens_per_s"]
    for r in reports:
        r["speedup"] = round(r["tokens_per_s"] / plain_rate, 3)
    summary = {"device": torch.cuda.get_device_name() if graphs else "cpu", "dtype": args.dtype,
               "heads": str(heads_dir), "questions": len(prompts), "max_tokens": args.max_tokens,
               "cuda_graph": graphs, "results": reports}
    print("| runner | tokens/s | tokens/step | speedup | same output |\n|---|---|---|---|---|")
    for r in reports:
        print(f"| {r['runner']} | {r['tokens_per_s']} | {r['tokens_per_step']} | {r['speedup']}x | "
              f"{r.get('same_output', '-')} |")
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
