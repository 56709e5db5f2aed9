"""data_prep: corpora -> tokenizer -> Megatron MMIDIDX v1 token shards (the `megalm-prep` CLI).

Runs on CPU-only data nodes: nothing in this package may import torch or DeepSpeed.
"""
