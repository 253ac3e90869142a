"""One tree-Medusa step inside vLLM's model runner: lay out, verify, compact, propose.

vLLM schedules the N nodes of a request's tree as if they were N chain drafts (chain emulation), so
the scheduler, KV allocation and rollback stay untouched. This object fixes up what a chain gets
wrong, at four points of `GPUModelRunner`'s step (see `patches.py` for where each is called):

1. `lay_out`   after `_prepare_inputs`: RoPE positions of node rows become root + depth, and the
               attention backend learns how many nodes each request has (tree mask).
2. `verify`    instead of the rejection sampler: accept the best path per request (greedy, typical
               or lossless), return it chain-shaped `[num_reqs, max_drafts + 1]` (path tokens,
               bonus, -1 padding) so the scheduler advances `num_computed_tokens` by the path length.
               Steps without drafts come here too, so every token of a request is drawn the same way.
3. `compact`   right after: copy the KV of the accepted nodes into the slots that follow the root,
               where the next step expects them.
4. `propose`   instead of vLLM's chain drafter: heads' top-k at the last accepted node -> tree tokens.

Requests whose options the tree path cannot honour (penalties, logprobs, bad words, structured
output...) get no drafts and are sampled by vLLM's own sampler, one row per request as in plain
decoding: counted in `TreeStats.fallback_steps`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

import time

from vllm_medusa.acceptance import accept_greedy_targets, accept_lossless, accept_typical
from vllm_medusa.adaptive import AdaptiveTree
from vllm_medusa.candidates import fill_tree
from vllm_medusa.heads import MedusaHeads
from vllm_medusa.tree import TreeSpec
from vllm_medusa.vllm.attention import TREE_MODE, move_kv
from vllm_medusa.vllm.settings import Acceptance, MedusaSettings

_SAMPLING_EPS = 1e-5  # vLLM's: a temperature below this is greedy

# Proposer seam: (hidden [R, H], token ids so far per request, K heads, k) -> top-k tokens [R, K, k].
Proposer = Callable[[torch.Tensor, list[np.ndarray], int, int], torch.Tensor]


@dataclass
class TreeStats:
    """Counters of the tree path, per worker (read them with `LLM.collective_rpc`)."""

    steps: int = 0  # verification steps that had at least one tree
    trees: int = 0  # request-steps verified with a tree
    cut_trees: int = 0  # of those, trees the scheduler cut short (context limit, token budget)
    emitted: int = 0  # tokens emitted by those request-steps
    accepted_per_depth: list[int] = field(default_factory=list)  # [d]: paths reaching depth d+1
    trees_by_rule: dict[str, int] = field(default_factory=dict)  # trees per rule: greedy, lossless, typical
    fallback_steps: int = 0  # decode steps of requests left to vLLM's sampler (unsupported options)
    kv_moves: int = 0  # accepted nodes whose KV was moved

    @property
    def tau(self) -> float:
        return self.emitted / self.trees if self.trees else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tau": self.tau}


@dataclass
class _Step:
    num_nodes: np.ndarray  # [R] nodes scheduled per request
    root_rows: np.ndarray  # [R] query row of each request's root (its last row if no nodes)
    fallback: np.ndarray  # [R] bool: sampled by vLLM's sampler
    stale: np.ndarray  # [R] bool: drafts made with an older tree (request skipped a step): all rejected
    tree: TreeSpec  # the tree of this step's drafts
    num_tokens: int  # tokens fed this step, for the cost model


class TreeStep:
    def __init__(
        self,
        settings: MedusaSettings,
        schedule: AdaptiveTree,
        heads: MedusaHeads | None,
        proposer: Proposer | None = None,
        calibrate: Callable[[Any], Any] | None = None,
    ):
        self.settings = settings
        self.calibrate = calibrate  # runner -> StepCost, when no cached curve exists
        self.schedule = schedule
        self.tree: TreeSpec | None = settings.tree  # the tree of the drafts proposed last
        self.heads = heads
        self.proposer = proposer
        self.reset_stats()
        self._tree_by_req: dict[str, TreeSpec] = {}
        self._step: _Step | None = None
        self._last_positions: np.ndarray | None = None  # [R] tree position of each request's last accepted node
        self._acceptance_by_req: dict[str, Acceptance] = {}
        self._fallback_by_req: dict[str, bool] = {}
        self._step_started = time.perf_counter()
        self._timed: tuple[int, bool, float] | None = None  # (tokens, with a tree, runner seconds) of the last step
        self._previous_with_tree: bool | None = None  # whether the step before that had trees
        TREE_MODE.reset(enabled=True)

    def reset_stats(self) -> None:
        self.stats = TreeStats(accepted_per_depth=[0] * self.settings.tree.max_depth)

    # -- per-request options --------------------------------------------------------------------
    def begin_step(self, finished_req_ids: set[str]) -> None:
        """The runner starts a step (its state update): time the previous step, drop finished requests' options.

        A step is timed from its start to the next step's start, so the cost model sees everything a
        step costs the engine (scheduling, output processing), not the model runner's part only. Not
        used: a period more than twice the runner's part (the engine was idle in between), and a step
        that follows a step of the other kind (with / without trees), which leaves work (output
        processing of more or fewer tokens) that this step's period would be charged with.
        """
        now = time.perf_counter()
        if self._timed is not None:
            tokens, with_tree, runner_seconds = self._timed
            period = now - self._step_started
            if period <= 2 * runner_seconds and with_tree == self._previous_with_tree:
                self.schedule.observe_step(tokens, with_tree, period)
            self._previous_with_tree = with_tree
            self._timed = None
        self._step_started = now
        for req_id in finished_req_ids:
            self._acceptance_by_req.pop(req_id, None)
            self._fallback_by_req.pop(req_id, None)
            self._tree_by_req.pop(req_id, None)

    def _request_acceptance(self, runner: Any, req_id: str) -> Acceptance:
        if req_id not in self._acceptance_by_req:
            params = runner.requests[req_id].sampling_params
            self._acceptance_by_req[req_id] = self.settings.acceptance.for_request(params.extra_args)
        return self._acceptance_by_req[req_id]

    def _rules(self, runner: Any, num_reqs: int) -> np.ndarray:
        """[R] acceptance rule of each request this step: greedy, lossless or typical."""
        greedy = (_temperatures(runner, num_reqs) < _SAMPLING_EPS).tolist()
        modes = [self._request_acceptance(runner, r).mode for r in runner.input_batch.req_ids[:num_reqs]]
        rules = ["greedy" if g else ("typical" if m == "typical" else "lossless") for g, m in zip(greedy, modes)]
        return np.array(rules, dtype="<U8")

    def _request_falls_back(self, runner: Any, req_id: str) -> bool:
        if req_id not in self._fallback_by_req:
            self._fallback_by_req[req_id] = unsupported_reason(runner.requests[req_id].sampling_params) is not None
        return self._fallback_by_req[req_id]

    # -- 1. layout ------------------------------------------------------------------------------
    def lay_out(self, runner: Any, spec_meta: Any, num_scheduled: np.ndarray) -> None:
        num_reqs = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:num_reqs]
        num_nodes = (
            np.asarray(spec_meta.num_draft_tokens, dtype=np.int64) if spec_meta is not None
            else np.zeros(num_reqs, dtype=np.int64)
        )
        query_start = runner.query_start_loc.np[: num_reqs + 1].astype(np.int64)
        root_rows = query_start[1:] - num_nodes - 1
        fallback = np.array([self._request_falls_back(runner, r) for r in req_ids], dtype=bool)
        stale = np.array(
            [n > 0 and self._tree_by_req.get(r) is not self.tree for r, n in zip(req_ids, num_nodes)], dtype=bool
        )
        # With no current tree, only stale drafts can be scheduled; the full tree is wide enough for them.
        tree = self.tree or self.settings.tree
        self._step = step = _Step(num_nodes, root_rows, fallback, stale, tree, int(num_scheduled.sum()))
        TREE_MODE.num_nodes = torch.from_numpy(num_nodes)
        TREE_MODE.ancestor_mask = tree.ancestor_mask
        if num_nodes.any() and "depth_positions" not in TREE_MODE.disabled_parts:
            owners = np.repeat(np.arange(num_reqs), num_nodes)
            node_index = _ranges(num_nodes) + 1  # tree position 1..n of each node row
            rows = torch.from_numpy(np.repeat(root_rows, num_nodes) + node_index)
            roots = torch.from_numpy(root_rows[owners])
            depths = step.tree.depths[torch.from_numpy(node_index)]
            runner.positions[rows] = runner.positions[roots] + depths.to(runner.positions.dtype)

    # -- 2. verification ------------------------------------------------------------------------
    def verify(self, runner: Any, logits: torch.Tensor, spec_meta: Any) -> Any:
        from vllm.v1.outputs import SamplerOutput

        step = self._step
        assert step is not None
        num_reqs = len(step.num_nodes)
        max_spec_len = 0 if spec_meta is None else max(spec_meta.max_spec_len, 0)
        if (
            not step.num_nodes.any() and logits.shape[0] == num_reqs and not step.fallback.any()
            and (self._rules(runner, num_reqs) == "greedy").all()
        ):
            # No drafts and all greedy: one logits row per request, whose argmax is the token, as in vLLM's
            # sampler (the general path's dozens of small ops cost ~3% of such a step at batch 4).
            self._last_positions = np.zeros(num_reqs, dtype=np.int64)
            output = torch.full((num_reqs, max_spec_len + 1), -1, dtype=torch.int32)
            output[:, 0] = logits.max(dim=-1).indices.to(torch.int32)
            return SamplerOutput(sampled_token_ids=output, logprobs_tensors=None)
        # Only the nodes some request has: positions past them would cost logits work for nothing (a
        # step without trees still verifies a 1-node tree, whose node is never scheduled).
        tree = _prefix(step.tree, max(1, int(step.num_nodes.max(initial=0))))
        width = tree.num_nodes + 1
        tokens = torch.full((num_reqs, width), -1, dtype=torch.long)
        if spec_meta is None:  # one logits row per request
            first_row = np.arange(num_reqs, dtype=np.int64)
        else:
            sampled_rows = np.asarray(spec_meta.cu_num_sampled_tokens.cpu(), dtype=np.int64)
            first_row = sampled_rows - (step.num_nodes + 1)  # logits row of each request's root
            owners = np.repeat(np.arange(num_reqs), step.num_nodes)
            node_index = _ranges(step.num_nodes) + 1
            tokens[torch.from_numpy(owners), torch.from_numpy(node_index)] = spec_meta.draft_token_ids.cpu().long()
        tokens[torch.from_numpy(step.stale)] = -1
        # Logits row of every (request, tree position); positions past a request's nodes repeat its root
        # row (their tokens are -1, so they are never accepted).
        position = np.arange(width)[None, :]
        rows = first_row[:, None] + np.where(position <= step.num_nodes[:, None], position, 0)
        rows = torch.from_numpy(rows)

        out_tokens, num_emitted, last_pos, rules = self._accept(runner, tree, step.fallback, logits, rows, tokens)

        output = torch.full((num_reqs, max_spec_len + 1), -1, dtype=torch.int32)
        cols = min(out_tokens.shape[1], output.shape[1])
        output[:, :cols] = out_tokens[:, :cols].to(torch.int32)
        logprobs = None
        if step.fallback.any():
            # What plain decoding does: vLLM's sampler on each request's last row (a fallback row's only
            # row). Not vLLM's rejection sampler: it would treat the other requests' trees as chains.
            last_rows = torch.from_numpy(first_row + step.num_nodes)
            runner.input_batch.update_async_output_token_ids()  # as GPUModelRunner._sample does
            plain = runner.sampler(logits=logits[last_rows], sampling_metadata=runner.input_batch.sampling_metadata)
            fallback = torch.from_numpy(step.fallback)
            output[fallback, 0] = plain.sampled_token_ids[fallback, 0].cpu().to(torch.int32)
            if plain.logprobs_tensors is not None:
                logprobs = _spread_rows(plain.logprobs_tensors, output.shape[1])
            last_pos[fallback] = 0
            batch = runner.input_batch
            decoding = batch.num_computed_tokens_cpu[:num_reqs] >= batch.num_prompt_tokens[:num_reqs]
            self.stats.fallback_steps += int((step.fallback & decoding).sum())

        self._last_positions = last_pos.numpy()
        self._record(step, num_emitted, last_pos, rules)
        return SamplerOutput(sampled_token_ids=output, logprobs_tensors=logprobs)

    def _accept(
        self,
        runner: Any,
        tree: TreeSpec,
        fallback: np.ndarray,
        logits: torch.Tensor,
        rows: torch.Tensor,
        tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """Accepted path per request: tokens [R, D+1], num_emitted [R], path[..., last] [R], rule name [R].
        Fallback rows are left to vLLM's sampler (no work or random draws spent on them)."""
        num_reqs = tokens.shape[0]
        meta = runner.input_batch.sampling_metadata
        temperature = _temperatures(runner, num_reqs)
        req_ids = runner.input_batch.req_ids[:num_reqs]
        modes = [self._request_acceptance(runner, r) for r in req_ids]
        rules = self._rules(runner, num_reqs)
        out = torch.full((num_reqs, tree.max_depth + 1), -1, dtype=torch.long)
        emitted = torch.ones(num_reqs, dtype=torch.long)
        last = torch.zeros(num_reqs, dtype=torch.long)

        def put(members: torch.Tensor, result: Any) -> None:
            out[members] = result.tokens
            emitted[members] = result.num_emitted
            last[members] = result.path.gather(1, (result.num_emitted - 1)[:, None]).squeeze(1)

        greedy_idx = torch.from_numpy(np.flatnonzero((rules == "greedy") & ~fallback))
        if greedy_idx.numel():
            if not bool((tokens[greedy_idx] >= 0).any()):  # no tree (e.g. adaptive chose none): plain argmax
                out[greedy_idx, 0] = logits[rows[greedy_idx, 0]].max(dim=-1).indices.cpu()
            else:
                # max().indices: the first maximum, as argmax, but ~5x faster on bf16 CPU logits
                targets = logits.max(dim=-1).indices[rows[greedy_idx]].cpu()
                put(greedy_idx, accept_greedy_targets(tree, tokens[greedy_idx], targets))
        for typical in (False, True):
            idx = torch.from_numpy(np.flatnonzero((rules == ("typical" if typical else "lossless")) & ~fallback))
            if not idx.numel():
                continue
            sub_logits = _processed_logits(logits, rows[idx], meta, idx, temperature[idx])
            unit = torch.ones(len(idx))  # the temperature is already applied
            uniforms = _uniforms(runner, idx, tree.max_depth + 1)
            if typical:
                eps = torch.tensor([modes[i].typical_eps for i in idx.tolist()])
                delta = torch.tensor([modes[i].typical_delta for i in idx.tolist()])
                result = accept_typical(tree, tokens[idx], sub_logits, unit, eps, delta, uniforms=uniforms[:, 0])
            else:
                result = accept_lossless(tree, tokens[idx], sub_logits, unit, uniforms)
            put(idx, result)
        return out, emitted, last, rules

    def _record(self, step: _Step, num_emitted: torch.Tensor, last_pos: torch.Tensor, rules: np.ndarray) -> None:
        with_tree = (step.num_nodes > 0) & ~step.fallback & ~step.stale
        if not with_tree.any():
            return
        self.schedule.observe_acceptance(
            step.tree, step.num_nodes[with_tree], last_pos.numpy()[with_tree], rules[with_tree]
        )
        self.stats.steps += 1
        self.stats.trees += int(with_tree.sum())
        self.stats.cut_trees += int((step.num_nodes[with_tree] < step.tree.num_nodes).sum())
        emitted = num_emitted.numpy()[with_tree]
        self.stats.emitted += int(emitted.sum())
        for d in range(len(self.stats.accepted_per_depth)):
            self.stats.accepted_per_depth[d] += int((emitted - 1 > d).sum())
        for rule, count in zip(*np.unique(rules[with_tree], return_counts=True)):
            self.stats.trees_by_rule[str(rule)] = self.stats.trees_by_rule.get(str(rule), 0) + int(count)

    # -- 3. KV compaction -----------------------------------------------------------------------
    def compact(self, runner: Any, path_positions: torch.Tensor | None = None) -> None:
        """Move the accepted nodes' KV from their tree slots to the slots right after the root."""
        step, last = self._step, self._last_positions
        if step is None or last is None or not last.any() or "kv_move" in TREE_MODE.disabled_parts:
            return
        paths = _paths_to(step.tree, torch.from_numpy(last))  # [R, D+1] tree positions, -1 padded
        depth_index = torch.arange(paths.shape[1])[None, :].expand_as(paths)
        moved = (paths >= 0) & (paths != depth_index)
        if not moved.any():
            return
        owner = moved.nonzero()[:, 0]
        roots = torch.from_numpy(step.root_rows)[owner]
        slot_mapping = TREE_MODE.slot_mapping.long()
        src = slot_mapping[roots + paths[moved]]
        dst = slot_mapping[roots + depth_index[moved]]
        move_kv(src, dst)
        self.stats.kv_moves += int(moved.sum())

    # -- 4. proposal ----------------------------------------------------------------------------
    def propose(
        self,
        runner: Any,
        sampled_token_ids: list[list[int]],
        sample_hidden_states: torch.Tensor,
        spec_meta: Any,
    ) -> list[list[int]]:
        num_reqs = len(sampled_token_ids)
        step = self._step
        if spec_meta is None:
            hidden_rows = np.arange(num_reqs)
        else:
            sampled_rows = np.asarray(spec_meta.cu_num_sampled_tokens.cpu(), dtype=np.int64)
            hidden_rows = sampled_rows - (step.num_nodes + 1) + self._last_positions
        active = [
            i for i, toks in enumerate(sampled_token_ids)
            if toks and not (step is not None and step.fallback[i])
        ]
        drafts: list[list[int]] = [[] for _ in range(num_reqs)]
        if self.calibrate is not None:  # first step: measure the step-cost curve once (not a step to time)
            self.schedule.set_cost(self.calibrate(runner))
            self.calibrate = step = None
        tree = self.schedule.choose(self._rules(runner, num_reqs)[active]) if active else None
        self.tree = tree
        if tree is not None:
            hidden = sample_hidden_states[torch.from_numpy(hidden_rows[active])]
            if self.proposer is not None:
                history = [runner.input_batch.token_ids_cpu[i, : runner.input_batch.num_tokens_no_spec[i]] for i in active]
                topk = self.proposer(hidden, history, tree.max_depth, tree.topk)
            else:
                topk = self.heads.topk_tokens(hidden.to(self.heads_dtype), tree.topk)
            roots = torch.tensor([sampled_token_ids[i][-1] for i in active])
            nodes = fill_tree(tree, roots, topk.cpu())[:, 1:].tolist()
            req_ids = runner.input_batch.req_ids
            for row, i in enumerate(active):
                drafts[i] = nodes[row]
                self._tree_by_req[req_ids[i]] = tree
        if step is not None:  # timed when the next step begins (begin_step)
            self._timed = (step.num_tokens, bool(step.num_nodes.any()), time.perf_counter() - self._step_started)
        return drafts

    @property
    def heads_dtype(self) -> torch.dtype:
        return next(self.heads.parameters()).dtype


