"""ZOPrO: direction geometry, SPSA estimator, restore, schedules, state, and one real trainer step."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from workflow.zo.direction import Direction, ZOConfig, decays, gamma_at, tensor_seed
from workflow.zo.engine import ZOEngine, ZOOptimizer

SHAPES = {
    "layers.0.q.lora_A.weight": (4, 16),
    "layers.0.q.lora_B.weight": (16, 4),
    "layers.1.v.lora_A.weight": (4, 16),
    "layers.1.norm.bias": (16,),
}


def make(seed=0, with_v=None, with_mu=None):
    g = torch.Generator().manual_seed(seed)
    names = list(SHAPES)
    params = [torch.randn(s, generator=g) for s in SHAPES.values()]
    mu = {k: 0.01 * torch.randn(s, generator=g) for k, s in SHAPES.items() if with_mu is None or k in with_mu}
    v = {k: torch.randn(s, generator=g) for k, s in SHAPES.items() if with_v is None or k in with_v}
    return names, params, mu, v


def cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# --- direction geometry ----------------------------------------------------------------------
def per_tensor(d: Direction, flat: torch.Tensor) -> list[torch.Tensor]:
    return d.flat.views(flat)


@pytest.mark.parametrize("gamma", [0.0, 0.6, 0.999])
def test_direction_orthogonal_to_v_and_norm_mu_per_tensor(gamma):
    names, params, mu, v = make()
    d = Direction(names, params, mu, v)
    for name, z in zip(names, per_tensor(d, d.z(seed=3, step=5, j=0, gamma=gamma))):
        explore = z - gamma * mu[name]  # = sqrt(1-g^2) n_perp
        v_hat = v[name] / v[name].norm()
        assert abs(float(torch.dot(explore.flatten(), v_hat.flatten()))) < 1e-5 * float(mu[name].norm()) + 1e-7
        expected = math.sqrt(1 - gamma**2) * float(mu[name].norm())
        assert float(explore.norm()) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_no_update_of_one_iteration_draws_the_noise_of_another():
    """Stage seeds of consecutive iterations differ by 1009 (workflow.job.Job.stage_seed) and a stage
    makes more updates than that (75 batches x 16 by default): seeds of (stage, update) never repeat."""
    seeds = {tensor_seed(1009 * iteration, step, 0, 0) for iteration in range(3) for step in range(2000)}
    assert len(seeds) == 3 * 2000
    assert len({tensor_seed(7, 2, j, k) for j in range(4) for k in range(4)}) == 16


def test_flat_directions_are_the_per_tensor_formula():
    """The flat buffers give the numbers of the tensor-by-tensor formula (module docstring): each
    tensor's noise from its own seed, projected off its v_hat, rescaled to |mu_k|, mixed with mu."""
    names, params, mu, v = make()
    d = Direction(names, params, mu, v)
    gamma = 0.6
    for k, (name, p, z) in enumerate(zip(names, params, per_tensor(d, d.z(7, 2, 1, gamma)))):
        gen = torch.Generator().manual_seed(tensor_seed(7, 2, 1, k))
        n = torch.randn(p.shape, generator=gen)
        v_hat = v[name] / v[name].norm()
        n = n - float((v_hat * n).sum()) * v_hat
        n = n * float(mu[name].norm()) / float(n.norm())
        torch.testing.assert_close(z, math.sqrt(1 - gamma**2) * n + gamma * mu[name], rtol=1e-5, atol=1e-7)


def test_keys_without_v_get_plain_noise_and_zero_mu_gets_rms_norm():
    no_v = "layers.1.v.lora_A.weight"
    no_mu = "layers.0.q.lora_B.weight"
    names, params, mu, v = make(with_v=[n for n in SHAPES if n != no_v], with_mu=[n for n in SHAPES if n != no_mu])
    mu["layers.1.norm.bias"] = torch.zeros(16)  # zero norm = no mu
    d = Direction(names, params, mu, v)
    raw = dict(zip(names, per_tensor(d, d.noise(3, 0, 0))))
    z = dict(zip(names, per_tensor(d, d.z(3, 0, 0, gamma=0.0))))
    assert cos(z[no_v].flatten(), raw[no_v].flatten()) == pytest.approx(1.0, abs=1e-6)  # not projected
    nonzero = [mu[n] for n in names if n in mu and float(mu[n].norm()) > 0]
    rms = math.sqrt(sum(float(m.pow(2).sum()) for m in nonzero) / sum(m.numel() for m in nonzero))
    for name in (no_mu, "layers.1.norm.bias"):
        assert float(z[name].norm()) == pytest.approx(rms * math.sqrt(z[name].numel()), rel=1e-5)
        assert torch.isfinite(z[name]).all()
    # no mu at all: plain MeZO noise (its own norm)
    d0 = Direction(names, params, {}, {})
    torch.testing.assert_close(d0.z(3, 0, 0, gamma=0.5), math.sqrt(0.75) * d0.noise(3, 0, 0))


