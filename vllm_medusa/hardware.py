"""What the machine multiplies fast, so demos and benchmarks run in the dtype a user would pick here."""

from __future__ import annotations


def fast_dtype() -> str:
    """"bfloat16" on CUDA and on CPUs with AMX tiles or AVX-512 BF16 dot products; "float32" elsewhere.

    Without either, bf16 matrix products of more than one row fall to a slow path: on a 2-core AMD EPYC
    (AVX2, no AVX-512), a 17 x 576 x 960 product took 1.8 ms in bf16 and 0.43 ms in fp32, while one row took
    0.12 / 0.10 ms. Verifying a tree is exactly such a product, so bf16 there made a 16-node tree step cost 6.6x
    a decode step instead of 1.9x. With AVX-512 BF16 (2-core AMD EPYC, Zen 4, no AMX) a 17 x 576 x 1536 product
    takes 0.12 ms in bf16 and 0.31 ms in fp32 (one row: 0.06 / 0.07 ms).
    """
    import torch

    if torch.cuda.is_available() or torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
        return "bfloat16"
    return "float32"
