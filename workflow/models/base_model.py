"""The tiny base causal LM of the embedded task, built from scratch when ``model.name`` is null.

1. ``build_tokenizer``: a byte-level BPE tokenizer trained on the task's chat transcripts, with the
   special tokens ``<s>`` (bos), ``<|im_end|>`` (eos, ends every answer), ``<pad>`` and
   ``<|im_start|>``, wrapped in ``PreTrainedTokenizerFast`` with the ``chat`` template
   (``workflow.data.templates.prepare_tokenizer``).
2. ``build_model``: a small ``LlamaForCausalLM`` sized by ``config["base_model"]``.
3. ``pretrain``: a short, seeded, full-parameter next-token pretraining on the rendered transcripts
   of both the chosen and the rejected answers (so the model can produce either kind).
4. ``build_base_model``: all of the above, saved atomically with ``save_pretrained``
   (model, tokenizer, generation config, ``metrics.csv``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from workflow import runtime
from workflow.io import atomic_dir, read_table, write_csv
from workflow.schema import default, section, setting

if TYPE_CHECKING:
    from workflow.job import Job

log = logging.getLogger(__name__)

BOS, EOS, PAD, IM_START = "<s>", "<|im_end|>", "<pad>", "<|im_start|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START]
Message = dict[str, str]


# --------------------------------------------------------------------------------- transcripts
def dialogues(df: pd.DataFrame) -> list[list[Message]]:
    """Prompt + chosen and prompt + rejected conversations of every row."""
    out = []
    for column in ("chosen", "rejected"):
        if column not in df:
            continue
        for prompt, answer in zip(df["prompt"], df[column]):
            out.append([dict(m) for m in prompt] + [dict(m) for m in answer])
    return out


def _plain_render(messages: Sequence[Message]) -> str:
    """The chat transcript without a tokenizer (used to train the BPE merges)."""
    from workflow.data.templates import render as render_chat

    return render_chat(list(messages), "chat", bos=BOS)


def render(tokenizer: Any, conversations: Iterable[Sequence[Message] | str]) -> list[str]:
    """Transcripts as the tokenizer's chat template renders them (strings pass through)."""
    return [c if isinstance(c, str) else tokenizer.apply_chat_template(list(c), tokenize=False) for c in conversations]


# ---------------------------------------------------------------------------------- tokenizer
def build_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``, with the ``chat`` template;
    its ``model_max_length`` is ``max_length`` (config ``model.max_length``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workflow.data.templates import prepare_tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=SPECIAL_TOKENS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IM_START],
        padding_side="right",
        model_max_length=int(max_length),
    )
    prepare_tokenizer(tokenizer, "chat")
    return tokenizer


# -------------------------------------------------------------------------------------- model
def model_settings(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """``cfg`` (keys of config ``base_model``, plus ``max_length``) over the schema's defaults."""
    return {**section({}, "base_model"), "max_length": default("model.max_length"), **(cfg or {})}


def build_model(tokenizer: Any, cfg: dict[str, Any]):
    """A randomly initialised ``LlamaForCausalLM`` sized by ``cfg`` (keys of ``config["base_model"]``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model_settings(cfg)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_layers"]),
        num_attention_heads=int(cfg["num_heads"]),
        num_key_value_heads=int(cfg["num_heads"]),
        max_position_embeddings=max(256, int(cfg["max_length"])),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------------------------- pretrain
def pretrain(model: Any, tokenizer: Any, texts: Sequence[str], cfg: dict[str, Any], seed: int) -> dict[str, float]:
    """Full-parameter next-token training on ``texts``; returns ``{"steps", "loss", "seconds"}``.

    AdamW with linear warm-up and cosine decay; padding is masked out of the loss; bf16 autocast
    where ``runtime.use_bf16()`` (config ``precision``), else fp32; deterministic for ``seed`` on CPU.
    """
    cfg = model_settings(cfg)
    device = runtime.device()
    model.to(device).train()
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=int(cfg["max_length"]))
    ids = [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]
    batch_size = int(cfg["batch_size"])
    per_epoch = math.ceil(len(ids) / batch_size)
    total = max(1, round(per_epoch * float(cfg["epochs"])))
    warmup = max(1, total // 20)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(cfg["learning_rate"]), weight_decay=0.01, betas=(0.9, 0.98)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    )
    generator = torch.Generator().manual_seed(int(seed))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=runtime.use_bf16())
    pad = tokenizer.pad_token_id
    start, step, ema = time.perf_counter(), 0, None
    with tqdm(total=total, desc="pretrain base model", mininterval=5.0) as bar:
        while step < total:
            order = torch.randperm(len(ids), generator=generator).tolist()
            for first in range(0, len(order), batch_size):
                if step >= total:
                    break
                batch = [ids[i] for i in order[first : first + batch_size]]
                input_ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad).to(device)
                attention = (
                    torch.arange(input_ids.shape[1])[None, :] < torch.tensor([len(b) for b in batch])[:, None]
                ).to(device)
                labels = input_ids.masked_fill(~attention, -100)
                with autocast:
                    loss = model(input_ids=input_ids, attention_mask=attention.long(), labels=labels).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                ema = value if ema is None else 0.95 * ema + 0.05 * value
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    model.eval()
    seconds = time.perf_counter() - start
    log.info("pretrained %d steps in %.1f s, final loss %.4f", step, seconds, ema)
    return {"steps": step, "loss": float(ema), "seconds": seconds}


def build_base_model(
    conversations: Sequence[Sequence[Message] | str], out_dir: str | Path, cfg: dict[str, Any], seed: int
) -> dict[str, float]:
    """Train the tokenizer and the tiny model on ``conversations`` and save both to ``out_dir``.

    ``conversations`` are message lists (rendered with the chat template) or already rendered
    transcripts. Writes atomically; returns the metrics also written to ``out_dir/metrics.csv``.
    """
    cfg = model_settings(cfg)
    start = time.perf_counter()
    torch.manual_seed(int(seed))
    plain = [c if isinstance(c, str) else _plain_render(c) for c in conversations]
    tokenizer = build_tokenizer(plain, int(cfg["vocab_size"]), int(cfg["max_length"]))
    texts = render(tokenizer, conversations)
    model = build_model(tokenizer, cfg)
    stats = pretrain(model, tokenizer, texts, cfg, seed)
    n_tokens = sum(len(x) for x in tokenizer(texts[:2000], add_special_tokens=False)["input_ids"])
    metrics = {
        "step": stats["steps"],
        "loss": stats["loss"],
        "train_seconds": stats["seconds"],
        "wall_seconds": time.perf_counter() - start,
        "n_texts": len(texts),
        "mean_tokens": n_tokens / max(1, min(len(texts), 2000)),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with atomic_dir(out_dir) as tmp:
        model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_csv(pd.DataFrame([metrics]), Path(tmp) / "metrics.csv")
    log.info("base model saved to %s: %s", out_dir, metrics)
    return metrics


def run(job: Job) -> None:
    """Stage ``base_model``: ``job.input['train']`` parquet -> ``job.output['model']`` folder."""
    df = read_table(job.input["train"], ("prompt",))
    cfg = {**section(job.config, "base_model"), "max_length": setting(job.config, "model.max_length")}
    build_base_model(dialogues(df), job.output["model"], cfg, job.seed)
