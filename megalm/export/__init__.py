"""Checkpoint access at any layout: a saved step's tensors one at a time (`shard_reader`), consolidation to
full weights in memory (`consolidate`), Hugging Face export (`hf`, `megalm-export`, streamed through
`safetensors_out`) and import (`hf_import`), and resharding to another layout (`reshard`, `megalm-reshard`)."""
