"""Data: `shards` (llm.c's token shard files), `loader` (batches for training and validation), `prepare` (text ->
shards, the Shakespeare corpus), `corpus` (the Shakespeare texts), `tokenizers` (GPT-2's BPE)."""
