"""ZOPrO's guarded variant: probes, guard, momentum trust region, state, and precision on a bf16 base."""

from __future__ import annotations

import contextlib

import pytest
import torch

from workflow import runtime
from workflow.zo.guarded import GuardedConfig, GuardedEngine

SHAPES = {"q.lora_A.weight": (4, 16), "q.lora_B.weight": (16, 4), "v.lora_A.weight": (4, 16)}


def config(**overrides) -> GuardedConfig:
    values = dict(
        step_size=0.05, eps=1e-3, n_perturbations=4, updates_per_batch=8, momentum_kl=0.5, momentum_prompts=4, seed=3
    )
    values.update(overrides)
    return GuardedConfig(**values)


def make(cfg: GuardedConfig, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    mu = {k: 0.1 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    v = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items() if k != "v.lora_A.weight"}
    return GuardedEngine(list(params.items()), mu, v, cfg), params, mu, v


def quadratic(params: dict[str, torch.Tensor], target: dict[str, torch.Tensor]):
    return lambda: 0.5 * sum(float((params[k] - target[k]).pow(2).sum()) for k in params)


def test_probes_are_unit_scale_orthogonal_to_v_and_mu_and_replayable():
    engine, _, mu, v = make(config())
    z = engine.probes(5)
    flat_v = engine.flat.flat(v)
    assert z.shape == (4, sum(t.numel() for t in mu.values()))
    assert (z @ flat_v).abs().max() < 1e-4 * float(flat_v.norm())
    assert (z @ engine.mu).abs().max() < 1e-4 * float(engine.mu.norm())
    assert 0.8 < float(z.pow(2).mean()) < 1.2  # MeZO scale: does not depend on |mu|
    assert torch.equal(z, engine.probes(5)) and not torch.equal(z, engine.probes(6))


def test_guarded_updates_lower_the_loss_and_count_every_step():
    cfg = config(step_size=0.01)
    engine, params, _, _ = make(cfg)
    target = {k: torch.zeros_like(p) for k, p in params.items()}
    loss = quadratic(params, target)
    losses = [loss()]
    for _ in range(3):
        metrics = engine.update(loss)
        losses.append(loss())
        assert metrics["zo/loss_change"] == pytest.approx(losses[-1] - losses[-2], rel=1e-4)
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert engine.last_loss == pytest.approx(losses[-1], rel=1e-6)
    state = engine.state
    assert state.accepted + state.rejected + state.skipped == state.step == 3 * cfg.updates_per_batch
    assert state.accepted > 0


def test_a_step_that_raises_the_loss_is_rejected_and_undone_exactly():
    engine, params, _, _ = make(config(step_size=1e3))  # far too large: every candidate overshoots
    start = {k: p.clone() for k, p in params.items()}
    metrics = engine.update(quadratic(params, {k: torch.zeros_like(p) for k, p in params.items()}))
    assert engine.state.rejected == engine.config.updates_per_batch and metrics["zo/accepted_fraction"] == 0
    assert all(torch.equal(params[k], start[k]) for k in params)


def test_non_finite_losses_skip_the_update():
    engine, params, _, _ = make(config())
    start = {k: p.clone() for k, p in params.items()}
    engine.update(lambda: float("nan"))
    assert engine.state.skipped == engine.config.updates_per_batch
    assert all(torch.equal(params[k], start[k]) for k in params)


@pytest.mark.parametrize("budget", [0.0, 0.1, 0.3, 10.0])
def test_momentum_takes_the_largest_grid_step_within_the_kl_budget(budget):
    engine, params, mu, _ = make(config(momentum_kl=budget))
    start = engine.flat.copy()

    def kl() -> float:  # alpha^2
        return float(((engine.flat.copy() - start).norm() / engine.mu.norm()) ** 2)

    metrics = engine.momentum(kl)
    alpha = {0.0: 0.0, 0.1: 0.25, 0.3: 0.5, 10.0: 1.0}[budget]  # the largest k / 8 with (k / 8)^2 <= budget
    assert metrics["zo/momentum_alpha"] == alpha and engine.state.momentum_alpha == alpha
    torch.testing.assert_close(engine.flat.copy(), start + alpha * engine.mu)


def test_state_dict_resumes_the_probe_sequence_and_refuses_another_seed():
    engine, params, _, _ = make(config())
    target = {k: torch.zeros_like(p) for k, p in params.items()}
    engine.update(quadratic(params, target))
    saved = engine.state_dict()
    resumed, _, _, _ = make(config())
    resumed.load_state_dict(saved)
    assert resumed.state == engine.state
    assert torch.equal(resumed.probes(resumed.state.step), engine.probes(engine.state.step))
    other, _, _, _ = make(config(seed=4))
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(saved)


# --- precision: finite differences on a bf16 base ---------------------------------------------
@pytest.fixture
def bf16_precision():
    before = runtime.precision()
    runtime.set_precision("bf16")
    yield
    runtime.set_precision(before)


def _directional_error(model, batch, z: list[torch.Tensor], eps: float, autocast: bool) -> float:
    """|finite difference - autograd G.z| / |G.z| of a sequence log-prob loss along ``z``."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    batch = {k: t.to(device) for k, t in batch.items()}
    z = [t.to(device) for t in z]
    advantages = torch.linspace(-1.0, 1.0, batch["input_ids"].shape[0], device=device)

    def loss() -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            logits = model(**batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        return -(advantages * (logp * batch["attention_mask"][:, 1:]).sum(1)).mean()

    for p in params:
        p.grad = None
    loss().backward()
    exact = sum(float((p.grad * t).sum()) for p, t in zip(params, z))
    with torch.no_grad():
        for p, t in zip(params, z):
            p.add_(t, alpha=eps)
        plus = float(loss())
        for p, t in zip(params, z):
            p.add_(t, alpha=-2 * eps)
        minus = float(loss())
        for p, t in zip(params, z):
            p.add_(t, alpha=eps)
    return abs((plus - minus) / (2 * eps) - exact) / abs(exact)


def test_finite_differences_match_autograd_on_a_bf16_base(bf16_precision, tiny_base, adapters, embedded_frames):
    """The guarded variant's fp32 computation resolves its probes on a bf16 base (within 5%); bf16
    autocast, the trainer's mixed-precision path, does not."""
    from workflow.models.loading import fp32_compute, load_policy, load_tokenizer

    tokenizer = load_tokenizer(tiny_base, "chat")
    rows = embedded_frames["train"].head(16)
    texts = [tokenizer.apply_chat_template(list(p) + list(c), tokenize=False) for p, c in zip(rows.prompt, rows.chosen)]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    errors = {}
    for label in ("bf16 autocast", "fp32 compute"):
        model = load_policy(tiny_base, adapters["sft"], trainable=True)
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        if label == "fp32 compute":
            fp32_compute(model)
        gen = torch.Generator().manual_seed(0)
        z = [torch.randn(p.shape, generator=gen) for p in model.parameters() if p.requires_grad]
        errors[label] = _directional_error(model, batch, z, eps=1e-3, autocast=label == "bf16 autocast")
    assert errors["fp32 compute"] < 0.05, errors
    assert errors["bf16 autocast"] > 0.05, errors


@pytest.mark.parametrize("start_kl", [0.5, 3.0])
def test_momentum_keeps_the_rise_of_the_kl_to_the_reference_within_budget(start_kl):
    """KL to SFT = start_kl + 2 alpha^2 may rise by at most momentum_kl = 0.5: alpha <= 0.5."""
    engine, _, _, _ = make(config(momentum_kl=0.5))
    start = engine.flat.copy()

    def alpha() -> float:
        return float((engine.flat.copy() - start).norm() / engine.mu.norm())

    metrics = engine.momentum(lambda: 0.1 * alpha() ** 2, lambda: start_kl + 2 * alpha() ** 2)
    assert metrics["zo/momentum_alpha"] == 0.5
    assert metrics["zo/momentum_reference_kl"] == pytest.approx(start_kl + 0.5)
    torch.testing.assert_close(engine.flat.copy(), start + 0.5 * engine.mu)


def test_guarded_updates_read_from_the_device_once_per_batch():
    """Accept / reject and skip decisions are device tensors: the 4 updates of a batch make no read;
    the batch's metrics are read once at the end."""
    from test_zopro import host_reads

    engine, params, _, _ = make(config(updates_per_batch=4))

    def loss():  # a device tensor, as the trainer's loss
        return 0.5 * sum((p * p).sum() for p in params.values())

    assert host_reads(lambda: engine.update(loss)) == 1
    assert engine.state.accepted + engine.state.rejected == 4
