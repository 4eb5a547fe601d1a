"""The tiny base model: the shared fixture and the real ``base_model`` stage function."""

from __future__ import annotations

import pandas as pd
import torch

from workflow.job import Job


def _generate(path: str, prompt: str = "Describe the garden.") -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=12)
    assert out.shape[1] > enc["input_ids"].shape[1]
    return tok.decode(out[0, enc["input_ids"].shape[1] :])


def test_tiny_base_fixture_loads_and_generates(tiny_base):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "<|im_end|>", "<pad>")
    assert "<|im_start|>" in tok.all_special_tokens
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}], tokenize=False
    )
    assert text == "<s><|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nYo.<|im_end|>\n"
    assert _generate(tiny_base).strip()
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=1)
    assert rm.config.pad_token_id == tok.pad_token_id
    enc = tok(["<s>a", "<s>abc def"], return_tensors="pt", padding=True)
    assert rm(**enc).logits.shape == (2, 1)


def test_base_model_stage(embedded_parquet, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from workflow.models.base_model import run

    out = tmp_path / "results" / "base"
    cfg = {
        "vocab_size": 320,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "epochs": 0.5,
        "learning_rate": 3e-3,
        "batch_size": 32,
    }
    job = Job(
        input={"train": embedded_parquet["train"]},
        output={"model": str(out)},
        params={},
        config={"seed": 0, "base_model": cfg, "model": {"max_length": 64}},
        wildcards={},
    )
    threads = torch.get_num_threads()
    run(job)
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.pad_token_id == tok.pad_token_id
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") and gen.pad_token_id == tok.pad_token_id
    metrics = pd.read_csv(out / "metrics.csv")
    assert {"loss", "wall_seconds", "step"} <= set(metrics.columns) and metrics["step"].iloc[0] >= 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # atomic: no leftovers
    _generate(str(out))


def test_pretraining_is_deterministic(embedded_frames):
    from workflow.models.base_model import _plain_render, build_model, build_tokenizer, dialogues, pretrain, render

    convs = dialogues(embedded_frames["train"].head(16))
    cfg = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "epochs": 1, "batch_size": 8}
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        tok = build_tokenizer([_plain_render(c) for c in convs], 300, 128)
        losses.append(pretrain(build_model(tok, cfg), tok, render(tok, convs), cfg, seed=0)["loss"])
    assert losses[0] == losses[1]


def test_pretraining_autocasts_to_bf16_where_the_precision_says(embedded_frames, set_precision):
    """Config ``precision`` on the device it trains on (``bf16`` on the CPU as on a GPU)."""
    from workflow.models.base_model import _plain_render, build_model, build_tokenizer, dialogues, pretrain, render

    convs = dialogues(embedded_frames["train"].head(8))
    cfg = {"hidden_size": 16, "intermediate_size": 32, "num_layers": 1, "num_heads": 2, "epochs": 1, "batch_size": 8}
    tok = build_tokenizer([_plain_render(c) for c in convs], 300, 128)
    for precision, expected in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        set_precision(precision)
        model = build_model(tok, cfg)
        seen: list[torch.dtype] = []
        model.lm_head.register_forward_hook(lambda _module, _args, output, seen=seen: seen.append(output.dtype))
        pretrain(model, tok, render(tok, convs), cfg, seed=0)
        assert seen and set(seen) == {expected}
