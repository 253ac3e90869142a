import json
import os
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from heads_fixtures import H, K, TOKEN_MAP, V, VARIANTS, random_heads

from vllm_medusa.checkpoint import HeadsLoadError, export_for_vllm_chain, load_heads, save_heads
from vllm_medusa.heads import HeadsConfig, MedusaHeads

HIDDEN = torch.randn(4, H, generator=torch.Generator().manual_seed(2))


class RefResBlock(nn.Module):
    """The reference code's ResBlock (FasterDecoding/Medusa), whose state dict names we must read."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def reference_heads(num_heads: int, num_layers: int = 1) -> nn.ModuleList:
    """The reference code's medusa_head: per head, residual blocks then a bias-free LM head."""
    torch.manual_seed(3)
    return nn.ModuleList(
        nn.Sequential(*[RefResBlock(H) for _ in range(num_layers)], nn.Linear(H, V, bias=False))
        for _ in range(num_heads)
    )


def reference_logits(module: nn.ModuleList) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([head(HIDDEN) for head in module])


def full_model_state(module: nn.ModuleList) -> dict[str, torch.Tensor]:
    """An axolotl-style full model: backbone weights, the base LM head, and medusa_head.* keys."""
    state = {
        "model.embed_tokens.weight": torch.randn(V, H),
        "model.layers.0.mlp.down_proj.weight": torch.randn(H, H),
        "model.norm.weight": torch.ones(H),
        "lm_head.weight": torch.randn(V, H),  # the base model's, not a Medusa head
    }
    state.update({f"medusa_head.{name}": t.detach().clone() for name, t in module.state_dict().items()})
    return state


def write_json(path, obj) -> None:
    path.write_text(json.dumps(obj))


# ---- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_vllm_layout_round_trip_gives_identical_logits(tmp_path, variant):
    heads = random_heads(**VARIANTS[variant])
    save_heads(heads, tmp_path)
    loaded, config = load_heads(tmp_path, hidden_size=H, vocab_size=V)
    assert torch.equal(loaded(HIDDEN), heads(HIDDEN))
    assert torch.equal(loaded.topk_tokens(HIDDEN, 5), heads.topk_tokens(HIDDEN, 5))
    assert config == heads.config == loaded.config


