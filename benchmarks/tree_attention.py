"""Benchmark of the Triton tree attention kernel (GPU only): `python -m benchmarks.tree_attention`.

Llama-7B attention shape: 32 query heads of size 128, bf16, 32 KV heads by default (`--kv-heads 8` for a
Llama-3-8B-like GQA shape), vLLM's GPU cache layout with 16-token blocks in a shuffled block table.
For each batch size, context length and tree size N (0 = plain decode: the root only) it times
* ours: `tree_attention` on the paged cache (split-K, one launch plus the merge);
* (a) PyTorch SDPA with the tree mask on the same data already gathered into contiguous K/V (the gather
  and the mask building are not timed);
* (b) at N=0, a dense decode baseline that is not ours: PyTorch SDPA without a mask on contiguous K/V,
  the fastest of its flash, cuDNN and memory-efficient backends.
Each time is the median of CUDA-graph replays, every graph running 8+ calls over input copies that
together exceed the L2 cache. Bandwidth counts unique bytes (K/V of every key once, queries, outputs)
and is given as a fraction of the measured device copy bandwidth (a 1 GiB copy, read + write bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vllm_medusa.kernels import build_tree_attention_metadata, split_kv_cache, tree_attention, tree_attention_mask
from vllm_medusa.kernels.tree_attention import TilePlan, TreeAttentionMetadata
from vllm_medusa.tree import TreeSpec, build_sparse_tree

NUM_HEADS, HEAD_SIZE, BLOCK_SIZE, DTYPE = 32, 128, 16, torch.bfloat16
ROTATE_BYTES = 256 << 20  # input copies per timed graph: at least this many bytes, about 5x an H100's L2
MIN_CALLS = 8  # calls per graph, so the graph launch itself is amortised
BATCHES, CONTEXTS, NODES = (1, 8, 32), (512, 4096, 16384), (0, 16, 64, 128)
GOAL_BATCHES, GOAL_CONTEXTS = (1, 8), (4096, 16384)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    context: int
    nodes: int


@dataclasses.dataclass
class Inputs:
    """`copies` independent input sets of one case (same block table and metadata)."""

    paged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (query [T, H, D], K, V cache views)
    meta: TreeAttentionMetadata
    mask: torch.Tensor  # [N+1, S] bool, every request's tree mask (all have the same context)
    unique_bytes: int


def tree_of(nodes: int) -> TreeSpec | None:
    """The 16/64-node presets; 128 nodes grown from Vicuna-7B-like head accuracies; None for N = 0."""
    if nodes == 0:
        return None
    if nodes <= 64:
        return TreeSpec.preset(nodes)
    top1 = torch.tensor([0.56, 0.32, 0.20, 0.15, 0.12], dtype=torch.float64)
    accuracies = top1[:, None] * 0.6 ** torch.arange(10, dtype=torch.float64)  # [heads, top-10]
    return build_sparse_tree(accuracies, nodes)


def make_inputs(case: Case, kv_heads: int, copies_for: Callable[[int], int]) -> Inputs:
    tree = tree_of(case.nodes)
    ancestor = tree.ancestor_mask if tree else torch.ones(1, 1, dtype=torch.bool)
    q_len = case.nodes + 1
    seq_len = case.context + q_len
    blocks_per_req = math.ceil(seq_len / BLOCK_SIZE)
    num_blocks = case.batch * blocks_per_req
    block_table = torch.randperm(num_blocks, device="cuda").view(case.batch, blocks_per_req)
    kv_bytes = case.batch * seq_len * kv_heads * HEAD_SIZE * 2 * DTYPE.itemsize
    qo_bytes = 2 * case.batch * q_len * NUM_HEADS * HEAD_SIZE * DTYPE.itemsize
    paged = []
    for _ in range(copies_for(kv_bytes)):
        # vLLM's GPU default layout: [num_blocks, block_size, H_kv, 2D] in memory, logical [nb, H_kv, bs, 2D].
        kv = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, 2 * HEAD_SIZE, device="cuda", dtype=DTYPE)
        query = torch.randn(case.batch * q_len, NUM_HEADS, HEAD_SIZE, device="cuda", dtype=DTYPE)
        paged.append((query, *split_kv_cache(kv.transpose(1, 2), HEAD_SIZE)))
    meta = build_tree_attention_metadata(
        block_table,
        torch.full((case.batch,), seq_len),
        torch.arange(case.batch + 1) * q_len,
        torch.full((case.batch,), case.nodes),
        ancestor,
        num_heads=NUM_HEADS,
        num_kv_heads=kv_heads,
        max_query_len=q_len,
        max_seq_len=seq_len,
    )
    mask = tree_attention_mask(q_len, seq_len, case.nodes, ancestor).cuda()
    return Inputs(paged, meta, mask, kv_bytes + qo_bytes)


def gathered(inputs: Inputs, batch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each copy as contiguous SDPA operands: q [B, H, Q, D], k and v [B, H_kv, S, D]."""
    seq_len = inputs.mask.shape[1]
    keys = torch.arange(seq_len, device="cuda")
    blocks = inputs.meta.block_table[:, keys // BLOCK_SIZE].long()  # [B, S]
    out = []
    for query, key_cache, value_cache in inputs.paged:
        k = key_cache[blocks, keys % BLOCK_SIZE].transpose(1, 2).contiguous()
        v = value_cache[blocks, keys % BLOCK_SIZE].transpose(1, 2).contiguous()
        out.append((query.view(batch, -1, NUM_HEADS, HEAD_SIZE).transpose(1, 2), k, v))
    return out


def additive_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, 1, Q, S] bias (0 / -inf), row stride padded to 16 elements for the fused SDPA kernels."""
    q_len, seq_len = mask.shape
    bias = torch.full((q_len, -(-seq_len // 16) * 16), float("-inf"), device="cuda", dtype=DTYPE)
    bias[:, :seq_len].masked_fill_(mask, 0.0)
    return bias[:, :seq_len].expand(batch, 1, q_len, seq_len)


def time_us(calls: list[Callable[[], object]], reps: int = 15) -> float:
    """Median microseconds per call, replaying one CUDA graph that runs `calls` (cycled to MIN_CALLS)."""
    calls = [calls[i % len(calls)] for i in range(max(MIN_CALLS, len(calls)))]
    for call in calls[:2]:
        call()  # compile / pick kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) * 1e3 / len(calls)


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (a 1 GiB tensor, read + write bytes)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (time_us([lambda: dst.copy_(src)], reps=20) * 1e-6)


def time_ours(inputs: Inputs, meta: TreeAttentionMetadata | None = None) -> float:
    meta = meta or inputs.meta
    outs = [torch.empty_like(query) for query, _, _ in inputs.paged]
    return time_us([
        lambda q=q, k=k, v=v, o=o: tree_attention(q, k, v, meta, HEAD_SIZE**-0.5, out=o)
        for (q, k, v), o in zip(inputs.paged, outs)
    ])


def time_sdpa_masked(operands: list, bias: torch.Tensor, gqa: bool) -> float:
    return time_us([
        lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
        for q, k, v in operands
    ])


def time_dense_decode(operands: list, gqa: bool) -> tuple[float, str]:
    """(b): the fastest PyTorch SDPA backend that runs unmasked decode on contiguous K/V."""
    results = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                results.append((time_sdpa_masked(operands, None, gqa), backend.name.split("_")[0].lower()))
        except RuntimeError:  # backend not available for this shape
            continue
    return min(results)


def copies_for(kv_bytes: int) -> int:
    return max(1, math.ceil(ROTATE_BYTES / kv_bytes))


def run_table(cases: list[Case], kv_heads: int, copy_bw: float) -> list[dict]:
    rows, base = [], {}
    for case in cases:
        inputs = make_inputs(case, kv_heads, copies_for)
        ours = time_ours(inputs)
        operands = gathered(inputs, case.batch)
        gqa = kv_heads != NUM_HEADS
        sdpa = time_sdpa_masked(operands, additive_mask(inputs.mask, case.batch), gqa)
        dense = time_dense_decode(operands, gqa) if case.nodes == 0 else None
        if case.nodes == 0:
            base[case.batch, case.context] = ours
        bandwidth = inputs.unique_bytes / (ours * 1e-6)
        rows.append(dict(
            case=case, ours=ours, bw=bandwidth, frac=bandwidth / copy_bw, sdpa=sdpa, dense=dense,
            rel=ours / base[case.batch, case.context], splits=inputs.meta.num_splits, plan=inputs.meta.plan,
        ))
        print(format_row(rows[-1]), flush=True)
        del inputs, operands
        torch.cuda.empty_cache()
    return rows


HEADER = (
    "| batch | context | N | ours µs | t(N)/t(0) | ours GB/s | % copy BW | (a) SDPA+mask µs | (a)/ours "
    "| (b) dense decode µs | splits | tile |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r: dict) -> str:
    c, plan = r["case"], r["plan"]
    dense = f"{r['dense'][0]:.1f} ({r['dense'][1]})" if r["dense"] else ""
    tile = f"{plan.m_tiles}x{plan.block_m}" + (" + root" if plan.root_row else "")
    return (
        f"| {c.batch} | {c.context} | {c.nodes} | {r['ours']:.1f} | {r['rel']:.2f} | {r['bw'] / 1e9:.0f} "
        f"| {100 * r['frac']:.0f}% | {r['sdpa']:.1f} | {r['sdpa'] / r['ours']:.1f}x | {dense} | {r['splits']} "
        f"| {tile} |"
    )


def goal_summary(rows: list[dict]) -> str:
    """The goals at batch 1 and 8, contexts 4k and 16k: t(64)/t(0) <= 1.3, >= 60% of copy bandwidth."""
    lines = []
    for r in rows:
        c = r["case"]
        if c.batch in GOAL_BATCHES and c.context in GOAL_CONTEXTS and c.nodes in (0, 64):
            ok = r["frac"] >= 0.6 and (c.nodes == 0 or r["rel"] <= 1.3)
            lines.append(f"- batch {c.batch}, context {c.context}, N={c.nodes}: t(N)/t(0) {r['rel']:.2f}, "
                         f"{100 * r['frac']:.0f}% of copy bandwidth: {'met' if ok else 'MISSED'}")
    return "\n".join(lines)


# Launch variants the sweep times next to the automatic plan, by tree size (MHA only).
SWEEP_PLANS = {
    0: [TilePlan(16, 1, num_stages=stages) for stages in (2, 3, 4, 5)],
    64: [TilePlan(64, 1), TilePlan(64, 1, num_stages=4)]  # no root row: its output is wrong, a lower bound
    + [TilePlan(64, 1, True, num_stages=stages) for stages in (2, 3, 4)]
    + [TilePlan(64, 1, True, block_n=32, num_stages=stages) for stages in (3, 4, 5, 6)]
    + [TilePlan(128, 1, False, num_warps=8, num_stages=3)],
}


def sweep(kv_heads: int) -> None:
    """Split counts and tile plans at the goal cells, for tuning the heuristics.

    A plan of 64 rows without the root row computes one row too few for N = 64 (its output is wrong): it
    times the 64-row tile alone, i.e. what the root's separate block adds.
    """
    print(f"\nsweep ({kv_heads} KV heads): µs per call for num_splits / tile plan variants")
    for batch, context, nodes in itertools.product(GOAL_BATCHES, GOAL_CONTEXTS, (0, 64)):
        inputs = make_inputs(Case(batch, context, nodes), kv_heads, copies_for)
        meta = inputs.meta
        variants = {f"auto: {meta.plan}, {meta.num_splits} splits": meta}
        for splits in (1, 2, 4, 6, 8, 12, 16, 24, 32):
            variants[f"{splits} splits"] = dataclasses.replace(meta, num_splits=splits)
        for plan in SWEEP_PLANS[nodes] if kv_heads == NUM_HEADS else ():
            for splits in sorted({meta.num_splits, 2 * meta.num_splits} if batch == 1 else {meta.num_splits}):
                variants[f"{plan}, {splits} splits"] = dataclasses.replace(meta, plan=plan, num_splits=splits)
        for name, variant in variants.items():
            print(f"batch {batch} context {context} N={nodes}, {name}: {time_ours(inputs, variant):.1f}", flush=True)
        del inputs
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-heads", type=int, default=32, help="KV heads (32: Llama-7B MHA; 8: GQA)")
    parser.add_argument("--goal-cells", action="store_true", help="only batch 1/8, context 4k/16k")
    parser.add_argument("--sweep", action="store_true", help="also sweep split counts and tile plans (N=0, 64)")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    # SDPA explains at every call why a fused backend refused (GQA, masks); the table says what ran.
    warnings.simplefilter("ignore", UserWarning)
    copy_bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    batches, contexts = (GOAL_BATCHES, GOAL_CONTEXTS) if args.goal_cells else (BATCHES, CONTEXTS)
    title = (f"{device}, copy bandwidth {copy_bw / 1e12:.2f} TB/s; {NUM_HEADS} query heads, {args.kv_heads} KV "
             f"heads, head size {HEAD_SIZE}, bf16, block size {BLOCK_SIZE}")
    print(title + "\n" + HEADER, flush=True)
    cases = [Case(b, c, n) for b, c, n in itertools.product(batches, contexts, NODES)]
    rows = run_table(cases, args.kv_heads, copy_bw)
    summary = goal_summary(rows)
    print("\n" + summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join([title, "", HEADER, *map(format_row, rows), "", summary, ""]))
    if args.sweep:
        sweep(args.kv_heads)


if __name__ == "__main__":
    main()
