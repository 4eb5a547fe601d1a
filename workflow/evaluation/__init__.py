"""Evaluation: generation and scoring of held-out prompts, the evaluation stages, comparison of methods, the multi-seed study."""
