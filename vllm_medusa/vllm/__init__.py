"""The vLLM-private surface of vllm-medusa: every import of vLLM internals lives in this package.

`patches.install()` (called by the plugin entry point) checks the vLLM version first and refuses
untested versions with a clear message.
"""
