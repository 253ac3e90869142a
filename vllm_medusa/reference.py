"""Reference Medusa decoding over a Hugging Face causal LM (batch 1, static KV cache), and plain batched decoding.

The ground truth the vLLM integration is checked against, and a like-for-like baseline for timings:
`MedusaGenerator` and `plain_generate` share the model call and the stopping rules; `StaticDecode` (plain decoding
of a left-padded batch, CUDA-graph captured on GPU) also serves self-distillation.

One Medusa step: the heads read the final-norm hidden state of the last accepted position; their top-k fill
the tree (root = last emitted token); the N+1 tree tokens go through the model in one forward, at positions
L + depth, each attending to the whole prefix and to its own ancestors only; acceptance picks a path and a
bonus token; the cache keeps the prefix plus the accepted path (root included) and the bonus becomes the
next root.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import Cache

from vllm_medusa.acceptance import Acceptance, accept_greedy, accept_lossless, accept_typical, sample_from_probs
from vllm_medusa.candidates import fill_tree
from vllm_medusa.tree import TreeSpec

if TYPE_CHECKING:
    from vllm_medusa.heads import MedusaHeads

# (hidden [B, H] at the last accepted position, new tokens emitted so far, the last one being the root)
#   -> head top-k token ids [B, K, k]
Proposer = Callable[[Tensor, list[int]], Tensor]
MODES = ("greedy", "typical", "lossless")


@dataclass
class GenerationResult:
    """tokens: new tokens (prompt excluded), cut at max_new_tokens and after the first EOS.
    steps: verification forwards (plain decoding: decode forwards); the prefill is not counted.
    tau: tokens emitted per step, bonus included, counted before the cut (1.0 for plain decoding;
         nan when no step ran).
    accepted_per_depth: [D] how many steps accepted a node at depth d = 1..D (empty for plain decoding).
    """

    tokens: list[int]
    steps: int
    tau: float
    accepted_per_depth: list[int]


class _CapturedStep:
    """Runs a step function eagerly for its first calls (warm-up: kernels, workspaces, lazy state, without
    writing junk into a cache), then, when `graphed`, captures it once in a CUDA graph and replays that graph.
    The function must read and write only persistent buffers, so every replay is the next real step."""

    EAGER_CALLS = 2

    def __init__(self, graphed: bool) -> None:
        self.graphed = graphed
        self.eager_left = self.EAGER_CALLS
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: object = None

    def __call__(self, step: Callable[[], object]) -> object:
        if not self.graphed or self.eager_left:
            self.eager_left -= 1
            self.output = step()
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.output = step()
            self.graph.replay()
        return self.output


class MedusaGenerator:
    """Medusa decoding over a `StaticCache`: the tree's KV is written after the prefix, the accepted path's
    KV is then moved into place and the write index set back, so every step has the same shapes.

    cuda_graph (default: on for a CUDA model with heads and no custom proposer): greedy steps are captured in
    one CUDA graph (propose, verify, accept, compact) after two eager steps; one sync per step reads the
    emitted tokens. Eager steps run the same code, so CPU tests check what the GPU timings run.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: MedusaHeads | None,
        tree: TreeSpec,
        proposer: Proposer | None = None,
        *,
        cuda_graph: bool | None = None,
    ) -> None:
        if proposer is None and heads is None:
            raise ValueError("MedusaGenerator needs heads or a proposer")
        device, self.dtype = _device_dtype(model)
        self.graphed = (device.type == "cuda" and proposer is None) if cuda_graph is None else cuda_graph
        if self.graphed and (device.type != "cuda" or proposer is not None):
            raise ValueError("cuda_graph=True needs a model on a CUDA device and heads (not a custom proposer)")
        _fold_gqa(model)  # the same attention as plain_generate, so timings compare like with like
        self.model = model
        self.tree = tree.to(device)
        self.proposer = proposer or _heads_proposer(heads, tree.topk)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: list[int],
        max_new_tokens: int,
        *,
        eos_token_id: int | Collection[int] | None = None,
        mode: str = "greedy",
        temperature: float = 1.0,
        seed: int = 0,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` after `input_ids`; stops after the first EOS (kept in the output)."""
        _check_request(input_ids, max_new_tokens, mode)
        if self.graphed and mode != "greedy":
            raise ValueError(f"CUDA-graph Medusa steps are greedy only; pass cuda_graph=False for {mode!r}")
        generator = torch.Generator().manual_seed(seed)  # CPU uniforms: same draws on every device
        stop = _Stop(max_new_tokens, eos_token_id)
        state = _TreeDecode(self, input_ids, max_new_tokens, mode, temperature, generator)
        tokens = [int(state.root)]
        steps, accepted = 0, torch.zeros(self.tree.max_depth + 1, dtype=torch.long)
        while not stop(tokens):
            emitted_tokens, emitted = state.step(tokens)
            tokens += emitted_tokens[:emitted]
            steps += 1
            accepted[emitted - 1] += 1
        # accepted[n] = steps that accepted exactly n nodes; a step counts at every depth up to its n.
        per_depth = accepted.flip(0).cumsum(0).flip(0)[1:].tolist()
        tau = (steps + sum(per_depth)) / steps if steps else float("nan")
        return GenerationResult(stop.cut(tokens), steps, tau, per_depth)


class _TreeDecode:
    """One request's Medusa state: static cache, and the buffers a step reads and writes (root token [1],
    hidden state [1, H] the heads read, prefix length [1] = cache entries before the root)."""

    def __init__(self, gen: MedusaGenerator, input_ids: list[int], max_new_tokens: int, mode: str,
                 temperature: float, generator: torch.Generator) -> None:
        from transformers import StaticCache

        self.gen, self.mode, self.temperature, self.generator = gen, mode, temperature, generator
        tree, model = gen.tree, gen.model
        device = tree.depths.device
        # room for the last step's whole tree past the last emitted token
        self.max_len = len(input_ids) + max_new_tokens + tree.num_nodes + 1
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.slots = torch.arange(self.max_len, device=device)
        causal = self.slots[None] <= torch.arange(len(input_ids), device=device)[:, None]  # [L, max_len]
        hidden = _forward(model, torch.tensor([input_ids], device=device), self.cache,
                          mask=_additive(causal, gen.dtype)[None, None])  # [1, L, H]
        self.root = _first_token(_lm_head(model, hidden[:, -1]), mode, temperature, generator).view(1)
        self.head_hidden = hidden[:, -1].clone()
        self.prefix = torch.full((1,), len(input_ids), dtype=torch.long, device=device)
        self.captured = _CapturedStep(gen.graphed)

    def step(self, tokens: list[int]) -> tuple[list[int], int]:
        """One verification step -> (emitted tokens, padded to D+1; how many are real)."""
        emitted_tokens, emitted = self.captured(lambda: self._run(tokens))
        return emitted_tokens.tolist(), int(emitted)

    def _run(self, tokens: list[int]) -> tuple[Tensor, Tensor]:
        """Propose, verify, accept and compact, reading and advancing the buffers: -> (tokens [D+1], count [])."""
        tree, model = self.gen.tree, self.gen.model
        tree_tokens = fill_tree(tree, self.root, self.gen.proposer(self.head_hidden, tokens))  # [1, N+1]
        # prefix slots visible to every node; tree slots as the ancestor mask says; later slots hidden
        relative = self.slots - self.prefix  # [max_len]
        in_tree = tree.ancestor_mask[:, relative.clamp(0, tree.num_nodes)] & (relative <= tree.num_nodes)
        visible = (relative < 0) | in_tree  # [N+1, max_len]
        hidden = _forward(model, tree_tokens, self.cache, position_ids=(self.prefix + tree.depths)[None],
                          mask=_additive(visible, self.gen.dtype)[None, None])  # [1, N+1, H]
        acceptance = _accept(self.mode, tree, tree_tokens, _lm_head(model, hidden), self.temperature, self.generator)
        count = acceptance.num_emitted[0]
        self._compact(acceptance.path[0], count)
        self.head_hidden.copy_(hidden[0, acceptance.path[0].gather(0, (count - 1).view(1))])
        self.root.copy_(acceptance.tokens[0].gather(0, (count - 1).view(1)))
        self.prefix += count
        return acceptance.tokens[0], count

    def _compact(self, path: Tensor, count: Tensor) -> None:
        """Move the KV of the accepted path (tree positions path [D+1], -1 padded; `count` real) to the slots
        right after the prefix, and set every layer's write index there. Padding copies the root's entry to
        slots past the new end, which the next tree overwrites."""
        source = self.prefix + path.clamp(min=0)
        target = self.prefix + torch.arange(len(path), device=path.device)
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                stored = getattr(layer, name)  # [1, kv_heads, max_len, head_dim]
                stored.index_copy_(2, target, stored.index_select(2, source))
            layer.cumulative_length.copy_((self.prefix + count)[0])


@torch.inference_mode()
def plain_generate(
    model: nn.Module,
    input_ids: list[int],
    max_new_tokens: int,
    *,
    eos_token_id: int | Collection[int] | None = None,
    cuda_graph: bool | None = None,
) -> GenerationResult:
    """Plain greedy decoding, one token per forward, with the same prefill and stopping as Medusa.

    cuda_graph: capture the decode step in a CUDA graph (default: on when the model is on CUDA), so GPU
    timings measure the model rather than Python launch overhead.
    """
    _check_request(input_ids, max_new_tokens, "greedy")
    device, _ = _device_dtype(model)
    stop = _Stop(max_new_tokens, eos_token_id)
    step = StaticDecode(model, torch.tensor([input_ids], device=device), max_new_tokens, cuda_graph=cuda_graph)
    tokens = [int(step.logits.argmax(-1))]
    while not stop(tokens):
        tokens.append(int(step(step.logits.argmax(-1)).argmax(-1)))
    steps = len(tokens) - 1
    return GenerationResult(stop.cut(tokens), steps, 1.0 if steps else float("nan"), [])


class StaticDecode:
    """Decode steps for a batch of left-padded prompts over a `StaticCache`, one new token per row and step.

    On CUDA the step is captured in a CUDA graph after two eager runs (warm-up without writing junk into the
    cache): it reads its tokens and cache slot from static buffers and builds its own [B, 1, 1, max_len] mask,
    so one graph serves every step; transformers 5's `StaticLayer` keeps its write index in a device tensor
    and advances it in place, inside the graph. Rows keep their own positions (slot - left padding).
    """

    def __init__(
        self,
        model: nn.Module,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        padding: Tensor | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        """input_ids [B, L] (left-padded); padding [B]: pad tokens in front of each row (default none).
        Runs the prefill; `self.logits` [B, V] (float32) then holds the next-token logits."""
        from transformers import StaticCache

        device, self.dtype = _device_dtype(model)
        _fold_gqa(model)
        self.graphed = device.type == "cuda" if cuda_graph is None else cuda_graph
        if self.graphed and device.type != "cuda":
            raise ValueError("cuda_graph=True needs a model on a CUDA device")
        batch, length = input_ids.shape
        self.model = model
        self.max_len = length + max_new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.padding = torch.zeros(batch, dtype=torch.long, device=device) if padding is None else padding.to(device)
        self.slots = torch.arange(self.max_len, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slot = torch.full((1,), length, dtype=torch.long, device=device)  # cache slot of the next token
        self.filled = length
        self.captured = _CapturedStep(self.graphed)
        query = torch.arange(length, device=device)
        positions = (query[None] - self.padding[:, None]).clamp(min=0)
        hidden = _forward(model, input_ids, self.cache, position_ids=positions, mask=self._mask(query))
        self.logits = _lm_head(model, hidden[:, -1]).float()

    def _mask(self, query_slots: Tensor) -> Tensor:
        """query_slots [T] -> additive mask [B, 1, T, max_len]: causal, left padding hidden."""
        visible = (self.slots[None, None] <= query_slots[None, :, None]) & (
            self.slots[None, None] >= self.padding[:, None, None]
        )
        return _additive(visible, self.dtype)[:, None]

    def _run(self) -> Tensor:
        """tokens, slot buffers -> next-token logits [B, V]."""
        positions = self.slot[None] - self.padding[:, None]  # [B, 1]
        hidden = _forward(self.model, self.tokens, self.cache, position_ids=positions, mask=self._mask(self.slot))
        self.slot += 1
        return _lm_head(self.model, hidden[:, -1]).float()

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens [B] (the last emitted token per row) -> next-token logits [B, V] (also in `self.logits`)."""
        if self.filled >= self.max_len:
            raise ValueError(f"StaticDecode: cache of {self.max_len} slots is full")
        self.filled += 1
        self.tokens.copy_(tokens.view(-1, 1))
        self.logits = self.captured(self._run)
        return self.logits


def _forward(
    model: nn.Module,
    input_ids: Tensor,
    cache: Cache,
    *,
    position_ids: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Run the base model (no LM head): input_ids [B, T] -> final-norm hidden states [B, T, H].

    mask: additive [B, 1, T, kv_len]; transformers passes a 4D mask through unchanged.
    """
    if hasattr(model, "get_base_model"):  # a peft model: its own `base_model` is the LoRA wrapper
        model = model.get_base_model()
    out = model.base_model(
        input_ids=input_ids, position_ids=position_ids, attention_mask=mask, past_key_values=cache, use_cache=True
    )
    return out.last_hidden_state


def _fold_gqa(model: nn.Module) -> None:
    """Make the model's attention fold the query heads that share a KV head into the query-length axis.

    transformers' SDPA path copies K and V once per query head when a mask is given (`repeat_kv`): at decode
    over a long static cache that copy costs more than the attention itself. Folded, the same attention reads
    each KV head once. Idempotent; only the attention function changes, not the weights or the result.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(_FOLDED_GQA, _folded_gqa_attention)
    config = model.config
    if getattr(config, "_attn_implementation", None) != _FOLDED_GQA:
        config._attn_implementation = _FOLDED_GQA


_FOLDED_GQA = "vllm_medusa_folded_gqa"


def _folded_gqa_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    scaling: float | None = None, dropout: float = 0.0, **_: object,
) -> tuple[Tensor, None]:
    """query [B, H, T, d], key/value [B, Hkv, S, d], attention_mask additive [B or 1, 1, T, S] -> [B, T, H, d]."""
    batch, heads, length, dim = query.shape
    group = heads // key.shape[1]
    folded = query.reshape(batch, key.shape[1], group * length, dim)  # rows (head in group, position)
    if attention_mask is None:  # causal over the last `length` keys (a dynamic cache); is_causal would be wrong folded
        attention_mask = torch.ones(length, key.shape[2], dtype=torch.bool, device=query.device).tril(
            key.shape[2] - length
        )[None, None]
    mask = attention_mask[..., : key.shape[2]].repeat(1, 1, group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).contiguous(), None


def _lm_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """hidden [..., H] -> logits [..., V]."""
    return model.get_output_embeddings()(hidden)


def _accept(
    mode: str, tree: TreeSpec, tokens: Tensor, logits: Tensor, temperature: float, generator: torch.Generator
) -> Acceptance:
    """tokens [1, N+1], logits [1, N+1, V] -> Acceptance under `mode`."""
    if mode == "greedy":
        return accept_greedy(tree, tokens, logits)
    temp = torch.tensor([temperature], device=logits.device)
    if mode == "typical":
        uniforms = torch.rand(1, generator=generator).to(logits.device)
        return accept_typical(tree, tokens, logits, temp, uniforms=uniforms)
    uniforms = torch.rand(1, tree.max_depth + 1, generator=generator).to(logits.device)
    return accept_lossless(tree, tokens, logits, temp, uniforms=uniforms)


def _first_token(logits: Tensor, mode: str, temperature: float, generator: torch.Generator) -> Tensor:
    """The prefill's token from logits [1, V]: argmax, or a sample at `temperature` for the sampling modes."""
    if mode == "greedy":
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
    return sample_from_probs(probs, torch.rand(1, generator=generator).to(logits.device))


def _heads_proposer(heads: MedusaHeads, k: int) -> Proposer:
    dtype = next(heads.parameters()).dtype

    def propose(hidden: Tensor, _tokens: list[int]) -> Tensor:
        return heads.topk_tokens(hidden.to(dtype), k)

    return propose


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """bool mask -> additive mask in `dtype`: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def _check_request(input_ids: list[int], max_new_tokens: int, mode: str) -> None:
    if not input_ids:
        raise ValueError("input_ids is empty; the prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


class _Stop:
    """Stopping rule shared by both generators: max_new_tokens, or an EOS token (which is kept)."""

    def __init__(self, max_new_tokens: int, eos_token_id: int | Collection[int] | None) -> None:
        self.max_new_tokens = max_new_tokens
        if eos_token_id is None:
            self.eos: frozenset[int] = frozenset()
        elif isinstance(eos_token_id, int):
            self.eos = frozenset((eos_token_id,))
        else:
            self.eos = frozenset(int(t) for t in eos_token_id)

    def __call__(self, tokens: list[int]) -> bool:
        """Whether generation is over; `tokens` may overshoot (a step emits several), `cut` trims them."""
        return len(tokens) >= self.max_new_tokens or not self.eos.isdisjoint(tokens)

    def cut(self, tokens: list[int]) -> list[int]:
        kept = tokens[: self.max_new_tokens]
        ends = [i for i, t in enumerate(kept) if t in self.eos]
        return kept[: ends[0] + 1] if ends else kept