def test_same_seed_same_direction_and_seed_advances():
    names, params, mu, v = make()
    d = Direction(names, params, mu, v)
    a, b = d.z(7, 2, 0, 0.5), d.z(7, 2, 0, 0.5)
    assert torch.equal(a, b)
    c = d.z(7, 3, 0, 0.5)  # next update
    e = d.z(7, 2, 1, 0.5)  # second q-SPSA direction
    assert not torch.equal(a, c) and not torch.equal(a, e)
    # the stage seed and the step enter apart: (seed 7, step 3) and (seed 8, step 2) differ
    assert not torch.equal(c, d.z(8, 2, 0, 0.5))


def test_perturb_in_place_matches_z():
    names, params, mu, v = make()
    d = Direction(names, params, mu, v)
    before = [p.clone() for p in params]
    ids = [id(p) for p in params]
    z = d.z(1, 0, 0, 0.3)
    d.flat.add_(z, 0.5)
    assert [id(p) for p in params] == ids
    for k, p in enumerate(params):
        torch.testing.assert_close(p, before[k] + 0.5 * per_tensor(d, z)[k])
    torch.testing.assert_close(d.flat.copy(), torch.cat([b.reshape(-1) for b in before]) + 0.5 * z)


# --- SPSA ------------------------------------------------------------------------------------
def test_restore_after_perturbation_pair_within_float_rounding():
    """+eps, -2eps, +eps is exact up to float rounding (not bit-exact): <= 2 ulp of max(|p|, |eps z|)."""
    names, params, mu, v = make()
    mu = {k: 100 * m for k, m in mu.items()}  # a large eps*z makes rounding visible
    eng = ZOEngine(list(zip(names, params)), mu, v, ZOConfig(eps=0.3, gamma_schedule="constant", n_perturbations=3))
    before = [p.clone() for p in params]
    zs = [eng.z(j) for j in range(3)]
    for _ in range(5):
        eng.estimate(lambda: sum(float(p.sum()) for p in params))
    for k, p in enumerate(params):
        scale = torch.maximum(before[k].abs(), torch.stack([0.3 * z[k].abs() for z in zs]).amax(0))
        ulp = torch.finfo(torch.float32).eps * scale
        assert ((p - before[k]).abs() <= 2 * 5 * 3 * ulp + 1e-30).all()
    assert eng.state.step == 0  # estimation does not step


def quadratic(dim=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
    b = torch.randn(dim, generator=g)
    return a, b


def test_expected_direction_agrees_with_true_gradient():
    a, b = quadratic()
    theta = torch.zeros(40)
    grad = a.T @ (a @ theta - b)
    v = {"w": torch.randn(40, generator=torch.Generator().manual_seed(1))}
    mu = {"w": 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(2))}
    total = torch.zeros(40)
    for seed in range(300):
        eng = ZOEngine([("w", theta)], mu, v, ZOConfig(seed=seed, eps=1e-3, gamma_start=0.0, gamma_schedule="constant"))
        g, _ = eng.estimate(lambda: 0.5 * float((a @ theta - b).pow(2).sum()))
        total += float(g[0]) * eng.z(0)[0]
    v_hat = v["w"] / v["w"].norm()
    grad_perp = grad - torch.dot(grad, v_hat) * v_hat  # what the estimator can see
    assert cos(total, grad) > 0.5
    assert cos(total, grad_perp) > 0.8
    assert abs(float(torch.dot(total, v_hat))) < 1e-4 * float(total.norm())


@pytest.mark.parametrize("two_sided,q", [(True, 1), (False, 1), (True, 4)])
def test_loss_decreases_on_linear_regression(two_sided, q):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    w_true = torch.randn(10, generator=g)
    y = x @ w_true
    w = torch.zeros(10)
    mu = {"w": torch.full((10,), 0.3)}

    def loss():
        return float((x @ w - y).pow(2).mean())

    start = loss()
    eng = ZOEngine(
        [("w", w)],
        mu,
        {},
        ZOConfig(
            lr=0.05,
            eps=1e-3,
            gamma_start=0.999,
            gamma_schedule="linear",
            two_sided=two_sided,
            n_perturbations=q,
            seed=1,
        ),
        total_steps=300,
    )
    for _ in range(300):
        eng.estimate(loss)
        eng.apply()
    assert loss() < 0.2 * start
    assert eng.state.step == 300