def unsupported_reason(params: Any) -> str | None:
    """Why a request's sampling options need vLLM's own sampler (then it decodes without a tree)."""
    if params is None:
        return None
    if params.logprobs is not None or params.prompt_logprobs is not None:
        return "logprobs"
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        return "penalties"
    if params.bad_words or getattr(params, "allowed_token_ids", None) or getattr(params, "logit_bias", None):
        return "token constraints"
    if params.min_p or params.min_tokens:
        return "min_p / min_tokens"
    if getattr(params, "structured_outputs", None) is not None:
        return "structured output"
    return None


@functools.lru_cache(maxsize=256)
def _prefix(tree: TreeSpec, num_nodes: int) -> TreeSpec:
    """The tree of the first `num_nodes` nodes (the tree itself when it has no more)."""
    return tree if num_nodes >= tree.num_nodes else tree.truncated(num_nodes)


def _paths_to(tree: TreeSpec, last: torch.Tensor) -> torch.Tensor:
    """Root-to-node tree positions [R, D+1] ending at each `last` position, -1 padded."""
    paths = torch.full((len(last), tree.max_depth + 1), -1, dtype=torch.long)
    node = last.clone()
    for _ in range(tree.max_depth + 1):
        valid = node >= 0
        paths[valid, tree.depths[node[valid]]] = node[valid]
        node = torch.where(valid, tree.parents[node.clamp(min=0)], -1)
    return paths


