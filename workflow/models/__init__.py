"""Models: loading tokenizers, policies and reward models, LoRA adapters, adapter snapshots, the tiny base model."""
