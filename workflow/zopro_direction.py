"""ZOPrO pure math: search directions, in-place perturbations and the SPSA update (no trl here).

Notation (docs/design.md, reference notes section 3). For every trainable tensor ``k`` (LoRA
matrices, in the fixed order of ``model.named_parameters()``):

* ``mu_k``: the previous policy update (policy_{i-1} - policy_{i-2}; minus the SFT adapter for i = 1);
* ``v_k``: the reward-model update (reward_i - reward_{i-1}), ``v_hat_k = v_k / |v_k|``;
* per update step and per direction ``j`` (q-SPSA), fresh Gaussian noise ``n_k`` regenerated from
  ``(seed + step, j, k)``, projected **per tensor** off ``v_hat_k``:
  ``n_perp_k = n_k - (v_hat_k . n_k) v_hat_k``, rescaled so that ``|n_perp_k| = |mu_k|``;
* ``z_k = gamma * mu_k + sqrt(1 - gamma^2) * n_perp_k``.

Because the projection is per tensor, ``z - gamma*mu`` is also orthogonal to the whole ``v``.

Decisions for missing data (documented contract):

* a tensor without ``v`` (key absent from the reward update, or ``|v_k| = 0``): no projection, the
  noise is used as is (``n_perp_k = n_k``), then rescaled like the others;
* a tensor without ``mu`` (key absent, or ``|mu_k| = 0``): the formula is kept (``gamma * 0`` plus the
  noise term) but ``n_perp_k`` is rescaled to the *RMS-matched* norm ``rms(mu) * sqrt(numel_k)``,
  where ``rms(mu)`` is the root mean square of all non-zero ``mu`` entries; when ``mu`` is zero
  everywhere the noise keeps its own norm (plain MeZO with ``z ~ N(0, I)`` projected off ``v``).
  A zero ``mu_k`` therefore never freezes a tensor, and never gives it a much larger step than
  its neighbours.

Noise is generated tensor by tensor with a ``torch.Generator`` on the parameter's device, seeded
from ``(seed + step, j, k)`` through ``numpy.random.SeedSequence``; no copy of the parameters is
ever made (MeZO style). Only ``mu`` and ``v_hat`` (one float32 copy each of the trainable tensors)
are held.

Restoring parameters after the pair ``+eps z, -2 eps z, +eps z`` is exact up to float rounding,
not bit-exact: ``fl(fl(fl(p + a) - 2a) + a)`` may differ from ``p`` by about one ulp of
``max(|p|, |a|)`` per element (``a = eps z``). Bit-exactness would need a copy of the parameters,
which is exactly what ZOPrO avoids; the deviation is tested in tests/test_zopro.py.

Gamma schedules, with ``t`` the 0-based update index and ``T`` the total number of updates:

* ``linear``: ``max(0, gamma_start - t / T)`` (the reference: ``gamma -= 1/T`` per update);
* ``exp``: ``gamma_start * exp(-t / T)``. The reference writes ``gamma_0 * exp(-t)``; with ``t`` in
  raw steps the momentum term would vanish after ~5 updates whatever the stage length, so ``t`` is
  normalised by ``T`` (progress in [0, 1], like ``linear``): gamma ends at ``gamma_start / e``;
* ``constant``: ``gamma_start``.

A skipped update (non-finite ``g``) still counts as an update for the seed and the schedule, so
the seed of update ``t`` is always ``seed + t``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

GAMMA_SCHEDULES = ("linear", "exp", "constant")
# Parameters never weight-decayed (name-based): biases and normalisation layers.
NO_DECAY = re.compile(r"(^|[._])(bias|[a-z_]*norm[a-z_0-9]*|ln_?[a-z0-9_]*)([._]|$)", re.IGNORECASE)


@dataclasses.dataclass
class ZOConfig:
    """Hyper-parameters of the zeroth-order optimiser (config.yaml ``zopro:``)."""

    lr: float = 1e-4
    eps: float = 1e-3
    gamma_start: float = 1 - 1e-3
    gamma_schedule: str = "linear"
    n_perturbations: int = 1
    two_sided: bool = True
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"gamma_schedule must be one of {GAMMA_SCHEDULES}, got {self.gamma_schedule!r}")
        if not 0.0 <= self.gamma_start <= 1.0:
            raise ValueError("gamma_start must be in [0, 1]")
        if self.eps <= 0 or self.n_perturbations < 1:
            raise ValueError("eps must be > 0 and n_perturbations >= 1")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], seed: int | None = None) -> ZOConfig:
        """From the whole config (or its ``zopro:`` section); ``seed`` defaults to config ``seed``."""
        section = dict(config.get("zopro", config))
        if seed is None:
            seed = int(config.get("seed", 0))
        return cls(
            lr=float(section.get("learning_rate", section.get("lr", cls.lr))),
            eps=float(section.get("eps", cls.eps)),
            gamma_start=float(section.get("gamma_start", cls.gamma_start)),
            gamma_schedule=str(section.get("gamma_schedule", cls.gamma_schedule)),
            n_perturbations=int(section.get("n_perturbations", cls.n_perturbations)),
            two_sided=bool(section.get("two_sided", cls.two_sided)),
            weight_decay=float(section.get("weight_decay", cls.weight_decay)),
            seed=int(seed),
        )


def gamma_at(schedule: str, gamma_start: float, step: int, total_steps: int | None) -> float:
    """Gamma of update ``step`` (0-based) out of ``total_steps`` (see module docstring)."""
    if schedule == "constant":
        return float(gamma_start)
    if not total_steps or total_steps <= 0:
        raise ValueError(f"gamma schedule {schedule!r} needs the total number of updates")
    progress = step / total_steps
    if schedule == "linear":
        return float(min(1.0, max(0.0, gamma_start - progress)))
    if schedule == "exp":
        return float(gamma_start * math.exp(-progress))
    raise ValueError(f"unknown gamma schedule {schedule!r}")


def tensor_seed(seed: int, step: int, direction: int, index: int) -> int:
    """63-bit generator seed of tensor ``index``, direction ``direction`` of update ``step``."""
    words = np.random.SeedSequence([int(seed + step) & 0xFFFFFFFFFFFFFFFF, int(direction), int(index)])
    lo, hi = (int(w) for w in words.generate_state(2, np.uint32))
    return ((hi << 32) | lo) & 0x7FFFFFFFFFFFFFFF


def decays(name: str) -> bool:
    """Whether weight decay applies to parameter ``name`` (not to biases and norms)."""
    return NO_DECAY.search(name) is None


class Direction:
    """Per-tensor ingredients of ``z``: ``mu``, ``v_hat`` and the norm the noise is rescaled to.

    ``names``/``params`` fix the tensor order; ``mu`` and ``v`` are dicts keyed like ``names``
    (normalised LoRA keys). Keys of ``mu``/``v`` that are not parameters are ignored.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor],
                 mu: Mapping[str, torch.Tensor] | None, v: Mapping[str, torch.Tensor] | None):
        if len(names) != len(params):
            raise ValueError("names and params differ in length")
        mu = mu or {}
        v = v or {}
        self.names = list(names)
        self.mu: list[torch.Tensor | None] = []
        self.v_hat: list[torch.Tensor | None] = []
        mu_norms: list[float] = []
        mu_sq, mu_numel = 0.0, 0
        for name, p in zip(names, params):
            m = self._take(mu, name, p)
            norm = float(m.norm()) if m is not None else 0.0
            if norm > 0:
                mu_sq += norm * norm
                mu_numel += p.numel()
            self.mu.append(m if norm > 0 else None)
            mu_norms.append(norm)
            w = self._take(v, name, p)
            wn = float(w.norm()) if w is not None else 0.0
            self.v_hat.append(w.div_(wn) if wn > 0 else None)
        rms = math.sqrt(mu_sq / mu_numel) if mu_numel else None
        self.mu_rms = rms
        # None = keep the noise's own norm (no mu information anywhere)
        self.target_norm: list[float | None] = [
            n if n > 0 else (rms * math.sqrt(p.numel()) if rms is not None else None)
            for n, p in zip(mu_norms, params)
        ]
        self.shared_v = sum(x is not None for x in self.v_hat)
        self.shared_mu = sum(x is not None for x in self.mu)

    @staticmethod
    def _take(d: Mapping[str, torch.Tensor], name: str, p: torch.Tensor) -> torch.Tensor | None:
        t = d.get(name)
        if t is None:
            return None
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match parameter {tuple(p.shape)}")
        return t.detach().to(device=p.device, dtype=torch.float32).clone()

    def noise(self, k: int, p: torch.Tensor, seed: int, step: int, j: int) -> torch.Tensor:
        """The raw Gaussian noise ``n_k`` (float32, on ``p``'s device), regenerated from its seed."""
        gen = torch.Generator(device=p.device)
        gen.manual_seed(tensor_seed(seed, step, j, k))
        return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)

    def z(self, k: int, p: torch.Tensor, seed: int, step: int, j: int, gamma: float) -> torch.Tensor:
        """``z_k`` of direction ``j`` of update ``step`` (float32, a fresh temporary of ``p``'s size)."""
        n = self.noise(k, p, seed, step, j)
        vh = self.v_hat[k]
        if vh is not None:
            n.sub_(vh, alpha=float(torch.dot(vh.reshape(-1), n.reshape(-1))))
        target = self.target_norm[k]
        if target is not None:
            nn_ = float(n.norm())
            n.mul_(target / nn_ if nn_ > 0 else 0.0)
        n.mul_(math.sqrt(max(0.0, 1.0 - gamma * gamma)))
        m = self.mu[k]
        if m is not None and gamma != 0.0:
            n.add_(m, alpha=gamma)
        return n

    def iter_z(self, params: Sequence[torch.Tensor], seed: int, step: int, j: int,
               gamma: float) -> Iterator[tuple[int, torch.Tensor]]:
        for k, p in enumerate(params):
            yield k, self.z(k, p, seed, step, j, gamma)


