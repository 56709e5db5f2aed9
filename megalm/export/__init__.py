"""Layout-free checkpoint access: consolidation to full weights (`consolidate`), Hugging Face export
(`hf`, `megalm-export`) and resharding to another layout (`reshard`, `megalm-reshard`)."""