def _spread_rows(tensors: Any, width: int) -> Any:
    """Logprobs of one token per request -> the layout of a speculative step's output (one row per
    output column, [R * width, ...]), request i's token at row i * width."""
    from vllm.v1.outputs import LogprobsTensors

    def spread(values: torch.Tensor) -> torch.Tensor:
        rows = values.new_zeros((values.shape[0] * width, *values.shape[1:]))
        rows[::width] = values
        return rows

    return LogprobsTensors(
        spread(tensors.logprob_token_ids), spread(tensors.logprobs), spread(tensors.selected_token_ranks)
    )


def _temperatures(runner: Any, num_reqs: int) -> torch.Tensor:
    """[R] float32 temperature of each request (vLLM leaves the tensor out when all are greedy)."""
    meta = runner.input_batch.sampling_metadata
    return torch.zeros(num_reqs) if meta.temperature is None else meta.temperature[:num_reqs].float().cpu()


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [2, 0, 3] -> [0, 1, 0, 1, 2]."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


def _processed_logits(
    logits: torch.Tensor, rows: torch.Tensor, meta: Any, idx: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """[G, N+1, V] float32 logits of sampled requests as vLLM samples them: divided by the temperature,
    then top-k / top-p (in this order, as in vLLM's sampler: the top-p set depends on the temperature)."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

    per_row = rows.shape[1]
    sub = logits.index_select(0, rows.flatten()).float()  # one copy, then in place: [G*(N+1), V] is large
    sub.div_(temperature.repeat_interleave(per_row)[:, None])
    top_k = None if meta.top_k is None else meta.top_k[idx].repeat_interleave(per_row)
    top_p = None if meta.top_p is None else meta.top_p[idx].repeat_interleave(per_row)
    if top_k is not None or top_p is not None:
        sub = apply_top_k_top_p(sub, top_k, top_p)
    return sub.view(rows.shape[0], per_row, -1)


def _uniforms(runner: Any, idx: torch.Tensor, width: int) -> torch.Tensor:
    """[G, width] float64 uniforms for the draws at depths 0..width-1 of each request's step.

    A seeded request's draw for its j-th output token uses a uniform that depends on (seed, j) only:
    lossless acceptance emits token j = inverse CDF of p(. | tokens before j) at that uniform whether
    token j is accepted from the tree or drawn as the bonus, so its tokens do not depend on the batch,
    the tree, or how tokens group into steps."""
    batch = runner.input_batch
    uniforms = torch.rand(len(idx), width, dtype=torch.float64)
    for row, i in enumerate(idx.tolist()):
        seed = runner.requests[batch.req_ids[i]].sampling_params.seed
        if seed is not None:
            position = int(batch.num_tokens_no_spec[i] - batch.num_prompt_tokens[i])  # output tokens so far
            uniforms[row] = _seeded_uniforms(seed, position, width)
    return uniforms


def _seeded_uniforms(seed: int, position: int, width: int) -> torch.Tensor:
    """Uniforms in [0, 1) for output positions position..position+width-1: splitmix64 of (seed, position)."""
    stream = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    keys = stream + np.arange(position, position + width, dtype=np.uint64)
    return torch.from_numpy((_splitmix64(keys) >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (Steele et al.'s SplitMix64 finaliser); uint64 arithmetic wraps."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
