"""Decide which tree nodes the base model accepts, batched over requests.

All three rules take the tree tokens `tokens: [B, N+1]` (position 0 = root, -1 = missing node, never
accepted) and the base model's logits at every position `logits: [B, N+1, V]` (position i's logits give the
next token after root + path to i). They return the accepted path plus one token drawn from the base model
at its last node (the bonus), so every step emits at least one token. Loops run over depth, never over B.
Randomness comes in as uniforms drawn by the caller, so vLLM can use per-request seeded generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vllm_medusa.tree import TreeSpec

# Temperature 0 would divide by zero; this floor turns softmax into argmax instead (greedy behaviour).
_MIN_TEMPERATURE = 1e-5


@dataclass
class Acceptance:
    """What one verification step emits per request.

    tokens:      [B, D+1] int64 accepted path tokens in depth order, then the bonus token, -1 padded.
    num_emitted: [B] int64 tokens emitted (>= 1; accepted nodes = num_emitted - 1).
    path:        [B, D+1] int64 tree positions of the accepted path from the root (0), -1 padded;
                 path[b, num_emitted - 1] is the last accepted position, whose logits gave the bonus.
    """

    tokens: Tensor
    num_emitted: Tensor
    path: Tensor


def sample_from_probs(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF sampling: probs [..., V] (non-negative, any total), uniforms [...] in [0, 1) -> [...] int64.

    Returns the first index whose cumulative probability exceeds u * total, so a token of probability 0 is
    never returned. The CDF is summed in float64 so rounding cannot shift mass between tokens.
    """
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[..., -1:].contiguous()
    index = torch.searchsorted(cdf, uniforms.double().unsqueeze(-1) * total, right=True).squeeze(-1)
    # u * total can round up to the total (u close to 1); that must give a token with mass, not V: the first
    # index where the CDF reaches the total has mass (the CDF rose there).
    last_with_mass = torch.searchsorted(cdf, total).squeeze(-1)
    return torch.minimum(index, last_with_mass)


def accept_greedy(tree: TreeSpec, tokens: Tensor, logits: Tensor) -> Acceptance:
    """Node i matches iff its token is the argmax at its parent; emit the longest all-matching path
    (ties: first row of tree.paths) plus the argmax at its last node. Output equals plain greedy decoding."""
    _check_shapes(tree, tokens, logits)
    return accept_greedy_targets(tree, tokens, logits.argmax(dim=-1))


def accept_greedy_targets(tree: TreeSpec, tokens: Tensor, target: Tensor) -> Acceptance:
    """accept_greedy given the base argmax at every position, target: [B, N+1] (vLLM computes it once over its
    flat logits rows instead of materialising [B, N+1, V])."""
    _check_shapes(tree, tokens)
    if target.shape != tokens.shape:
        raise ValueError(f"target must have the shape of tokens {list(tokens.shape)}, got {list(target.shape)}")
    parents = _parent_positions(tree, tokens.device)
    ok = (tokens == target[:, parents]) & (tokens >= 0)
    path, accepted = _best_path(tree, ok)
    bonus = target.gather(1, _last_position(path, accepted)).squeeze(1)
    return _emit(tokens, path, accepted, bonus)