def test_vllm_layout_uses_vllm_key_names(tmp_path):
    save_heads(random_heads(shared_lm_head=True, token_map=TOKEN_MAP), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert set(tensors) == {
        *(f"blocks.{h}.layers.0.{p}" for h in range(K) for p in ("weight", "bias")),
        "lm_head.weight",
        "token_map",
    }
    assert tensors["lm_head.weight"].shape == (40, H) and tensors["token_map"].dtype == torch.int64
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is True
    assert (config["vocab_size"], config["truncated_vocab_size"]) == (V, 40)


@pytest.mark.parametrize("variant", ["per-head", "shared", "no-bias"])
def test_reference_layout_round_trip_gives_identical_logits(tmp_path, variant):
    heads = random_heads(**{"per-head": {}, "shared": {"shared_lm_head": True}, "no-bias": {"bias": False}}[variant])
    save_heads(heads, tmp_path, fmt="reference")
    assert set(load_file(tmp_path / "medusa_lm_head.safetensors")) == {
        *(f"{h}.0.linear.{p}" for h in range(K) for p in ("weight", "bias")),
        *(f"{h}.1.weight" for h in range(K)),
    }
    loaded, config = load_heads(tmp_path, hidden_size=H, vocab_size=V)
    assert torch.equal(loaded(HIDDEN), heads(HIDDEN))
    assert config.num_heads == K


@pytest.mark.parametrize("kwargs", [{"token_map": TOKEN_MAP}, {"logit_scale": 2.0}])
def test_reference_layout_refuses_what_it_cannot_hold(tmp_path, kwargs):
    with pytest.raises(ValueError, match="the reference layout has no"):
        save_heads(random_heads(**kwargs), tmp_path, fmt="reference")


def test_decoding_defaults_round_trip_through_config_json(tmp_path):
    heads = random_heads()
    defaults = HeadsConfig(H, V, K, acceptance="typical", typical_eps=0.05, typical_delta=0.2, tree=[[0]])
    tree = SimpleNamespace(choices=((0,), (1,), (0, 0)))  # duck-typed TreeSpec
    for fmt in ("vllm", "reference"):
        save_heads(heads, tmp_path / fmt, tree=tree, fmt=fmt, config=defaults)
        _, config = load_heads(tmp_path / fmt)
        assert (config.tree, config.acceptance) == ([[0], [1], [0, 0]], "typical")
        assert (config.typical_eps, config.typical_delta) == (0.05, 0.2)
    save_heads(heads, tmp_path / "kept", config=defaults)
    assert load_heads(tmp_path / "kept")[1].tree == [[0]]


def test_saving_over_another_layout_loads_the_new_one(tmp_path):
    # e.g. build-tree rewriting a reference directory in place: config.json says which layout is current
    first, second = random_heads(), random_heads(shared_lm_head=True, token_map=TOKEN_MAP)
    save_heads(first, tmp_path, fmt="reference")
    save_heads(second, tmp_path)
    assert torch.equal(load_heads(tmp_path)[0](HIDDEN), second(HIDDEN))
    save_heads(first, tmp_path, fmt="reference")
    assert torch.equal(load_heads(tmp_path)[0](HIDDEN), first(HIDDEN))


def test_load_casts_to_dtype(tmp_path):
    save_heads(random_heads(token_map=TOKEN_MAP), tmp_path)
    loaded, _ = load_heads(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.dtype == loaded.blocks[0].weight.dtype == torch.bfloat16
    assert loaded.token_map.dtype == torch.int64


# ---- checkpoints written by others ------------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["medusa_lm_head.pt", "medusa_lm_head.safetensors"])
@pytest.mark.parametrize("pass_file", [False, True])
def test_reference_checkpoint_whose_config_lies_about_head_count(tmp_path, file_name, pass_file):
    module = reference_heads(num_heads=4, num_layers=2)
    state = {name: t.detach().clone() for name, t in module.state_dict().items()}
    if file_name.endswith(".pt"):
        torch.save(state, tmp_path / file_name)
    else:
        save_file(state, tmp_path / file_name)
    lying_config = {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "base"}
    write_json(tmp_path / "config.json", lying_config)
    loaded, config = load_heads(tmp_path / file_name if pass_file else tmp_path, hidden_size=H, vocab_size=V)
    assert (config.num_heads, config.num_layers, config.bias, config.shared_lm_head) == (4, 2, True, False)
    torch.testing.assert_close(loaded(HIDDEN), reference_logits(module))


def test_axolotl_full_model_safetensors(tmp_path):
    module = reference_heads(num_heads=K)
    save_file(full_model_state(module), tmp_path / "model.safetensors")
    base_config = {"model_type": "llama", "hidden_size": H, "vocab_size": V, "medusa_num_heads": 5}
    write_json(tmp_path / "config.json", base_config)
    loaded, config = load_heads(tmp_path, hidden_size=H, vocab_size=V)
    assert (config.num_heads, config.shared_lm_head) == (K, False)
    torch.testing.assert_close(loaded(HIDDEN), reference_logits(module))


def test_axolotl_sharded_safetensors_reads_only_medusa_shards(tmp_path):
    module = reference_heads(num_heads=K)
    state = full_model_state(module)
    medusa = sorted(name for name in state if name.startswith("medusa_head."))
    shards = {
        "model-00001-of-00003.safetensors": {n: state[n] for n in medusa[:3]},
        "model-00002-of-00003.safetensors": {n: state[n] for n in medusa[3:]},
        "model-00003-of-00003.safetensors": {n: t for n, t in state.items() if n.startswith("model.")},
    }
    weight_map = {name: shard for shard, tensors in shards.items() for name in tensors}
    for shard, tensors in list(shards.items())[:2]:
        save_file(tensors, tmp_path / shard)
    # the backbone-only shard is never opened, so garbage there does not matter
    (tmp_path / "model-00003-of-00003.safetensors").write_bytes(os.urandom(64))
    write_json(tmp_path / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    loaded, _ = load_heads(tmp_path)
    torch.testing.assert_close(loaded(HIDDEN), reference_logits(module))


def test_axolotl_pytorch_model_bin(tmp_path):
    module = reference_heads(num_heads=2)
    torch.save(full_model_state(module), tmp_path / "pytorch_model.bin")
    torch.save(SimpleNamespace(learning_rate=1e-3), tmp_path / "training_args.bin")  # a Trainer's pickle, skipped
    loaded, config = load_heads(tmp_path)
    assert config.num_heads == 2
    torch.testing.assert_close(loaded(HIDDEN), reference_logits(module))


def test_vllm_layout_with_full_rows_and_token_map_keeps_the_mapped_rows(tmp_path):
    # vLLM's loader accepts a shared head stored as lm_heads.0.weight with all V rows and slices token_map rows.
    heads = random_heads(shared_lm_head=True)
    tensors = {name: t for name, t in load_file(save_heads(heads, tmp_path) / "model.safetensors").items()}
    tensors["lm_heads.0.weight"] = tensors.pop("lm_head.weight")
    tensors["token_map"] = TOKEN_MAP
    save_file(tensors, tmp_path / "model.safetensors")
    config = HeadsConfig(H, V, K, shared_lm_head=True, truncated_vocab_size=len(TOKEN_MAP))
    (tmp_path / "config.json").write_text(config.to_vllm_json())
    loaded, loaded_config = load_heads(tmp_path)
    assert loaded_config == config
    assert torch.equal(loaded.lm_head, heads.lm_head[TOKEN_MAP])
    assert torch.equal(loaded(HIDDEN), heads(HIDDEN)[..., TOKEN_MAP])


# ---- export for vLLM's own chain Medusa -------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["per-head-truncated", "shared-truncated"])
def test_export_for_vllm_chain_writes_truncated_heads_with_full_vocabulary(tmp_path, variant):
    shared = variant == "shared-truncated"
    heads = random_heads(token_map=TOKEN_MAP, shared_lm_head=shared)
    export_for_vllm_chain(heads, tmp_path)
    assert "token_map" not in load_file(tmp_path / "model.safetensors")
    exported, config = load_heads(tmp_path, vocab_size=V)
    assert config.truncated_vocab_size == V
    assert exported.lm_head.shape == ((V, H) if shared else (K, V, H))
    logits = exported(HIDDEN)
    assert torch.equal(logits[..., TOKEN_MAP], heads(HIDDEN))
    unmapped = torch.ones(V, dtype=torch.bool)
    unmapped[TOKEN_MAP] = False
    assert not logits[..., unmapped].any()


def test_export_for_vllm_chain_is_save_heads_without_truncation(tmp_path):
    heads = random_heads(**VARIANTS["per-head"])
    export_for_vllm_chain(heads, tmp_path / "export")
    save_heads(heads, tmp_path / "saved")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes()


# ---- errors -----------------------------------------------------------------------------------------------


def test_load_error_is_a_value_error():
    assert issubclass(HeadsLoadError, ValueError)


def test_missing_path(tmp_path):
    with pytest.raises(HeadsLoadError, match=f"not found: {tmp_path / 'nope'}"):
        load_heads(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    with pytest.raises(HeadsLoadError, match="no Medusa head weights found .*no weight files"):
        load_heads(tmp_path)


def test_base_model_is_not_mistaken_for_heads(tmp_path):
    state = {n: t for n, t in full_model_state(reference_heads(1)).items() if not n.startswith("medusa_head.")}
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(HeadsLoadError, match="no Medusa head weights found .*model.safetensors"):
        load_heads(tmp_path)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "heads.txt").write_text("hello")
    with pytest.raises(HeadsLoadError, match="unsupported weights file type"):
        load_heads(tmp_path / "heads.txt")


@pytest.mark.parametrize("damage", ["cut-in-half", "garbage"])
@pytest.mark.parametrize("fmt", ["vllm", "pt"])
def test_truncated_or_corrupt_file(tmp_path, damage, fmt):
    if fmt == "vllm":
        file = save_heads(random_heads(), tmp_path) / "model.safetensors"
    else:
        file = tmp_path / "medusa_lm_head.pt"
        torch.save(reference_heads(K).state_dict(), file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "cut-in-half" else os.urandom(len(data)))
    with pytest.raises(HeadsLoadError, match=f"{file}: cannot read weights, the file is truncated or corrupt"):
        load_heads(tmp_path)


def test_pt_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "medusa_lm_head.pt")
    with pytest.raises(HeadsLoadError, match="expected a state dict, found a list"):
        load_heads(tmp_path)


def test_corrupt_config_json(tmp_path):
    save_heads(random_heads(), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HeadsLoadError, match="config.json: not valid JSON"):
        load_heads(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    index = {"weight_map": {"medusa_head.0.0.linear.weight": "gone.safetensors"}}
    write_json(tmp_path / "model.safetensors.index.json", index)
    with pytest.raises(HeadsLoadError, match=r"shards listed in the index are missing: \['gone.safetensors'\]"):
        load_heads(tmp_path)


def _damaged_reference(tmp_path, edit) -> None:
    state = {name: t.detach().clone() for name, t in reference_heads(K).state_dict().items()}
    edit(state)
    save_file(state, tmp_path / "medusa_lm_head.safetensors")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda s: s.update({"1.0.linear.weight": torch.zeros(H, H + 1)}),
            r"blocks\.1\.layers\.0\.weight is \[32, 33\]",
        ),
        (lambda s: s.update({"2.1.weight": torch.zeros(V - 1, H)}), r"lm_heads\.2\.weight is \[99, 32\]"),
    ],
)
def test_inconsistent_shapes_between_heads(tmp_path, edit, message):
    _damaged_reference(tmp_path, edit)
    with pytest.raises(HeadsLoadError, match=f"inconsistent shapes between heads: {message}"):
        load_heads(tmp_path)


