"""Step-cost curve of one tree-verification forward on a GPU, and a PROJECTED tokens/s table.

    python benchmarks/gpu_step_cost.py --out $OUT/gpu_step_cost.json     # GPU machine (no vLLM needed)
    python benchmarks/gpu_step_cost.py --tiny                            # CPU smoke test, tiny model

What is timed: a Llama-7B-shaped model with RANDOM weights (hidden 4096, 32 layers, 32 heads, 32 KV heads,
intermediate 11008, vocabulary 32000; bf16; `attn_implementation="sdpa"`), a `StaticCache` already holding a
`--context`-token prompt (512) for each of B requests, and one verification forward of N tree nodes + 1 root
per request: input_ids [B, N+1], position_ids context + depth, an additive 4D mask [B, 1, N+1, S] over the
whole static cache length S = context + max(N) + 1 (prompt visible, tree nodes see their ancestors only),
then the LM head on all N+1 rows (the logits the acceptance reads). N = 0 is a plain decode step over the
same cache. Each (B, N) is captured in its own CUDA graph; the graph first resets the cache's write index
to `context` (one tiny kernel), so every replay writes the tree into the same slots. Time = median of
`--replays` (>= 20) replays, each between two CUDA events.

The projection: tokens/s(B, N) = B * tau(N) / t(B, N), tau(0) = 1, with tau(N) the measured tokens per step
of the shipped SmolLM2-135M heads (`accuracy.json` `tau`) or a JSON file given with `--tau-per-nodes`.
It combines random-weight 7B timing with SmolLM2 head acceptance: a projection, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm_medusa.tree import TreeSpec  # noqa: E402

DEFAULT_TAU = REPO / "vllm_medusa" / "shipped_heads" / "smollm2-135m-instruct" / "accuracy.json"
LLAMA_7B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    intermediate_size=11008, vocab_size=32000,
)
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    intermediate_size=128, vocab_size=512,
)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def tree_of(nodes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ancestor mask [N+1, N+1] bool, depths [N+1]) of the N-node preset tree (root only for N = 0)."""
    if nodes == 0:
        return torch.ones(1, 1, dtype=torch.bool, device=device), torch.zeros(1, dtype=torch.long, device=device)
    tree = TreeSpec.preset(nodes)
    return tree.ancestor_mask.to(device), tree.depths.to(device)


class BatchCache:
    """A StaticCache for B requests holding `context` prompt tokens, whose per-layer write index is a view into
    one tensor, so a single `fill_` rewinds every layer to the end of the prompt."""

    def __init__(self, model: torch.nn.Module, batch: int, context: int, max_len: int, device: torch.device):
        from transformers import StaticCache

        self.context, self.max_len = context, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        prompt = torch.randint(model.config.vocab_size, (batch, context), device=device)
        with torch.inference_mode():
            model.base_model(input_ids=prompt, past_key_values=self.cache, use_cache=True)
        layers = self.cache.layers
        self.lengths = torch.full((len(layers),), context, dtype=layers[0].cumulative_length.dtype, device=device)
        for i, layer in enumerate(layers):
            assert int(layer.cumulative_length) == context, "prefill did not fill the static cache as expected"
            layer.cumulative_length = self.lengths[i]  # 0-d view: add_ in update() advances self.lengths[i]

    def rewind(self) -> None:
        self.lengths.fill_(self.context)


class VerifyStep:
    """One verification forward of B requests x (N+1) tree tokens, from static input buffers."""

    def __init__(self, model, bc: BatchCache, batch: int, nodes: int, roots: torch.Tensor, device, dtype):
        self.model, self.bc = model, bc
        ancestor, depths = tree_of(nodes, device)
        t = nodes + 1
        self.input_ids = torch.randint(model.config.vocab_size, (batch, t), device=device)
        self.input_ids[:, 0] = roots
        self.position_ids = (bc.context + depths)[None].expand(batch, t).contiguous()
        allowed = torch.zeros(t, bc.max_len, dtype=torch.bool, device=device)
        allowed[:, : bc.context] = True
        allowed[:, bc.context : bc.context + t] = ancestor
        additive = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        self.mask = additive[None, None].expand(batch, 1, t, bc.max_len).contiguous()  # per request, as served

    def __call__(self) -> torch.Tensor:
        """-> logits [B, N+1, V]."""
        self.bc.rewind()
        out = self.model.base_model(
            input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=self.mask,
            past_key_values=self.bc.cache, use_cache=True,
        )
        return self.model.get_output_embeddings()(out.last_hidden_state)


