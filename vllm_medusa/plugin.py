"""vLLM general-plugin entry point (`vllm.general_plugins`: medusa = vllm_medusa.plugin:register).

vLLM calls `register()` once in every process (front end, engine core, workers) before it builds
its configs. It installs the patches of `vllm_medusa.vllm`, all of which stay pass-through unless
an engine asks for speculative method "medusa".
"""


def register() -> None:
    from vllm_medusa.vllm.patches import install

    install()