def test_head_with_a_missing_layer(tmp_path):
    _damaged_reference(tmp_path, lambda s: s.update({"1.1.linear.weight": torch.zeros(H, H)}))
    with pytest.raises(HeadsLoadError, match=r"missing blocks\.0\.layers\.1\.weight"):
        load_heads(tmp_path)


@pytest.mark.parametrize("name, base", [("hidden_size", 64), ("vocab_size", 120)])
def test_mismatch_with_the_base_model_names_both_numbers(tmp_path, name, base):
    save_heads(random_heads(token_map=TOKEN_MAP), tmp_path)
    ours = {"hidden_size": H, "vocab_size": V}[name]
    with pytest.raises(HeadsLoadError, match=f"heads have {name} {ours} but the base model has {name} {base}"):
        load_heads(tmp_path, **{name: base})


def test_token_map_without_a_vocabulary_size(tmp_path):
    heads = random_heads(token_map=TOKEN_MAP)
    save_heads(heads, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(HeadsLoadError, match="a token_map needs the full vocabulary size"):
        load_heads(tmp_path)
    loaded, _ = load_heads(tmp_path, vocab_size=V)  # the base model's vocabulary is the full one
    assert torch.equal(loaded(HIDDEN), heads(HIDDEN))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_loader_fuzz_any_damage_gives_heads_or_a_clear_error(tmp_path_factory, data):
    """Random damage to a saved heads directory (bytes flipped or cut in the weights, config fields set to
    odd values) either still loads into well-formed heads or raises HeadsLoadError: never another exception."""
    directory = tmp_path_factory.mktemp("fuzz")
    save_heads(random_heads(**VARIANTS[data.draw(st.sampled_from(sorted(VARIANTS)))]), directory)
    weights, config_file = directory / "model.safetensors", directory / "config.json"
    blob = bytearray(weights.read_bytes())
    for _ in range(data.draw(st.integers(0, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    weights.write_bytes(bytes(blob))
    config = json.loads(config_file.read_text())
    odd = st.one_of(st.none(), st.integers(-3, 10**6), st.text(max_size=3), st.lists(st.integers(-1, 3), max_size=3))
    for key in data.draw(st.lists(st.sampled_from(sorted(config)), max_size=2)):
        config[key] = data.draw(odd)
    config_file.write_text(json.dumps(config))
    try:
        heads, loaded = load_heads(directory)
    except HeadsLoadError as error:
        assert str(error) and "Traceback" not in str(error)
        return
    assert heads.num_heads == loaded.num_heads >= 1
    assert heads(torch.zeros(2, loaded.hidden_size)).shape[1] == 2