def test_update_formula_q_spsa_accumulation_and_weight_decay():
    names, params, mu, v = make()
    cfg = ZOConfig(lr=0.1, eps=1e-3, gamma_schedule="constant", gamma_start=0.5, n_perturbations=2, weight_decay=0.5)
    eng = ZOEngine(list(zip(names, params)), mu, v, cfg)
    before = [p.clone() for p in params]
    zs = [eng.z(j) for j in range(2)]
    gen = torch.Generator().manual_seed(1)
    w1 = [torch.randn(p.shape, generator=gen) for p in params]
    w2 = [torch.randn(p.shape, generator=gen) for p in params]
    g1, _ = eng.estimate(lambda: sum(float((w.double() * p.double()).sum()) for w, p in zip(w1, params)))
    g2, _ = eng.estimate(lambda: sum(float((w.double() * p.double()).sum()) for w, p in zip(w2, params)))
    metrics = eng.apply()
    g = (g1 + g2) / 2
    # linear losses: g_j is the exact directional derivative
    for j in range(2):
        exact = sum(float(((a + b) / 2 * z).sum()) for a, b, z in zip(w1, w2, zs[j]))
        assert float(g[j]) == pytest.approx(exact, rel=1e-2, abs=1e-3)
    for k, name in enumerate(names):
        wd = 0.5 if decays(name) else 0.0
        expected = before[k] - 0.1 * (sum(float(g[j]) * zs[j][k] for j in range(2)) / 2 + wd * before[k])
        torch.testing.assert_close(params[k], expected, rtol=1e-5, atol=1e-6)
    assert not decays("layers.1.norm.bias") and not decays("model.norm.weight")
    assert not decays("layers.0.input_layernorm.weight") and decays("layers.0.q_proj.lora_A.weight")
    assert metrics["zo/skipped"] == 0 and eng.state.step == 1


def test_non_finite_g_skips_and_counts():
    names, params, mu, v = make()
    eng = ZOEngine(list(zip(names, params)), mu, v, ZOConfig(gamma_schedule="constant"))
    before = [p.clone() for p in params]
    eng.estimate(lambda: float("nan"))
    metrics = eng.apply()
    assert metrics["zo/skipped"] == 1 and eng.state.skipped == 1 and eng.state.step == 1
    calls = iter([float("inf"), 0.0])
    eng.estimate(lambda: next(calls))
    assert eng.apply()["zo/skipped"] == 2
    for p, b in zip(params, before):
        torch.testing.assert_close(p, b, rtol=0, atol=1e-6)
    eng.estimate(lambda: float(params[0].sum()))
    assert eng.apply()["zo/skipped"] == 2 and eng.state.step == 3


def test_gamma_schedules():
    assert gamma_at("constant", 0.7, 100, None) == 0.7
    assert gamma_at("linear", 0.999, 0, 10) == pytest.approx(0.999)
    assert gamma_at("linear", 0.999, 5, 10) == pytest.approx(0.499)
    assert gamma_at("linear", 0.999, 10, 10) == 0.0  # clamped
    assert gamma_at("exp", 0.999, 0, 10) == pytest.approx(0.999)
    assert gamma_at("exp", 0.999, 10, 10) == pytest.approx(0.999 / math.e)
    vals = [gamma_at("exp", 0.999, t, 20) for t in range(21)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError):
        gamma_at("linear", 0.999, 0, None)
    with pytest.raises(ValueError):
        ZOConfig(gamma_schedule="cosine")
    cfg = ZOConfig.from_config(
        {
            "learning_rate": 2e-4,
            "eps": 1e-3,
            "gamma_start": 0.999,
            "gamma_schedule": "exp",
            "n_perturbations": 2,
            "two_sided": False,
            "weight_decay": 0.1,
        },
        seed=4,
    )
    assert (cfg.lr, cfg.seed, cfg.gamma_schedule, cfg.n_perturbations, cfg.two_sided) == (2e-4, 4, "exp", 2, False)


