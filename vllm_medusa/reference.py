"""Reference Medusa decoding over a Hugging Face causal LM (batch 1, dense KV cache).

The ground truth the vLLM integration is checked against, and a like-for-like baseline for timings:
`MedusaGenerator` and `plain_generate` share the prefill, the cache type and the stopping rules.

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
from transformers import Cache, DynamicCache

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


class MedusaGenerator:
    """Medusa decoding with a dense `DynamicCache` (transformers 5: per-layer `.keys`/`.values`)."""

    def __init__(
        self, model: nn.Module, heads: MedusaHeads | None, tree: TreeSpec, proposer: Proposer | None = None
    ) -> None:
        if proposer is None and heads is None:
            raise ValueError("MedusaGenerator needs heads or a proposer")
        self.model = model
        self.tree = tree
        self.proposer = proposer or _heads_proposer(heads, tree.topk)
        device, dtype = _device_dtype(model)
        # Tree part of the additive attention mask: [N+1, N+1], 0 where a position sees an ancestor (or itself).
        self._tree_bias = _additive(tree.ancestor_mask.to(device), dtype)
        self._depths = tree.depths.to(device)

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
        generator = torch.Generator().manual_seed(seed)  # CPU uniforms: same draws on every device
        stop = _Stop(max_new_tokens, eos_token_id)
        cache = DynamicCache()
        hidden = _forward(self.model, torch.tensor([input_ids], device=self._depths.device), cache)  # [1, L, H]
        logits = _lm_head(self.model, hidden[:, -1])  # [1, V]
        tokens = [int(_first_token(logits, mode, temperature, generator))]
        head_hidden = hidden[:, -1]  # [1, H]
        steps, accepted = 0, torch.zeros(self.tree.max_depth + 1, dtype=torch.long)
        while not stop(tokens):
            acceptance, head_hidden = self._step(cache, tokens, head_hidden, mode, temperature, generator)
            emitted = int(acceptance.num_emitted[0])
            tokens += acceptance.tokens[0, :emitted].tolist()
            steps += 1
            accepted[emitted - 1] += 1
        # accepted[n] = steps that accepted exactly n nodes; a step counts at every depth up to its n.
        per_depth = accepted.flip(0).cumsum(0).flip(0)[1:].tolist()
        tau = (steps + sum(per_depth)) / steps if steps else float("nan")
        return GenerationResult(stop.cut(tokens), steps, tau, per_depth)

    def _step(
        self,
        cache: DynamicCache,
        tokens: list[int],
        head_hidden: Tensor,
        mode: str,
        temperature: float,
        generator: torch.Generator,
    ) -> tuple[Acceptance, Tensor]:
        """One verification step; compacts `cache` to prefix + accepted path. Returns the acceptance and the
        hidden state [1, H] at the last accepted position (what the heads read next)."""
        device = self._depths.device
        prefix = cache.get_seq_length()  # L: every emitted token but the root
        root = torch.tensor([tokens[-1]], device=device)
        tree_tokens = fill_tree(self.tree, root, self.proposer(head_hidden, tokens).to(device))  # [1, N+1]
        mask = torch.cat([self._tree_bias.new_zeros(self.tree.num_nodes + 1, prefix), self._tree_bias], dim=1)
        hidden = _forward(
            self.model, tree_tokens, cache, position_ids=(prefix + self._depths)[None], mask=mask[None, None]
        )  # [1, N+1, H]
        acceptance = _accept(mode, self.tree, tree_tokens, _lm_head(self.model, hidden), temperature, generator)
        path = acceptance.path[0, : int(acceptance.num_emitted[0])]  # tree positions, root first
        _keep_positions(cache, torch.cat([torch.arange(prefix, device=device), prefix + path]))
        return acceptance, hidden[:, path[-1]]


@torch.inference_mode()
def plain_generate(
    model: nn.Module,
    input_ids: list[int],
    max_new_tokens: int,
    *,
    eos_token_id: int | Collection[int] | None = None,
    cuda_graph: bool | None = None,
) -> GenerationResult:
    """Plain greedy decoding, one token per forward, with the same prefill, cache and stopping as Medusa.

    cuda_graph: capture the decode step in a CUDA graph over a `StaticCache` (default: on when the model is
    on CUDA), so GPU timings measure the model rather than Python launch overhead.
    """
    _check_request(input_ids, max_new_tokens, "greedy")
    device, _ = _device_dtype(model)
    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a model on a CUDA device")
    stop = _Stop(max_new_tokens, eos_token_id)
    step = _GraphedDecode(model, len(input_ids) + max_new_tokens) if use_graph else _EagerDecode(model)
    tokens = [step.prefill(torch.tensor([input_ids], device=device))]
    while not stop(tokens):
        tokens.append(step(tokens[-1], len(input_ids) + len(tokens) - 1))
    steps = len(tokens) - 1
    return GenerationResult(stop.cut(tokens), steps, 1.0 if steps else float("nan"), [])


class _EagerDecode:
    """Greedy decode steps over a `DynamicCache`."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.cache = model, DynamicCache()

    def prefill(self, input_ids: Tensor) -> int:
        return _greedy_prefill(self.model, input_ids, self.cache)

    def __call__(self, token: int, position: int) -> int:
        device, _ = _device_dtype(self.model)
        hidden = _forward(
            self.model, torch.tensor([[token]], device=device), self.cache,
            position_ids=torch.tensor([[position]], device=device),
        )
        return int(_lm_head(self.model, hidden[:, -1]).argmax(-1))