def time_cuda(step: VerifyStep, replays: int, warmup_eager: int = 2) -> tuple[list[float], torch.Tensor]:
    """Capture `step` in a CUDA graph; seconds of each of `replays` replays (CUDA events) and the logits."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(warmup_eager):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        with torch.cuda.graph(graph):
            logits = step()
    for _ in range(3):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    seconds = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    out = logits.clone()
    del graph
    return seconds, out


def time_eager(step: VerifyStep, replays: int) -> tuple[list[float], torch.Tensor]:
    with torch.inference_mode():
        logits = step()
        seconds = []
        for _ in range(replays):
            t0 = time.perf_counter()
            logits = step()
            seconds.append(time.perf_counter() - t0)
    return seconds, logits


def load_tau(path: str | None) -> tuple[dict[int, float], str]:
    """{N: tau} from a JSON file: either {"16": 1.77, ...} or an object with a "tau" key (accuracy.json)."""
    source = Path(path) if path else DEFAULT_TAU
    data = json.loads(source.read_text())
    if isinstance(data, dict) and "tau" in data:
        data = data["tau"]
    tau = {int(k): float(v) for k, v in data.items()}
    tau.setdefault(0, 1.0)
    try:
        label = str(source.resolve().relative_to(REPO))
    except ValueError:
        label = str(source)
    return tau, label


def tau_at(tau: dict[int, float], nodes: int) -> float | None:
    """tau(N), linearly interpolated in N between measured sizes; None outside them."""
    if nodes in tau:
        return tau[nodes]
    lo = max((k for k in tau if k < nodes), default=None)
    hi = min((k for k in tau if k > nodes), default=None)
    if lo is None or hi is None:
        return None
    return tau[lo] + (tau[hi] - tau[lo]) * (nodes - lo) / (hi - lo)


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU, float32, no CUDA graphs (smoke test)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 64 (tiny: 1 2)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[0, 16, 32, 64])
    ap.add_argument("--context", type=int, default=None, help="prompt tokens in the cache (default 512; tiny 32)")
    ap.add_argument("--replays", type=int, default=None, help="timed replays per cell (default 30; tiny 3)")
    ap.add_argument("--tau-per-nodes", default=None,
                    help=f"JSON {{N: tau}} or a file with a 'tau' key (default {DEFAULT_TAU.relative_to(REPO)})")
    ap.add_argument("--time-budget", type=float, default=300.0,
                    help="seconds after which remaining (largest) cells are skipped")
    ap.add_argument("--out", default=None, help="JSON output (default $OUT/gpu_step_cost.json if $OUT is set)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    use_cuda = not args.tiny
    if use_cuda and not torch.cuda.is_available():
        ap.error("no CUDA device: use --tiny for the CPU smoke test")
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    shape = TINY if args.tiny else LLAMA_7B
    batches = args.batches or ([1, 2] if args.tiny else [1, 8, 32, 64])
    nodes_list = sorted(set(args.nodes) | {0})
    context = args.context or (32 if args.tiny else 512)
    replays = args.replays or (3 if args.tiny else 30)
    if use_cuda and replays < 20:
        ap.error("--replays must be >= 20 on the GPU")
    device_name = torch.cuda.get_device_name() if use_cuda else f"CPU ({os.cpu_count()} cores, tiny config)"
    print(f"# Verification step cost: {device_name}\n", flush=True)
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    model = build_model(shape, device, dtype)
    max_len = -(-(context + max(nodes_list) + 1) // 16) * 16  # a multiple of 16: SDPA kernels need no mask padding
    cells: dict[tuple[int, int], dict] = {}
    for batch in batches:
        if time.perf_counter() - t_start > args.time_budget:
            for nodes in nodes_list:
                cells[(batch, nodes)] = {"status": "skipped (time budget)"}
            continue
        try:
            bc = BatchCache(model, batch, context, max_len, device)
        except torch.OutOfMemoryError:
            for nodes in nodes_list:
                cells[(batch, nodes)] = {"status": "skipped (out of memory for the cache)"}
            torch.cuda.empty_cache()
            continue
        roots = torch.randint(shape["vocab_size"], (batch,), device=device)
        root_logits0 = None
        for nodes in nodes_list:
            if time.perf_counter() - t_start > args.time_budget:
                cells[(batch, nodes)] = {"status": "skipped (time budget)"}
                continue
            try:
                step = VerifyStep(model, bc, batch, nodes, roots, device, dtype)
                seconds, logits = time_cuda(step, replays) if use_cuda else time_eager(step, replays)
            except torch.OutOfMemoryError:
                cells[(batch, nodes)] = {"status": "skipped (out of memory)"}
                step = logits = None
                torch.cuda.empty_cache()
                continue
            root = logits[:, 0].float()
            if root_logits0 is None:
                root_logits0 = root
            diff = float((root - root_logits0).abs().max())  # root row sees the same keys whatever N is
            cells[(batch, nodes)] = {
                "status": "ok", "median_s": statistics.median(seconds), "min_s": min(seconds),
                "max_s": max(seconds), "replays": len(seconds), "root_logits_max_abs_diff_vs_n0": diff,
            }
            print(f"  B={batch:3d} N={nodes:3d}: {statistics.median(seconds) * 1e3:9.3f} ms "
                  f"(root logits vs N=0: max |diff| {diff:.3g})", file=sys.stderr, flush=True)
            del step, logits
        del bc
        if use_cuda:
            torch.cuda.empty_cache()
        if args.tiny:
            for nodes in nodes_list:
                d = cells[(batch, nodes)].get("root_logits_max_abs_diff_vs_n0", 0.0)
                assert d < 1e-4, f"tree mask/positions broken: root logits differ by {d} at B={batch} N={nodes}"

    def t(b: int, n: int) -> float | None:
        c = cells.get((b, n), {})
        return c.get("median_s") if c.get("status") == "ok" else None

    tau, tau_source = load_tau(args.tau_per_nodes)
    tau_label = "of the shipped SmolLM2-135M heads" if args.tau_per_nodes is None else "given with --tau-per-nodes"
    lines: list[str] = []
    model_label = "tiny Llama (hidden 64, 2 layers), float32, eager" if args.tiny else \
        "Llama-7B shape, random weights, bf16, SDPA, CUDA graphs"
    short_label = "tiny-model (smoke test)" if args.tiny else "random-weight Llama-7B-shaped"
    lines.append(f"Device: **{device_name}**. Model: {model_label}; context {context} tokens in a StaticCache "
                 f"(static length {max_len}); one forward of N tree nodes + 1 root per request, LM head on all "
                 f"rows; median of {replays} {'graph replays (CUDA events)' if use_cuda else 'eager calls'}.\n")
    header = "| batch B | " + " | ".join(f"N={n}" for n in nodes_list) + " |"
    sep = "|---|" + "---|" * len(nodes_list)
    lines += ["### Step time t(B, N), ms\n", header, sep]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(fmt(None if t(b, n) is None else t(b, n) * 1e3, ".2f")
                                              for n in nodes_list) + " |")
    lines += ["", "### Relative step cost t(B, N) / t(B, 0)\n", header, sep]
    for b in batches:
        base = t(b, 0)
        lines.append(f"| {b} | " + " | ".join(
            fmt(t(b, n) / base if base and t(b, n) else None, ".2f") + "x" * bool(base and t(b, n))
            for n in nodes_list) + " |")
    skipped = [(b, n, c["status"]) for (b, n), c in cells.items() if c["status"] != "ok"]
    if skipped:
        lines.append("\nDropped cells: " + "; ".join(f"B={b} N={n}: {s}" for b, n, s in skipped) + ".")

    lines += ["", "### PROJECTED tokens/s = B * tau(N) / t(B, N)\n",
              f"**Projection, not a measurement:** {short_label} step timing on {device_name} x "
              f"acceptance tau(N) {tau_label} ({tau_source}; tau(0) = 1, plain decoding). "
              "A real 7B model with its own heads would have a different tau; the draft (heads) cost and "
              "acceptance/compaction work are not included.\n",
              "| batch B | " + " | ".join(f"N={n} (tau {fmt(tau_at(tau, n), '.2f')})" for n in nodes_list)
              + " | best N | best vs N=0 |", "|---|" + "---|" * (len(nodes_list) + 2)]
    projection = {}
    for b in batches:
        row = {}
        for n in nodes_list:
            tn, tau_n = t(b, n), tau_at(tau, n)
            row[n] = b * tau_n / tn if tn and tau_n else None
        valid = {n: v for n, v in row.items() if v is not None}
        best = max(valid, key=valid.get) if valid else None
        gain = valid[best] / row[0] if best is not None and row.get(0) else None
        projection[b] = {"tokens_per_s": {str(n): v for n, v in row.items()}, "best_nodes": best,
                         "best_vs_plain": gain}
        lines.append(f"| {b} | " + " | ".join(fmt(row[n], ".1f") for n in nodes_list)
                     + f" | {fmt(best, 'd') if best is not None else '—'} | {fmt(gain, '.2f')}x |")
    markdown = "\n".join(lines)
    print(markdown)

    # t(x) over total tokens x = B * (N + 1) in `StepCost` format (vllm_medusa.adaptive.StepCost.from_json).
    points = {b * (n + 1): t(b, n) for b in batches for n in nodes_list if t(b, n)}
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": {**shape, "dtype": str(dtype).removeprefix("torch."), "weights": "random",
                  "attn_implementation": "sdpa", "cuda_graphs": use_cuda},
        "context": context, "static_cache_len": max_len, "replays": replays,
        "cells": [{"batch": b, "nodes": n, **c} for (b, n), c in sorted(cells.items())],
        "relative_cost": {str(b): {str(n): (t(b, n) / t(b, 0) if t(b, 0) and t(b, n) else None)
                                   for n in nodes_list} for b in batches},
        "tau": {str(k): v for k, v in sorted(tau.items())}, "tau_source": tau_source,
        "projection_note": f"PROJECTION: {short_label} step timing x acceptance tau(N) {tau_label}",
        "projection": {str(b): v for b, v in projection.items()},
        "step_cost": {"sizes": sorted(points), "seconds": [points[x] for x in sorted(points)]},
        "wall_s": time.perf_counter() - t_start,
        "markdown": markdown,
    }
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_step_cost.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"\nJSON: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