def accept_typical(
    tree: TreeSpec,
    tokens: Tensor,
    logits: Tensor,
    temperature: Tensor,
    eps: Tensor | float = 0.09,
    delta: Tensor | float = 0.3,
    *,
    uniforms: Tensor,
) -> Acceptance:
    """Typical acceptance (lossy): node i is ok iff p(token) > min(eps, delta * exp(-H(p))), p the
    temperature-scaled base distribution at its parent and H its entropy. Emit the longest all-ok path (among
    equally long ones, the highest summed log p; then the first) plus a token sampled from p at its last node.

    temperature, eps, delta: [B] or scalars; uniforms: [B] in [0, 1) for the bonus token.
    """
    _check_shapes(tree, tokens, logits)
    batch = tokens.shape[0]
    log_p = _log_probs(logits, _per_request(temperature, batch, logits.device))  # [B, N+1, V]
    p = log_p.exp()
    entropy = torch.special.entr(p).sum(dim=-1)  # [B, N+1]; entr(0) = 0 where log p = -inf
    eps_b = _per_request(eps, batch, logits.device)[:, None]
    delta_b = _per_request(delta, batch, logits.device)[:, None]
    threshold = torch.minimum(eps_b, delta_b * torch.exp(-entropy))  # [B, N+1]

    parents = _parent_positions(tree, tokens.device)
    token_log_p = _token_log_probs(log_p, parents, tokens)  # [B, N+1]
    ok = (token_log_p.exp() > threshold[:, parents]) & (tokens >= 0)
    path, accepted = _best_path(tree, ok, token_log_p)
    last = _last_position(path, accepted)  # [B, 1]
    last_p = p.gather(1, last[:, :, None].expand(-1, 1, p.shape[-1])).squeeze(1)  # [B, V]
    bonus = sample_from_probs(last_p, uniforms)
    return _emit(tokens, path, accepted, bonus)


def accept_lossless(
    tree: TreeSpec, tokens: Tensor, logits: Tensor, temperature: Tensor, uniforms: Tensor
) -> Acceptance:
    """Exact sampling: at the root draw y ~ p with uniforms[:, 0]; if a child carries y, descend to it and draw
    again with the next uniform; otherwise emit y and stop. Each emitted token follows the base distribution.

    temperature: [B] or scalar; uniforms: [B, D+1] in [0, 1).
    """
    _check_shapes(tree, tokens, logits)
    batch, depth = tokens.shape[0], tree.max_depth
    if uniforms.shape != (batch, depth + 1):
        raise ValueError(f"uniforms must be [{batch}, {depth + 1}], got shape {list(uniforms.shape)}")
    temperature_b = _per_request(temperature, batch, logits.device)
    children = tree.children.to(tokens.device)  # [N+1, C]
    rows = torch.arange(batch, device=tokens.device)

    current = torch.zeros(batch, dtype=torch.long, device=tokens.device)  # position we stand at
    alive = torch.ones(batch, dtype=torch.bool, device=tokens.device)  # still descending
    accepted = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    bonus = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    path = torch.full((batch, depth + 1), -1, dtype=torch.long, device=tokens.device)
    path[:, 0] = 0
    for d in range(depth + 1):
        drawn = sample_from_probs(_log_probs(logits[rows, current], temperature_b).exp(), uniforms[:, d])  # [B]
        bonus = torch.where(alive, drawn, bonus)
        if d == depth:
            break  # nodes at the maximal depth have no children
        kids = children[current]  # [B, C]
        kid_tokens = torch.where(kids >= 0, tokens.gather(1, kids.clamp(min=0)), -1)
        hit = kid_tokens == drawn[:, None]  # -1 kids never equal a drawn token
        descend = alive & hit.any(dim=-1)
        # Siblings repeat a token only if the heads do; the first one is as good as any.
        current = torch.where(descend, kids.gather(1, hit.int().argmax(dim=-1, keepdim=True)).squeeze(1), current)
        path[:, d + 1] = torch.where(descend, current, -1)
        accepted += descend.long()
        alive = descend
        if not alive.any():
            break  # every bonus is drawn: no further draw would be used
    return _emit(tokens, path, accepted, bonus)


def _check_shapes(tree: TreeSpec, tokens: Tensor, logits: Tensor | None = None) -> None:
    width = tree.num_nodes + 1
    if tokens.dim() != 2 or tokens.shape[1] != width:
        raise ValueError(f"tokens must be [batch, {width}] for a {tree.num_nodes}-node tree, got {list(tokens.shape)}")
    if logits is not None and (logits.dim() != 3 or logits.shape[:2] != tokens.shape):
        raise ValueError(f"logits must be [{tokens.shape[0]}, {width}, vocab], got {list(logits.shape)}")