class _GraphedDecode:
    """Greedy decode steps over a `StaticCache`, the step captured in a CUDA graph after two eager runs.

    The step reads its token and position from static buffers and builds its own [1, 1, 1, max_len] mask
    from the position, so one graph serves every step: transformers 5's `StaticLayer` keeps its write index in a
    device tensor and advances it in place, inside the graph.
    """

    _EAGER_STEPS = 2  # real decode steps run before capture: warm-up without writing junk into the cache

    def __init__(self, model: nn.Module, max_len: int) -> None:
        from transformers import StaticCache

        device, self.dtype = _device_dtype(model)
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.min_value = torch.finfo(self.dtype).min
        self.next_token: Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_left = self._EAGER_STEPS

    def prefill(self, input_ids: Tensor) -> int:
        return _greedy_prefill(self.model, input_ids, self.cache)

    def _run(self) -> Tensor:
        """token, position buffers -> next token [1] (argmax)."""
        visible = self.slots <= self.position[0]
        mask = torch.where(visible, 0.0, self.min_value).to(self.dtype)[None, None, None]  # [1, 1, 1, max_len]
        hidden = _forward(self.model, self.token, self.cache, position_ids=self.position, mask=mask)
        return _lm_head(self.model, hidden[:, -1]).argmax(-1)

    def __call__(self, token: int, position: int) -> int:
        self.token.fill_(token)
        self.position.fill_(position)
        if self.eager_left:
            self.eager_left -= 1
            return int(self._run())
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_token = self._run()
        self.graph.replay()
        return int(self.next_token)


def _forward(
    model: nn.Module,
    input_ids: Tensor,
    cache: Cache,
    *,
    position_ids: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Run the base model (no LM head): input_ids [1, T] -> final-norm hidden states [1, T, H].

    mask: additive [1, 1, T, kv_len]; transformers passes a 4D mask through unchanged.
    """
    out = model.base_model(
        input_ids=input_ids, position_ids=position_ids, attention_mask=mask, past_key_values=cache, use_cache=True
    )
    return out.last_hidden_state


def _greedy_prefill(model: nn.Module, input_ids: Tensor, cache: Cache) -> int:
    """Fill `cache` with the prompt input_ids [1, L]; return the greedy first token."""
    hidden = _forward(model, input_ids, cache)
    return int(_lm_head(model, hidden[:, -1]).argmax(-1))


def _lm_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """hidden [..., H] -> logits [..., V]."""
    return model.get_output_embeddings()(hidden)


def _keep_positions(cache: DynamicCache, keep: Tensor) -> None:
    """Keep only the cache entries at `keep` [S'] (increasing positions) in every layer."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, keep)  # [B, kv_heads, S', head_dim]
        layer.values = layer.values.index_select(-2, keep)


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