def test_state_save_restore_resumes_seed_gamma_and_accumulation(tmp_path):
    names, params, mu, v = make()
    cfg = ZOConfig(seed=11, gamma_schedule="linear")
    eng = ZOEngine(list(zip(names, params)), mu, v, cfg, total_steps=10)
    opt = ZOOptimizer(eng, lr=1e-3)
    for _ in range(3):
        eng.estimate(lambda: float(params[0].sum()))
        opt.step()
    eng.estimate(lambda: float(params[1].sum()))  # pending micro-batch
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    names2, params2, _, _ = make()
    for p, q in zip(params2, params):
        p.copy_(q)
    eng2 = ZOEngine(list(zip(names2, params2)), mu, v, cfg, total_steps=10)
    opt2 = ZOOptimizer(eng2, lr=1e-3)
    opt2.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert (eng2.state.step, eng2.config.seed, eng2.gamma, eng2.state.n_micro) == (3, 11, eng.gamma, 1)
    opt.step()
    opt2.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)
    bad = ZOEngine(list(zip(names2, params2)), mu, v, ZOConfig(seed=12), total_steps=10)
    with pytest.raises(ValueError):
        bad.load_state_dict(eng.state_dict())


def test_load_direction_inputs(tmp_path):
    from workflow.zo.trainer import load_direction_inputs

    pre = "base_model.model.model."

    def save(folder, tensors):
        (tmp_path / folder).mkdir()
        save_file(
            {pre + k: t.contiguous() for k, t in tensors.items()}, str(tmp_path / folder / "adapter_model.safetensors")
        )

    a = {"layers.0.q.lora_A.weight": torch.ones(2, 3), "layers.0.q.lora_B.weight": torch.ones(3, 2)}
    save("p1", {k: 3 * t for k, t in a.items()})
    save("p0", a)
    save("r1", {"layers.0.q.lora_A.weight": torch.full((2, 3), 5.0), "score.weight": torch.ones(1, 4)})
    save("r0", {"layers.0.q.lora_A.weight": torch.ones(2, 3), "score.weight": torch.zeros(1, 4)})
    mu, v = load_direction_inputs(tmp_path / "p1", tmp_path / "p0", tmp_path / "r1", tmp_path / "r0")
    assert set(mu) == set(a) and torch.equal(mu["layers.0.q.lora_A.weight"], 2 * torch.ones(2, 3))
    assert set(v) == {"layers.0.q.lora_A.weight"} and torch.equal(v["layers.0.q.lora_A.weight"], 4 * torch.ones(2, 3))


# --- one real trainer step ------------------------------------------------------------------
def _tiny_policy(tiny_base, dropout=0.1):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    torch.manual_seed(0)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            lora_dropout=dropout,
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        ),
    )
    return model, tok


def _trainer(tiny_base, tmp_path, max_steps=2, dropout=0.1, two_sided=True, **args_kw):
    from datasets import Dataset
    from trl import RLOOConfig

    from workflow.zo.trainer import ZOPrOTrainer

    model, tok = _tiny_policy(tiny_base, dropout)
    prompts = [[{"role": "user", "content": f"say {w}"}] for w in ["yes", "no", "maybe", "hello"] * 4]
    ds = Dataset.from_dict({"prompt": prompts})

    def reward(completions, **kw):
        return [float(len(c[0]["content"]) if isinstance(c, list) else len(c)) / 10 for c in completions]

    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    from workflow.models.snapshots import normalise_key

    mu = {normalise_key(n): 0.01 * torch.randn_like(p) for n, p in named.items()}
    v = {k: torch.randn_like(t) for k, t in list(mu.items())[::2]}
    args = RLOOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=max_steps,
        learning_rate=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        beta=0.05,
        seed=0,
        lr_scheduler_type="constant",
        **args_kw,
    )
    cfg = ZOConfig(lr=1e-2, eps=1e-2, gamma_start=0.999, gamma_schedule="linear", seed=5, two_sided=two_sided)
    trainer = ZOPrOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok, mu=mu, v=v, zo_config=cfg
    )
    return trainer, model


