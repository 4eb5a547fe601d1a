"""Measure the embedded task and its tiny base model (rerunnable).

Builds the base model exactly as the ``base_model`` rule does (config.yaml ``base_model:`` and
``embedded:`` sections, 2 threads), then samples it at temperature 1 from the chat template on
held-out prompts and prints: build wall time, final loss, fraction of well-formed samples (ending
with ``<|im_end|>``), and the mean gold score of base-model samples vs the dataset's chosen and
rejected answers vs the best possible score.

    .venv/bin/python benchmarks/embedded_task.py [--out /tmp/embedded_base] [--samples 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from workflow import runtime  # noqa: E402
from workflow.data.chat import last_user_text  # noqa: E402
from workflow.data.embedded_task import best_score, generate_split, gold_score  # noqa: E402
from workflow.models.base_model import build_base_model, dialogues  # noqa: E402


def sample(
    model_dir: str, prompts: list[str], max_new_tokens: int, temperature: float, seed: int, batch_size: int = 64
) -> tuple[list[str], list[bool]]:
    """Sample one answer per prompt; returns the answers and whether each ended with EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    answers, ended = [], []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        texts = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            done = tok.eos_token_id in row
            row = row[: row.index(tok.eos_token_id)] if done else row
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
            ended.append(done)
    return answers, ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--out", default="/tmp/embedded_base")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="skip the build when --out exists")
    args = parser.parse_args()
    config = yaml.safe_load(open(args.config))
    seed = int(config["seed"])
    runtime.configure(args.threads, seed)
    train = generate_split("train", int(config["embedded"]["train_rows"]), seed)
    test = generate_split("test", int(config["embedded"]["test_rows"]), seed)
    cfg = {**config["base_model"], "max_length": config["model"]["max_length"]}

    if not (args.reuse and Path(args.out).exists()):
        start = time.perf_counter()
        metrics = build_base_model(dialogues(train), args.out, cfg, seed)
        print(
            f"build: {time.perf_counter() - start:.1f} s wall ({metrics['train_seconds']:.1f} s training, "
            f"{metrics['step']} steps), final loss {metrics['loss']:.3f}, "
            f"{metrics['parameters']} parameters, {metrics['mean_tokens']:.1f} tokens per transcript"
        )

    prompts = [last_user_text(p) for p in test["prompt"]]
    prompts = (prompts * (args.samples // len(prompts) + 1))[: args.samples]
    answers, ended = sample(args.out, prompts, int(config["model"]["generation_length"]), 1.0, seed)
    base = np.array([gold_score(p, a) for p, a in zip(prompts, answers)])
    chosen = np.array([gold_score(last_user_text(p), c[0]["content"]) for p, c in zip(test["prompt"], test["chosen"])])
    rejected = np.array(
        [gold_score(last_user_text(p), r[0]["content"]) for p, r in zip(test["prompt"], test["rejected"])]
    )
    print(
        f"base samples: {np.mean(ended):.1%} end with <|im_end|>; mean gold {base.mean():.3f} "
        f"(sd {base.std():.3f}, n={len(base)})"
    )
    print(
        f"dataset test: chosen mean gold {chosen.mean():.3f}, rejected {rejected.mean():.3f}, "
        f"min gap {(chosen - rejected).min():.3f}; best possible {best_score():.3f}"
    )
    for p, a in list(zip(prompts, answers))[:6]:
        print(f"  {p!r} -> {a!r}  gold {gold_score(p, a):.2f}")


if __name__ == "__main__":
    main()
