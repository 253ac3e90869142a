"""The plugin's drafts are exactly the PyTorch heads' top-k for the same hidden states, laid into the tree."""

from __future__ import annotations

import pytest
import torch
from conftest import BASE_ENGINE_ARGS, shutdown

pytestmark = pytest.mark.vllm


def test_drafts_equal_heads_topk(smollm2_f32):
    from vllm import LLM, SamplingParams

    from vllm_medusa.candidates import fill_tree
    from vllm_medusa.checkpoint import load_heads
    from vllm_medusa.shipped import shipped_heads_for

    heads_dir = shipped_heads_for(smollm2_f32)
    assert heads_dir is not None, "SmolLM2 heads are shipped with the package"
    llm = LLM(model=str(smollm2_f32), speculative_config={"method": "medusa", "model": str(heads_dir)},
              additional_config={"medusa": {"tree": 16, "adaptive": False}}, **BASE_ENGINE_ARGS)

    def record(worker):
        tree_step = worker.model_runner._medusa
        calls = tree_step.recorded = []
        original_topk = tree_step.heads.topk_tokens
        original_propose = tree_step.propose

        def topk_tokens(hidden, k):
            out = original_topk(hidden, k)
            calls.append({"hidden": hidden.clone(), "k": k, "topk": out.clone()})
            return out

        def propose(*args, **kwargs):
            drafts = original_propose(*args, **kwargs)
            if calls and "drafts" not in calls[-1]:
                calls[-1]["drafts"] = [d for d in drafts if d]
                calls[-1]["roots"] = [toks[-1] for toks, d in zip(args[1], drafts) if d]
            return drafts

        tree_step.heads.topk_tokens = topk_tokens
        tree_step.propose = propose

    try:
        llm.collective_rpc(record)
        llm.generate(["The capital of France is", "Count: 1, 2, 3,"], SamplingParams(temperature=0, max_tokens=8))
        calls = llm.collective_rpc(lambda worker: worker.model_runner._medusa.recorded)[0]
        tree = llm.collective_rpc(lambda worker: worker.model_runner._medusa.settings.tree)[0]
    finally:
        shutdown(llm)

    heads, _ = load_heads(heads_dir, dtype=torch.float32)
    assert len(calls) >= 3
    for call in calls:
        expected = heads.topk_tokens(call["hidden"].float(), call["k"])
        assert torch.equal(call["topk"], expected)
        nodes = fill_tree(tree, torch.tensor(call["roots"]), expected)[:, 1:].tolist()
        assert call["drafts"] == nodes
