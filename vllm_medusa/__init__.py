"""vllm-medusa: tree-based Medusa decoding for vLLM.

The core (heads, trees, candidates, acceptance, training) is pure PyTorch and never imports vLLM;
everything that touches vLLM internals lives in `vllm_medusa.vllm`.
"""

__version__ = "0.1.0"