def _per_request(value: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """A scalar or [B] per-request parameter as a float32 [B] tensor."""
    tensor = torch.as_tensor(value, dtype=torch.float32, device=device)
    if tensor.dim() == 0:
        return tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(f"per-request parameters must be scalars or [{batch}], got shape {list(tensor.shape)}")
    return tensor


def _log_probs(logits: Tensor, temperature: Tensor) -> Tensor:
    """logits [B, ..., V], temperature [B] -> float32 log softmax(logits / temperature), same shape."""
    scale = temperature.clamp(min=_MIN_TEMPERATURE).reshape(-1, *([1] * (logits.dim() - 1)))
    return torch.log_softmax(logits.float() / scale, dim=-1)


def _parent_positions(tree: TreeSpec, device: torch.device) -> Tensor:
    """[N+1] parent of each position; the root maps to itself so per-position tensors keep their width."""
    return tree.parents.clamp(min=0).to(device)


def _token_log_probs(log_p: Tensor, parents: Tensor, tokens: Tensor) -> Tensor:
    """log p of each position's token under its parent's distribution: log_p [B, N+1, V] -> [B, N+1].

    Indexes the flattened [B, (N+1) * V] view so no [B, N+1, V] copy is made; -1 tokens read token 0
    (callers mask them out).
    """
    vocab = log_p.shape[-1]
    index = parents[None, :] * vocab + tokens.clamp(min=0)  # [B, N+1]
    return log_p.flatten(1).gather(1, index)


def _best_path(tree: TreeSpec, ok: Tensor, score: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Longest root-to-node path of ok nodes; among equally long ones the highest summed score, then the first
    in tree.paths order.

    ok: [B, N+1] bool (position 0 ignored); score: [B, N+1] per-node score or None.
    Returns path [B, D+1] (positions up to the last accepted one, then -1) and accepted [B] (nodes on it).
    """
    paths = tree.paths.to(ok.device)  # [P, D+1]
    nodes = paths[:, 1:]  # [P, D]
    along = ok[:, nodes.clamp(min=0)] & (nodes >= 0)  # [B, P, D]
    prefix_ok = along.long().cumprod(dim=-1).bool()  # stays True until the first rejected node
    length = prefix_ok.sum(dim=-1)  # [B, P]
    accepted = length.max(dim=-1).values  # [B]
    rank = torch.zeros(length.shape, device=ok.device)
    if score is not None:
        # where(), not multiply: a rejected node may score -inf, and -inf * 0 is nan.
        rank = torch.where(prefix_ok, score[:, nodes.clamp(min=0)], 0.0).sum(dim=-1)
    rank = rank.masked_fill(length < accepted[:, None], float("-inf"))
    best = rank.argmax(dim=-1)  # first maximum among the longest paths
    keep = torch.arange(paths.shape[1], device=ok.device)[None, :] <= accepted[:, None]
    return torch.where(keep, paths[best], -1), accepted


def _last_position(path: Tensor, accepted: Tensor) -> Tensor:
    """[B, 1] tree position of the last accepted node (0 when only the root is)."""
    return path.gather(1, accepted[:, None])


def _emit(tokens: Tensor, path: Tensor, accepted: Tensor, bonus: Tensor) -> Acceptance:
    """Assemble the emitted tokens: the tokens on path[:, 1:accepted+1], then the bonus at column `accepted`."""
    node_positions = torch.cat([path[:, 1:], torch.full_like(path[:, :1], -1)], dim=1)  # [B, D+1]
    emitted = torch.where(node_positions >= 0, tokens.gather(1, node_positions.clamp(min=0)), -1)
    emitted = emitted.scatter(1, accepted[:, None], bonus[:, None].to(emitted.dtype))
    return Acceptance(tokens=emitted, num_emitted=accepted + 1, path=path)