@torch.no_grad()
def perturb(params: Sequence[torch.Tensor], scale: float, direction: Direction, seed: int, step: int,
            j: int, gamma: float) -> None:
    """``params += scale * z`` in place, tensor by tensor, regenerating ``z`` from its seed."""
    for k, z in direction.iter_z(params, seed, step, j, gamma):
        p = params[k]
        p.add_(z.to(p.dtype), alpha=scale)


@dataclasses.dataclass
class ZOState:
    """What a checkpoint must hold to resume a stage mid-way (plain data)."""

    step: int = 0              # updates done (applied or skipped)
    skipped: int = 0           # updates skipped because g was not finite
    total_steps: int | None = None
    g_sum: list[float] = dataclasses.field(default_factory=list)  # pending accumulation
    n_micro: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ZOState:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class ZOEngine:
    """Zeroth-order SPSA optimiser over ``params`` with the ZOPrO direction.

    Use: per micro-batch ``estimate(loss_fn)`` (perturbs, evaluates, restores, accumulates the
    projected gradients ``g_j``); once per update ``apply()`` (averages over micro-batches and,
    under ``torch.distributed``, across processes with one all-reduce of ``n_perturbations``
    scalars; skips non-finite ``g``; ``theta <- theta - lr * (mean_j g_j z_j + wd * theta)``;
    advances the step, hence the seed). No optimizer state, no autograd graph.
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.Tensor]], mu: Mapping[str, torch.Tensor] | None,
                 v: Mapping[str, torch.Tensor] | None, config: ZOConfig, total_steps: int | None = None,
                 common_random_numbers: bool = True):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        if len(set(self.names)) != len(self.names):
            raise ValueError("duplicate parameter names after normalisation")
        self.config = config
        self.direction = Direction(self.names, self.params, mu, v)
        self.decay = [decays(n) for n in self.names]
        self.state = ZOState(total_steps=total_steps)
        self.common_random_numbers = common_random_numbers
        self._g_sum = torch.zeros(config.n_perturbations, dtype=torch.float64)

    # --- schedule -------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self.config.seed + self.state.step

    @property
    def gamma(self) -> float:
        return gamma_at(self.config.gamma_schedule, self.config.gamma_start, self.state.step, self.state.total_steps)

    def perturb(self, scale: float, j: int = 0) -> None:
        perturb(self.params, scale, self.direction, self.config.seed, self.state.step, j, self.gamma)

    def z(self, j: int = 0) -> list[torch.Tensor]:
        """The current direction ``j`` as a list of tensors (tests and diagnostics only: a copy)."""
        return [z for _, z in self.direction.iter_z(self.params, self.config.seed, self.state.step, j, self.gamma)]

    # --- estimation -----------------------------------------------------------------------
    def _rng_snapshot(self) -> Callable[[], None]:
        if not self.common_random_numbers:
            return lambda: None
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

        def restore() -> None:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        return restore

    @torch.no_grad()
    def estimate(self, loss_fn: Callable[[], Any]) -> tuple[torch.Tensor, float]:
        """Projected gradients ``g_j`` of one micro-batch (accumulated until ``apply``) and the loss.

        ``loss_fn()`` evaluates the micro-batch loss at the current parameters. Every evaluation
        starts from the same RNG state (common random numbers: same dropout masks at both points).
        Parameters are restored (up to float rounding) before returning.
        """
        eps = self.config.eps
        restore_rng = self._rng_snapshot()

        def evaluate() -> float:
            restore_rng()
            out = loss_fn()
            return float(out.detach().double().item()) if torch.is_tensor(out) else float(out)

        q = self.config.n_perturbations
        g = torch.empty(q, dtype=torch.float64)
        losses = []
        base = None if self.config.two_sided else evaluate()
        for j in range(q):
            self.perturb(+eps, j)
            lp = evaluate()
            if self.config.two_sided:
                self.perturb(-2 * eps, j)
                lm = evaluate()
                self.perturb(+eps, j)
                g[j] = (lp - lm) / (2 * eps)
                losses.append(0.5 * (lp + lm))
            else:
                self.perturb(-eps, j)
                g[j] = (lp - base) / eps
                losses.append(base)
        self._g_sum += g
        self.state.n_micro += 1
        return g, float(np.mean(losses))

    # --- update ---------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, lr: float | None = None) -> dict[str, float]:
        """Apply the accumulated update; returns metrics (``zo/...``)."""
        lr = self.config.lr if lr is None else float(lr)
        if self.state.n_micro == 0:
            return {}
        g = self._g_sum / self.state.n_micro
        world = _world()
        if world > 1:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
            g_dev = g.to(device)
            torch.distributed.all_reduce(g_dev, op=torch.distributed.ReduceOp.SUM)  # the one all-reduce
            g = g_dev.cpu() / world
        gamma = self.gamma
        metrics = {"zo/gamma": gamma, "zo/seed": float(self.seed), "zo/lr": lr}
        if not bool(torch.isfinite(g).all()):
            self.state.skipped += 1
            metrics["zo/g"] = float("nan")
        else:
            q = len(g)
            wd = self.config.weight_decay
            if wd:
                for p, d in zip(self.params, self.decay):
                    if d:
                        p.mul_(1.0 - lr * wd)
            for j in range(q):
                coef = -lr * float(g[j]) / q
                if coef != 0.0:
                    perturb(self.params, coef, self.direction, self.config.seed, self.state.step, j, gamma)
            metrics["zo/g"] = float(g.mean())
            metrics["zo/g_abs"] = float(g.abs().mean())
        metrics["zo/skipped"] = float(self.state.skipped)
        self.state.step += 1
        self._g_sum.zero_()
        self.state.n_micro = 0
        return metrics

    # --- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.state.g_sum = [float(x) for x in self._g_sum]
        d = self.state.to_dict()
        d["config"] = dataclasses.asdict(self.config)
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        saved = d.get("config") or {}
        if saved and int(saved.get("seed", self.config.seed)) != self.config.seed:
            raise ValueError(f"checkpoint seed {saved.get('seed')} differs from the configured {self.config.seed}")
        state = ZOState.from_dict(d)
        if self.state.total_steps is not None and state.total_steps is None:
            state.total_steps = self.state.total_steps
        self.state = state
        g = state.g_sum or [0.0] * self.config.n_perturbations
        self._g_sum = torch.tensor(g, dtype=torch.float64)


class ZOOptimizer(torch.optim.Optimizer):
    """A stateless ``torch.optim.Optimizer`` facade over :class:`ZOEngine` for the HF Trainer.

    ``step()`` applies the accumulated zeroth-order update with the group's (scheduled) lr;
    ``zero_grad()`` does nothing (there are no gradients); ``state_dict()`` carries the engine's
    state (step, seed, skipped, pending accumulation) under ``"zo"`` so HF checkpoints resume it.
    """

    def __init__(self, engine: ZOEngine, lr: float | None = None,
                 on_step: Callable[[dict[str, float]], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self.last_metrics: dict[str, float] = {}
        super().__init__(engine.params, {"lr": engine.config.lr if lr is None else lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ZOOptimizer.step takes no closure: call engine.estimate per micro-batch")
        self.last_metrics = self.engine.apply(lr=self.param_groups[0]["lr"])
        if self.on_step is not None and self.last_metrics:
            self.on_step(self.last_metrics)

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = self.engine.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.engine.load_state_dict(zo)
