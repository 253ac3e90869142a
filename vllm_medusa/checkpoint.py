"""Load and save Medusa heads in the checkpoint layouts found in the wild.

- "vllm": a vLLM MedusaModel directory: config.json (model_type medusa) and safetensors with
  blocks.{h}.layers.{l}.weight/.bias, lm_heads.{h}.weight or one shared lm_head.weight, optional token_map.
- "reference" (FasterDecoding/Medusa): medusa_lm_head.pt or .safetensors with keys {h}.{l}.linear.weight/.bias
  and {h}.{L}.weight (L = number of residual layers); its config's medusa_num_heads is often wrong.
- axolotl: a full model directory whose weights hold medusa_head.{h}.{l}.linear.weight ... among the
  backbone's (one safetensors file, shards listed in an index, or pytorch_model.bin).

Every layout is first read into the vLLM key names ("canonical" below); head count, layers, bias and sizes
always come from the weights, never from a config.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from vllm_medusa.heads import EXTRAS_KEY, HeadsConfig, MedusaHeads

if TYPE_CHECKING:
    from vllm_medusa.tree import TreeSpec

PathLike = Union[str, Path]

_BLOCK = re.compile(r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")
_LM = re.compile(r"lm_heads\.(\d+)\.weight")
_REF_BLOCK = re.compile(r"(\d+)\.(\d+)\.linear\.(weight|bias)")
_REF_LM = re.compile(r"(\d+)\.\d+\.weight")
_SHARED_LM = "lm_head.weight"
_TOKEN_MAP = "token_map"
# axolotl's full models use medusa_head.; vLLM's loader also strips medusa_heads.
_PREFIXES = ("medusa_head.", "medusa_heads.")
_REFERENCE_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_FILE_NAMES = {"vllm": "model.safetensors", "reference": "medusa_lm_head.safetensors"}
# files a Hugging Face Trainer writes next to the weights (pickles that weights_only loading refuses)
_TRAINER_FILES = {"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"}


class HeadsLoadError(ValueError):
    """A heads checkpoint is missing, unreadable, inconsistent, or does not fit the base model."""


def load_heads(
    path: PathLike,
    *,
    hidden_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[MedusaHeads, HeadsConfig]:
    """Load heads from a vLLM, reference or axolotl checkpoint (a directory or one weights file).

    hidden_size / vocab_size: the base model's; a mismatch raises HeadsLoadError naming both numbers.
    dtype: cast the floating weights (default: keep the stored dtype).
    """
    path = Path(path)
    if not path.exists():
        raise HeadsLoadError(f"Medusa heads checkpoint not found: {path}")
    stored_config = _read_config((path if path.is_dir() else path.parent) / "config.json")
    files = _weight_files(path, stored_config.get("model_type") == "medusa")
    state = _canonical_state({name: t for file in files for name, t in _read_weights(file).items()}, path)
    # a bare lm_head.weight alone is a base model's LM head, not Medusa heads
    if not any(_BLOCK.fullmatch(name) or _LM.fullmatch(name) for name in state):
        searched = ", ".join(str(f) for f in files) or f"no weight files ({', '.join(_READERS)}) there"
        raise HeadsLoadError(
            f"{path}: no Medusa head weights found (searched {searched}; expected blocks.{{h}}.layers.{{l}}.weight, "
            f"{{h}}.{{l}}.linear.weight or medusa_head.{{h}}.{{l}}.linear.weight keys)"
        )
    try:
        config = _config_from_weights(state, stored_config, vocab_size, path)
        _check_base_model(config, hidden_size, vocab_size, path)
        heads = _assemble(config, _to_module_state(state, config, path), dtype)
    except HeadsLoadError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as error:  # weights and config.json disagree
        raise HeadsLoadError(f"{path}: the weights do not fit config.json or each other: {error}") from None
    return heads, config


def save_heads(
    heads: MedusaHeads,
    out_dir: PathLike,
    tree: Union[TreeSpec, Sequence[Sequence[int]], None] = None,
    fmt: str = "vllm",
    *,
    config: Optional[HeadsConfig] = None,
) -> Path:
    """Write heads to out_dir (created if needed) as config.json plus one safetensors file; returns out_dir.

    fmt "vllm": vLLM's MedusaModel layout. vLLM 0.32's own Medusa loads it, except per-head LM heads with a
      truncated vocabulary, which its loader cannot hold (see export_for_vllm_chain).
    fmt "reference": FasterDecoding's medusa_lm_head.safetensors (a shared LM head is written once per head,
      missing biases as zeros); it has no truncated vocabulary and no logit scale.
    tree, config: the decoding defaults stored in config.json (tree from `tree` if given, else config.tree;
      acceptance defaults from config). Shapes always come from `heads`.
    """
    if fmt not in _FILE_NAMES:
        raise ValueError(f"fmt must be one of {sorted(_FILE_NAMES)}, got {fmt!r}")
    meta = _config_to_save(heads, tree, config)
    if fmt == "reference":
        _check_reference_can_hold(heads)
        meta_dict = _reference_config(meta)
    else:
        meta_dict = meta.to_vllm_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_file_tensors(heads, fmt), str(out / _FILE_NAMES[fmt]))
    (out / "config.json").write_text(json.dumps(meta_dict, indent=2))
    return out


def export_for_vllm_chain(heads: MedusaHeads, out_dir: PathLike) -> Path:
    """Write heads so that vLLM 0.32's own chain Medusa can load them; returns out_dir.

    Heads with a truncated vocabulary need this: vLLM 0.32's Medusa loader keeps `token_map` without
    reporting it as loaded, so its strict check refuses the checkpoint ("Following weights were not
    initialized from checkpoint: {'token_map'}", model_loader/default_loader.py), and it sizes per-head LM
    heads by the full vocabulary anyway. They are written as full-vocabulary heads: the V' rows scattered to
    their token ids, every other row zero. vLLM's heads have no bias, and a bias-free row cannot give -inf
    (w.h changes sign with h), so zero is the closest choice: an unmapped token scores exactly 0, beating
    the kept tokens only when all of a head's kept logits are negative. vLLM drafts each head's argmax, so
    such a draft is merely rejected by verification; the output does not change. Heads without a
    truncated vocabulary are written exactly, as save_heads(fmt="vllm") does.
    """
    if heads.token_map is None:
        return save_heads(heads, out_dir)
    return save_heads(_full_vocab_equivalent(heads), out_dir)


# ---- reading ----------------------------------------------------------------------------------------------


def _weight_files(path: Path, vllm_layout: bool) -> list[Path]:
    """The files holding the heads: the file itself, the reference file, indexed shards, or all weights.
    vllm_layout (config.json says model_type medusa): a reference file left by an earlier save is stale."""
    if path.is_file():
        if path.suffix not in _READERS:
            raise HeadsLoadError(f"{path}: unsupported weights file type (expected one of {sorted(_READERS)})")
        return [path]
    for name in () if vllm_layout else _REFERENCE_FILES:
        if (path / name).is_file():
            return [path / name]
    for name in _INDEX_FILES:
        if (path / name).is_file():
            return _indexed_shards(path / name)
    for suffix in _READERS:
        files = sorted(f for f in path.glob(f"*{suffix}") if f.name not in _TRAINER_FILES | set(_REFERENCE_FILES))
        if files:
            return files
    return []


def _indexed_shards(index: Path) -> list[Path]:
    """Only the shards of a sharded checkpoint that hold Medusa keys (a full model's others are skipped)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({shard for name, shard in weight_map.items() if _is_medusa_key(name)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise HeadsLoadError(f"{index}: unreadable checkpoint index ({err})") from err
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise HeadsLoadError(f"{index}: shards listed in the index are missing: {missing}")
    return [index.parent / shard for shard in shards]


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    with safe_open(str(file), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys() if _is_medusa_key(name)}


def _read_torch(file: Path) -> dict[str, Tensor]:
    # mmap keeps a multi-GB full-model .bin out of RAM; only zip-format files support it.
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    if not isinstance(state, Mapping):
        raise HeadsLoadError(f"{file}: expected a state dict, found a {type(state).__name__}")
    return {name: t for name, t in state.items() if isinstance(t, Tensor) and _is_medusa_key(name)}


_READERS: dict[str, Callable[[Path], dict[str, Tensor]]] = {
    ".safetensors": _read_safetensors,
    ".bin": _read_torch,
    ".pt": _read_torch,
    ".pth": _read_torch,
}


def _read_weights(file: Path) -> dict[str, Tensor]:
    """Medusa tensors of one weights file, under their stored names."""
    try:
        return _READERS[file.suffix](file)
    except HeadsLoadError:
        raise
    except Exception as err:  # damaged files raise many unrelated types (SafetensorError, UnpicklingError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HeadsLoadError(f"{file}: cannot read weights, the file is truncated or corrupt ({reason})") from err


def _read_config(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise HeadsLoadError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise HeadsLoadError(f"{file}: expected a JSON object")
    return config


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _canonical_name(name: str) -> Optional[str]:
    """vLLM's name for a Medusa key in any layout (prefix already stripped); None for other keys."""
    if m := _REF_BLOCK.fullmatch(name):
        return f"blocks.{m[1]}.layers.{m[2]}.{m[3]}"
    if m := _REF_LM.fullmatch(name):
        return f"lm_heads.{m[1]}.weight"
    if _BLOCK.fullmatch(name) or _LM.fullmatch(name) or name in (_SHARED_LM, _TOKEN_MAP):
        return name
    return None


def _is_medusa_key(name: str) -> bool:
    return _canonical_name(_strip_prefix(name)) is not None


def _canonical_state(raw: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Stored names -> canonical names. When some keys carry a medusa_head(s). prefix (a full model), the
    others are the backbone's: its lm_head.weight is the base LM head, not a shared Medusa head."""
    prefixed = [name for name in raw if name.startswith(_PREFIXES)]
    state: dict[str, Tensor] = {}
    for name in prefixed or raw:
        canonical = _canonical_name(_strip_prefix(name))
        if canonical is not None:
            if canonical in state:
                raise HeadsLoadError(f"{path}: two checkpoint keys mean {canonical} (one of them is {name})")
            state[canonical] = raw[name]
    return state


# ---- assembling -------------------------------------------------------------------------------------------


def _count(state: Mapping[str, Tensor], pattern: re.Pattern, group: int) -> int:
    """1 + the largest index in `group` among keys matching pattern (0 if none)."""
    return 1 + max((int(m[group]) for name in state if (m := pattern.fullmatch(name))), default=-1)


def _config_from_weights(
    state: Mapping[str, Tensor], stored: Mapping, base_vocab: Optional[int], path: Path
) -> HeadsConfig:
    """HeadsConfig with shapes from the weights; logit scale and extras from the stored config.json."""
    vllm_config = stored if stored.get("model_type") == "medusa" else {}
    shared = _SHARED_LM in state or (bool(vllm_config.get("original_lm_head")) and _count(state, _LM, 1) == 1)
    lm = state.get(_SHARED_LM, state.get("lm_heads.0.weight"))
    if lm is None or lm.dim() != 2:
        found = None if lm is None else list(lm.shape)
        raise HeadsLoadError(f"{path}: head 0 needs a 2-D LM head weight [V, H], found {found}")
    rows, hidden = lm.shape
    vocab, truncated = _vocab_sizes(state, vllm_config.get("vocab_size") or base_vocab, rows, path)
    inferred = {
        "hidden_size": hidden,
        "vocab_size": vocab,
        "num_heads": max(_count(state, _BLOCK, 1), _count(state, _LM, 1)),
        "num_hidden_layers": _count(state, _BLOCK, 2),
        "medusa_fc_bias": any(name.endswith(".bias") for name in state),
        "original_lm_head": shared,
        "truncated_vocab_size": truncated,
    }
    try:
        return HeadsConfig.from_dict({**vllm_config, EXTRAS_KEY: stored.get(EXTRAS_KEY), **inferred})
    except (ValueError, TypeError) as err:
        raise HeadsLoadError(f"{path}: invalid config.json ({err})") from err


def _vocab_sizes(state: Mapping[str, Tensor], vocab: Optional[int], rows: int, path: Path) -> tuple[int, int]:
    """(V, V') for LM heads with `rows` rows. Without a token_map V = V' = rows; with one, V' is its length and
    V the full vocabulary (`vocab`: the Medusa config's vocab_size, else the base model's)."""
    token_map = state.get(_TOKEN_MAP)
    if token_map is None:
        return rows, rows
    if vocab is None:
        raise HeadsLoadError(
            f"{path}: a token_map needs the full vocabulary size: put vocab_size in config.json or pass vocab_size"
        )
    # Like vLLM, LM heads may be stored with all V rows; only the token_map rows are kept.
    if rows not in (len(token_map), vocab):
        raise HeadsLoadError(
            f"{path}: LM heads have {rows} rows, expected {len(token_map)} (token_map) or {vocab} (vocab_size)"
        )
    return vocab, len(token_map)


def _check_base_model(config: HeadsConfig, hidden_size: Optional[int], vocab_size: Optional[int], path: Path) -> None:
    for name, base in (("hidden_size", hidden_size), ("vocab_size", vocab_size)):
        if base is not None and getattr(config, name) != base:
            raise HeadsLoadError(
                f"{path}: the heads have {name} {getattr(config, name)} but the base model has {name} {base}"
            )


def _to_module_state(state: Mapping[str, Tensor], config: HeadsConfig, path: Path) -> dict[str, Tensor]:
    """Canonical per-head tensors -> MedusaHeads' stacked state dict, checking every shape."""
    H, K = config.hidden_size, config.num_heads
    token_map = state.get(_TOKEN_MAP)
    out: dict[str, Tensor] = {}
    for layer in range(config.num_layers):
        out[f"blocks.{layer}.weight"] = _stacked(state, "blocks.{h}.layers.%d.weight" % layer, K, (H, H), path)
        if config.bias:
            out[f"blocks.{layer}.bias"] = _stacked(state, "blocks.{h}.layers.%d.bias" % layer, K, (H,), path)
    lm_rows = config.truncated_vocab_size
    if config.shared_lm_head:
        name = _SHARED_LM if _SHARED_LM in state else "lm_heads.0.weight"
        lm = _stacked(state, name, 1, (lm_rows, H), path, full_rows=config.vocab_size)[0]
    else:
        lm = _stacked(state, "lm_heads.{h}.weight", K, (lm_rows, H), path, full_rows=config.vocab_size)
    if token_map is not None and lm.shape[-2] != len(token_map):
        lm = lm[..., token_map, :]
    out["lm_head"] = lm
    if token_map is not None:
        out["token_map"] = token_map.to(torch.int64)
    return out


def _stacked(
    state: Mapping[str, Tensor],
    key: str,
    num_heads: int,
    shape: tuple[int, ...],
    path: Path,
    full_rows: Optional[int] = None,
) -> Tensor:
    """Stack key.format(h=h) for h < num_heads into [num_heads, *shape]. An LM head may instead have
    full_rows rows (all of the vocabulary); all heads must then agree."""
    tensors = []
    for h in range(num_heads):
        name = key.format(h=h)
        if name not in state:
            raise HeadsLoadError(
                f"{path}: missing {name} (every head needs the same residual layers and its own LM head)"
            )
        tensors.append((name, state[name]))
    first_name, first = tensors[0]
    allowed = {shape} | ({(full_rows, *shape[1:])} if full_rows is not None else set())
    for name, t in tensors:
        if tuple(t.shape) not in allowed or t.shape != first.shape:
            raise HeadsLoadError(
                f"{path}: inconsistent shapes between heads: {name} is {list(t.shape)}, "
                f"{first_name} is {list(first.shape)}, expected {[list(s) for s in sorted(allowed)]}"
            )
    return torch.stack([t for _, t in tensors])


def _assemble(config: HeadsConfig, state: dict[str, Tensor], dtype: Optional[torch.dtype] = None) -> MedusaHeads:
    """MedusaHeads of `config` holding `state`'s tensors (no second copy of the weights is allocated)."""
    dtype = dtype or state["lm_head"].dtype
    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    with torch.device("meta"):
        heads = MedusaHeads(
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            bias=config.bias,
            shared_lm_head=config.shared_lm_head,
            token_map=state.get(_TOKEN_MAP),
            logit_scale=config.logit_scale,
        )
    heads.load_state_dict(state, assign=True)
    return heads


def _full_vocab_equivalent(heads: MedusaHeads) -> MedusaHeads:
    """Truncated heads (own or shared LM head) -> full-vocabulary heads: kept rows at their token ids, other
    rows zero."""
    lm = heads.lm_head.detach()  # [K, V', H], or [V', H] when shared
    full = lm.new_zeros(*lm.shape[:-2], heads.vocab_size, heads.hidden_size)
    full[..., heads.token_map, :] = lm
    state = {name: t.detach() for name, t in heads.state_dict().items() if name != _TOKEN_MAP}
    state["lm_head"] = full
    config = dataclasses.replace(heads.config, truncated_vocab_size=heads.vocab_size)
    return _assemble(config, state)


# ---- writing ----------------------------------------------------------------------------------------------


def _config_to_save(
    heads: MedusaHeads, tree: Union[TreeSpec, Sequence[Sequence[int]], None], extras: Optional[HeadsConfig]
) -> HeadsConfig:
    extras = extras or heads.config
    choices = getattr(tree, "choices", tree)  # a TreeSpec or its rank paths
    return dataclasses.replace(
        heads.config,
        tree=extras.tree if choices is None else [list(path) for path in choices],
        acceptance=extras.acceptance,
        typical_eps=extras.typical_eps,
        typical_delta=extras.typical_delta,
    )


def _check_reference_can_hold(heads: MedusaHeads) -> None:
    if heads.token_map is not None:
        raise ValueError("the reference layout has no truncated vocabulary (token_map); use fmt='vllm'")
    if heads.logit_scale != 1.0:
        raise ValueError(f"the reference layout has no logit scale (heads have {heads.logit_scale}); use fmt='vllm'")


def _reference_config(config: HeadsConfig) -> dict:
    # medusa_num_* is what the reference code reads; vLLM maps them to num_heads/num_hidden_layers and also
    # needs hidden_size, vocab_size and medusa_fc_bias (else it drops the biases) to load this directory.
    return {
        "medusa_num_heads": config.num_heads,
        "medusa_num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "medusa_fc_bias": True,
        EXTRAS_KEY: config.to_vllm_dict()[EXTRAS_KEY],
    }


def _file_tensors(heads: MedusaHeads, fmt: str) -> dict[str, Tensor]:
    """MedusaHeads' stacked tensors -> one tensor per head under the layout's key names."""
    reference = fmt == "reference"
    block_key = "{h}.{l}.linear.{p}" if reference else "blocks.{h}.layers.{l}.{p}"
    out: dict[str, Tensor] = {}
    for layer, block in enumerate(heads.blocks):
        bias = block.bias
        if bias is None and reference:  # the reference ResBlock always has a bias; zero is the same function
            bias = block.weight.new_zeros(heads.num_heads, heads.hidden_size)
        for h in range(heads.num_heads):
            out[block_key.format(h=h, l=layer, p="weight")] = block.weight[h]
            if bias is not None:
                out[block_key.format(h=h, l=layer, p="bias")] = bias[h]
    if heads.shared_lm_head and not reference:
        out[_SHARED_LM] = heads.lm_head
    else:
        lm_key = "{h}.%d.weight" % heads.num_layers if reference else "lm_heads.{h}.weight"
        for h in range(heads.num_heads):
            # the reference has one LM head per head: a shared one is copied, as safetensors refuses to
            # store one tensor under several names
            out[lm_key.format(h=h)] = heads.lm_head.clone() if heads.shared_lm_head else heads.lm_head[h]
    if heads.token_map is not None:
        out[_TOKEN_MAP] = heads.token_map
    return {name: t.detach().cpu().contiguous() for name, t in out.items()}
