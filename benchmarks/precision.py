"""Benchmark: what a bf16 base does to each part of a stage, measured on CPU against fp32.

Uses a small trained base (``workflow.models.base_model`` on the embedded task, cached in ``--work``; or
``--base DIR``, any saved causal LM with a chat tokenizer, e.g. ``results/base``) and random LoRA
adapters (policy i-1, the SFT reference, a reward model), then for each variant

* ``fp32``: precision ``fp32``;
* ``bf16 plain``: precision ``bf16`` with plain bf16 heads and a bf16 frozen reward model (the
  behaviour before ``loading.FP32Head`` and fp32 reward scoring);
* ``bf16``: precision ``bf16`` as the workflow runs it now;

measures

1. dtypes of the base, LoRA and reward-head weights and of the AdamW states, as the stages load
   the models (policy: the RLOO trainer's optimizer after its updates; reward: one AdamW step);
2. log-probs: an RLOO run built as the stage builds it (``workflow.train.policy_trainers.build_rloo``, one update
   per rollout batch): ``|new - old|`` sequence log-prob at every update, which is that batch's
   first, so the PPO-clip ratio ``exp(new - old)`` must be 1; and on the first batch (policy = policy
   i-1 exactly) the error of the rollout ("old") log-probs and of the sequence KL estimate
   ``sum(old - ref)`` against the fp32 model on the same tokens;
3. reward scores (``workflow.train.scoring.reward_scores`` with the frozen reward model, as scoring stages
   load it) of held-out prompt + chosen / rejected answers against fp32: error, error / spread of
   the scores, and pairs whose order flips.

    .venv/bin/python benchmarks/precision.py
    .venv/bin/python benchmarks/precision.py --base results/base --steps 8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from workflow import runtime  # noqa: E402
from workflow.models import loading  # noqa: E402
from workflow.train import policy_trainers, scoring  # noqa: E402

VARIANTS = ("fp32", "bf16 plain", "bf16")
BASE_CFG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_layers": 2,
    "num_heads": 4,
    "epochs": 4,
    "learning_rate": 1e-2,
    "batch_size": 64,
    "max_length": 128,
}
LORA = {"lora": {"r": 8, "alpha": None, "dropout": 0.1, "target_modules": "all-linear"}}


def stage_cfg(generation_length: int) -> dict[str, Any]:
    """The policy-stage config of the RLOO runs (config.yaml's policy section, smaller batches)."""
    return {
        "seed": 0,
        "dataset": {"name": "embedded"},
        **LORA,
        "snapshots": {"every": 0.5},
        "model": {"max_length": 128, "generation_length": generation_length},
        "policy": {
            "learning_rate": 1e-3,
            "batch_size": 8,
            "epochs": 1,
            "kl_coef": 0.01,
            "temperature": 1.0,
            "rloo_k": 2,
            "clip_range": 0.2,
        },
    }


# --- inputs ------------------------------------------------------------------------------------
def prepare(work: Path, base: str | None, rows: int) -> tuple[str, dict[str, str]]:
    """The base folder and ``{"prev", "sft", "reward"}`` random LoRA adapters (fp32, cached in ``work``)."""
    from peft import get_peft_model

    from workflow.data.embedded_task import generate_split
    from workflow.models.base_model import build_base_model, dialogues
    from workflow.models.lora import lora_config

    runtime.set_precision("fp32")
    if base is None:
        base = str(work / "base")
        if not Path(base).exists():
            build_base_model(dialogues(generate_split("train", rows, seed=0)), base, BASE_CFG, seed=0)
    tokenizer = loading.load_tokenizer(base, "chat")
    adapters = {}
    for name, seed in (("prev", 1), ("sft", 2), ("reward", 3)):
        path = work / f"adapter_{name}"
        adapters[name] = str(path)
        if path.exists():
            continue
        torch.manual_seed(seed)
        if name == "reward":
            model = get_peft_model(
                loading.load_sequence_classifier(base, tokenizer.pad_token_id), lora_config(LORA, "SEQ_CLS")
            )
        else:
            model = get_peft_model(loading.load_causal_lm(base), lora_config(LORA))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_" in param_name or "modules_to_save" in param_name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return base, adapters


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Precision of ``name``; ``bf16 plain`` also undoes the fp32 heads and the fp32 reward model."""
    previous = runtime.precision()
    runtime.set_precision("fp32" if name == "fp32" else "bf16")
    fp32_head, load_sequence_classifier = loading.fp32_head, loading.load_sequence_classifier

    def plain_head(module: torch.nn.Module) -> torch.nn.Module:
        return module.to(loading.torch_dtype())

    def bf16_classifier(base_path: str, pad_token_id: int | None = None, dtype: torch.dtype | None = None):
        return load_sequence_classifier(base_path, pad_token_id)

    if name == "bf16 plain":
        loading.fp32_head, loading.load_sequence_classifier = plain_head, bf16_classifier
    try:
        yield
    finally:
        loading.fp32_head, loading.load_sequence_classifier = fp32_head, load_sequence_classifier
        runtime.set_precision(previous)


def dtypes(tensors: Iterable[torch.Tensor]) -> str:
    """``float32``, ``bfloat16`` or ``bfloat16+float32``: the dtypes of ``tensors``."""
    return "+".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})) or "-"


def adam_states(optimizer: torch.optim.Optimizer) -> str:
    """dtypes of the AdamW moments of ``optimizer``."""
    return dtypes(state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq"))


# --- measurements ------------------------------------------------------------------------------
def reward_dtypes(base: str, adapter: str) -> dict[str, str]:
    """dtypes of a trainable reward model (reward refinement) and of its AdamW states after one step."""
    tokenizer = loading.load_tokenizer(adapter, "chat")
    model = loading.load_reward_model(base, adapter, trainable=True, pad_token_id=tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.tensor([tokenizer.encode("Tell me about the river.")], device=next(model.parameters()).device)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=runtime.use_bf16()):
        model(input_ids=ids).logits.sum().backward()
    optimizer.step()
    named = list(model.named_parameters())
    return {
        "trained reward: base weights": dtypes(p for n, p in named if "lora_" not in n and "score" not in n),
        "trained reward: LoRA weights": dtypes(p for n, p in named if "lora_" in n),
        "trained reward: score head": dtypes(p for n, p in named if "score.modules_to_save" in n),
        "trained reward: AdamW states": adam_states(optimizer),
    }


def rloo_run(
    base: str, adapters: dict[str, str], prompts: list, steps: int, generation_length: int, scratch: str
) -> dict[str, float | str]:
    """Train RLOO for ``steps`` updates and compare each update's log-probs with its rollout's."""
    tokenizer = loading.load_tokenizer(base, "chat")
    tokenizer.padding_side = "left"
    model = loading.load_policy(base, adapters["prev"], trainable=True)
    reward = loading.load_reward_model(base, adapters["reward"])
    reward_fn = scoring.RewardFunction(reward, loading.load_tokenizer(adapters["reward"], "chat"), name="reward")
    cfg = stage_cfg(generation_length)
    prompts = prompts[: steps * cfg["policy"]["batch_size"] // cfg["policy"]["rloo_k"]]  # one epoch: `steps` updates
    torch.manual_seed(0)
    stage = policy_trainers.PolicyStage(
        model, tokenizer, reward_fn, prompts, cfg, scratch, 0, [], base, adapters["sft"]
    )
    trainer = policy_trainers.build_rloo(stage).trainer
    calls: list[dict[str, Any]] = []
    spreads: list[torch.Tensor] = []
    logps_of, loss_of = trainer._get_per_token_logps_and_entropies, trainer._compute_loss

    def recording(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = logps_of(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        peft = trainer.accelerator.unwrap_model(trainer.model)
        kind = "new" if torch.is_grad_enabled() else ("ref" if peft.active_adapter == "ref" else "old")
        calls.append(
            {
                "kind": kind,
                "ids": input_ids,
                "attention": attention_mask,
                "keep": logits_to_keep,
                "mask": attention_mask[:, -logits_to_keep:].float(),
                "logps": out[0].detach().float(),
            }
        )
        return out

    def loss(model, inputs):
        value = loss_of(model, inputs)
        new = (calls[-1]["logps"] * inputs["completion_mask"]).sum(1)
        spreads.append((new - inputs["old_logps"].float()).abs())
        return value

    trainer._get_per_token_logps_and_entropies, trainer._compute_loss = recording, loss
    trainer.train()
    del trainer._get_per_token_logps_and_entropies, trainer._compute_loss
    first = next(c for c in calls if c["kind"] == "old")
    ref = next(c for c in calls if c["kind"] == "ref")
    spread = torch.cat(spreads)
    # the first rollout batch against the fp32 model on the same tokens (policy i-1 and SFT adapters)
    with variant("fp32"):
        exact = loading.load_policy(base, adapters["prev"])
        exact.load_adapter(adapters["sft"], adapter_name="ref")
        exact.eval()
        device = next(exact.parameters()).device
        ids, attention = first["ids"].to(device), first["attention"].to(device)
        with torch.no_grad():
            exact_old = logps_of(exact, ids, attention, first["keep"])[0].float()
            exact.set_adapter("ref")
            exact_ref = logps_of(exact, ids, attention, first["keep"])[0].float()
    mask = first["mask"].to(device)
    token_error = (first["logps"].to(device) - exact_old).abs()[mask.bool()]
    seq_error = ((first["logps"].to(device) - exact_old) * mask).sum(1).abs()
    kl = ((first["logps"].to(device) - ref["logps"].to(device)) * mask).sum(1)
    exact_kl = ((exact_old - exact_ref) * mask).sum(1)
    named = list(model.named_parameters())
    return {
        "policy: base weights": dtypes(p for n, p in named if "lora_" not in n),
        "policy: LoRA weights": dtypes(p for n, p in named if "lora_" in n),
        "policy: AdamW states": adam_states(trainer.optimizer),
        "RLOO updates": len(spreads),
        "first update |new-old| seq logp, mean": spread.mean().item(),
        "first update |new-old| seq logp, max": spread.max().item(),
        "first update |ratio-1|, max": (spread.max().exp() - 1).item(),
        "rollout logp error vs fp32, token mean": token_error.mean().item(),
        "rollout logp error vs fp32, token max": token_error.max().item(),
        "rollout logp error vs fp32, seq mean": seq_error.mean().item(),
        "rollout logp error vs fp32, seq max": seq_error.max().item(),
        "seq KL estimate, mean": kl.mean().item(),
        "seq KL estimate, same tokens in fp32": exact_kl.mean().item(),
        "seq KL error vs fp32, mean": (kl - exact_kl).abs().mean().item(),
        "seq KL error vs fp32, max": (kl - exact_kl).abs().max().item(),
    }


def reward_run(base: str, adapter: str, rows) -> tuple[dict[str, np.ndarray], str]:
    """Scores of ``prompt + chosen`` and ``prompt + rejected`` by the frozen reward model, and the
    dtypes of its weights."""
    from workflow.train.scoring import reward_scores

    tokenizer = loading.load_tokenizer(adapter, "chat")
    model = loading.load_reward_model(base, adapter, pad_token_id=tokenizer.pad_token_id)
    prompts = list(rows["prompt"])
    scores = {
        "chosen": reward_scores(model, tokenizer, prompts, list(rows["chosen"])),
        "rejected": reward_scores(model, tokenizer, prompts, list(rows["rejected"])),
    }
    return scores, dtypes(model.parameters())


def reward_stats(scores: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> dict[str, float | str]:
    error = np.abs(np.concatenate([scores[k] - exact[k] for k in ("chosen", "rejected")]))
    spread = np.concatenate([exact["chosen"], exact["rejected"]]).std()
    flips = int(((scores["chosen"] > scores["rejected"]) != (exact["chosen"] > exact["rejected"])).sum())
    return {
        "scoring: |score - fp32|, mean": float(error.mean()),
        "scoring: |score - fp32|, max": float(error.max()),
        "scoring: max error / score std": float(error.max() / spread),
        "scoring: pairs whose order flips": f"{flips}/{len(exact['chosen'])}",
    }


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.2e}" if abs(value) < 1e-2 else f"{value:.4f}"
    return str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="an existing base model folder (default: build a small one in --work)")
    parser.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "zopro_precision"),
        help="folder for the built base and the adapters (reused when present)",
    )
    parser.add_argument("--rows", type=int, default=600, help="embedded training rows of the built base")
    parser.add_argument("--steps", type=int, default=4, help="RLOO updates per variant")
    parser.add_argument("--generation-length", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from workflow.data.embedded_task import generate_split

    runtime.configure(args.threads, 0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, adapters = prepare(work, args.base, args.rows)
    test = generate_split("test", 64, seed=0)
    prompts = [list(p) for p in generate_split("train", 64, seed=1)["prompt"]]
    columns: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        with variant(name), tempfile.TemporaryDirectory(dir=work) as scratch:
            torch.manual_seed(0)
            columns[name] = {
                **rloo_run(base, adapters, prompts, args.steps, args.generation_length, scratch),
                **reward_dtypes(base, adapters["reward"]),
            }
            scores, weights = reward_run(base, adapters["reward"], test)
        if name == "fp32":
            exact_scores = scores
        columns[name].update({"scoring: reward model weights": weights, **reward_stats(scores, exact_scores)})
    print(
        f"\nbase: {base}; {args.steps} RLOO updates of 8 rollouts ({args.generation_length} new tokens); "
        f"reward: {len(test)} held-out pairs; device {runtime.device()}, {torch.get_num_threads()} threads\n"
    )
    width = max(len(k) for k in columns["fp32"])
    print(f"| {'':{width}} | " + " | ".join(f"{v:>16}" for v in VARIANTS) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * 18 for _ in VARIANTS) + "|")
    for key in columns["fp32"]:
        print(f"| {key:{width}} | " + " | ".join(f"{fmt(columns[v][key]):>16}" for v in VARIANTS) + " |")


if __name__ == "__main__":
    main()
