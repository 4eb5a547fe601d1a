"""Sampling completions from a policy: one seeded answer per prompt, the caller's RNG left as it was.
The one sampler of the workflow: pairs (a second answer per prompt), PPO's rollout records and the
evaluations (``workflow.evaluation.generate``) all sample through it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workflow.runtime import seeded_rng


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 32,
) -> list[str]:
    """One sampled completion (text, special tokens removed) per prompt."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with seeded_rng(seed):
            for start in range(0, len(prompts), batch_size):
                chunk = [
                    tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                    for p in prompts[start : start + batch_size]
                ]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                generated = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=float(temperature),
                    top_k=0,
                    top_p=1.0,
                    max_new_tokens=int(max_new_tokens),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                out.extend(tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
