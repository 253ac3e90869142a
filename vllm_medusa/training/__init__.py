"""Training Medusa heads: self-distillation data, Medusa-1 / Medusa-2 training, tree building.

Modules: `data` (conversations, chat encoding, held-out split), `distill` (answers from the base model),
`losses` (targets, weighted loss, accuracies), `hidden` (frozen-backbone hidden states and their cache),
`backbone` (loading the base model), `runtime` (devices, ranks, schedule, checkpoints), `train` (the
`train` command, running `stage1` or `stage2`) and `build_tree`.
Nothing here imports vLLM at module level: `distill` imports it only for its vLLM backend.
"""