@pytest.mark.slow
def test_trainer_step_changes_params_without_autograd(tiny_base, tmp_path):
    trainer, model = _trainer(tiny_base, tmp_path, max_steps=2, gradient_accumulation_steps=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    moved = [n for n, p in after.items() if p.requires_grad and not torch.equal(p, before[n])]
    frozen_moved = [n for n, p in after.items() if not p.requires_grad and not torch.equal(p, before[n])]
    assert moved and not frozen_moved
    assert all(p.grad is None for p in model.parameters())
    assert isinstance(
        trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, ZOOptimizer
    )
    assert trainer.zo.state.step == 2 and trainer.zo.state.total_steps == 2
    logged = [r for r in trainer.state.log_history if "zo/g" in r]
    assert logged and all(math.isfinite(r["zo/g"]) for r in logged)
    assert logged[0]["zo/gamma"] == pytest.approx(0.999)
    assert trainer.optimizer.state_dict()["zo"]["step"] == 2


@pytest.mark.slow
def test_trainer_checkpoint_carries_zo_state(tiny_base, tmp_path):
    trainer, _ = _trainer(tiny_base, tmp_path, max_steps=2)
    trainer.args.save_strategy = "steps"
    trainer.args.save_steps = 1
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-1"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state["zo"]["step"] == 1 and state["zo"]["config"]["seed"] == 5
    resumed, model2 = _trainer(tiny_base, tmp_path, max_steps=2)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.zo.state.step == 2
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_known_base_is_the_loss_at_the_rollout_policy(tiny_base, tmp_path, dropout):
    """On the first update after a generation the one-sided base is -mean(advantages), equal to the
    loss a forward pass gives; on buffered rollouts after an update, or with dropout, none is used."""
    trainer, _ = _trainer(
        tiny_base,
        tmp_path,
        max_steps=2,
        dropout=dropout,
        two_sided=False,
        gradient_accumulation_steps=2,
        num_iterations=2,
    )
    seen = []
    known_base = trainer._known_base

    def spy(inputs):
        base = known_base(inputs)
        with torch.no_grad(), trainer.compute_loss_context_manager():
            seen.append((base, float(trainer._compute_loss(trainer.model, inputs))))
        return base

    trainer._known_base = spy
    trainer.train()
    assert len(seen) == 4  # 2 updates x 2 micro-batches; one generation every 2 updates
    if dropout:
        assert all(base is None for base, _ in seen)
    else:
        assert [base is None for base, _ in seen] == [False, False, True, True]
        for base, loss in seen[:2]:
            assert float(base) == pytest.approx(loss, abs=1e-6)


@pytest.mark.slow
def test_probe_loss_is_rloo_loss_without_its_metrics(tiny_base, tmp_path):
    """The loss every ZO probe evaluates equals RLOO's (bit for bit), logs nothing and reads
    nothing back from the device beyond what the model's own forward does."""
    trainer, model = _trainer(tiny_base, tmp_path, max_steps=1, dropout=0.0)
    batches = []
    known_base = trainer._known_base
    trainer._known_base = lambda inputs: batches.append(inputs) or known_base(inputs)
    trainer.train()
    inputs = batches[0]
    logged = {k: list(v) for k, v in trainer._metrics["train"].items()}
    with torch.no_grad(), trainer.compute_loss_context_manager():
        probe = trainer._probe_loss(model, inputs)
        assert {k: list(v) for k, v in trainer._metrics["train"].items()} == logged
        assert torch.equal(probe, trainer._compute_loss(model, inputs))
        forward_reads = host_reads(lambda: model(input_ids=inputs["prompt_ids"], attention_mask=inputs["prompt_mask"]))
        assert host_reads(lambda: trainer._probe_loss(model, inputs)) <= forward_reads
        assert host_reads(lambda: trainer._compute_loss(model, inputs)) >= forward_reads + 6


# tensor methods that hand values to the host (on a GPU each waits for the device) and that the
# profiler does not show as aten::_local_scalar_dense
READ_METHODS = ("tolist", "cpu", "numpy")


def host_reads(fn) -> int:
    """Reads of tensor values by the host while ``fn`` runs, each a synchronisation on a GPU:
    ``.item()``, ``float(t)``, ``bool(t)`` (``aten::_local_scalar_dense``), ``.tolist()``,
    ``.cpu()`` and ``.numpy()``."""
    from torch.profiler import ProfilerActivity, profile

    calls = []
    originals = {name: getattr(torch.Tensor, name) for name in READ_METHODS}

    def counted(name, original):
        def read(self, *args, **kwargs):
            calls.append(name)
            return original(self, *args, **kwargs)

        return read

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return len(calls) + sum(e.name == "aten::_local_scalar_dense" for e in prof.events())


@pytest.mark.parametrize("two_sided", [True, False])
def test_estimate_reads_nothing_back_from_the_device(two_sided):
    """Losses and g stay tensors through an estimate (the update's one read is apply's .tolist())."""
    names, params, mu, v = make()
    eng = ZOEngine(list(zip(names, params)), mu, v, ZOConfig(two_sided=two_sided, n_perturbations=3), total_steps=10)
    eng.directions()  # drawn once per update (host-side seeds)

    def loss():
        return sum((p * p).sum() for p in params)

    assert host_reads(lambda: eng.estimate(loss, base=loss())) == 0
    assert host_reads(eng.apply) == 1 and eng.state.step == 1
