"""ZOPrO's ``guarded`` variant (``zopro.variant: guarded``, the default): momentum apart from exploration.

The reference variant (:mod:`workflow.zopro_direction`) mixes the previous policy update ``mu``
into every probe and scales the noise to ``|mu|``; measured on the embedded task its step is
proportional to ``lr |G| |mu|^2``, so one small step stalls the next (README, "ZOPrO").
This variant separates the two things the paper's direction does:

1. **momentum, bounded by a trust region** (once per stage, before the first rollout batch):
   ``theta <- theta_{i-1} + alpha mu`` with ``mu = theta_{i-1} - theta_{i-2}``; ``alpha`` is the
   largest value of ``MOMENTUM_GRID`` whose sequence-level ``KL(pi_{i-1} || pi_alpha)``, estimated
   on rollouts of ``pi_{i-1}`` for ``momentum_prompts`` prompts, stays within ``momentum_kl``
   nats, and whose KL to the SFT reference, estimated on ``pi_alpha``'s own rollouts, rises by at
   most ``momentum_kl`` too. The second bound is the one that matters: measured, a step whose KL
   from ``pi_{i-1}`` was 0.48 took the KL to SFT from 2.3 to 5.5 (mass moved to answers
   ``pi_{i-1}`` rarely samples) and lost 0.040 gold.
   No gradients; ``alpha`` and both KLs are logged.
2. **exploration with a real probe budget** (every rollout batch): ``updates_per_batch`` updates
   on the batch's PPO-clip loss (rollouts reused: the ratio to the old log-probs keeps that valid),
   each with ``n_perturbations`` unit-variance Gaussian probes ``z_j`` (MeZO style, their size does
   not depend on ``|mu|``) projected off the reward update ``v`` and off ``mu``. One-sided
   differences against the loss at the current point: ``g_j = (L(theta + eps z_j) - L0) / eps``;
   candidate ``theta' = theta - step_size * sqrt(d) * u / |u|`` with ``u = sum_j g_j z_j``: a
   normalised step whose root-mean-square change per trainable element is ``step_size``, so its
   size does not follow the scale of the rewards (an unnormalised MeZO step ``lr * u`` grows with
   ``|g|``, which grows with the reward spread).
3. **a guard**: the candidate is kept only if the batch loss falls (``L(theta') < L0``, one more
   forward pass); otherwise the parameters are restored exactly (a copy of the trainable tensors
   is kept: LoRA weights are small) and the step counts as rejected (``zo/rejected``).

Noise is drawn for a whole update at once (``[q, d]`` on the parameters' device) from a generator
seeded by ``(seed, update)`` (:func:`workflow.zopro_direction.tensor_seed`), so a run is replayable.
In data-parallel runs every process draws the same probes; the ``q`` projected gradients and the
guard's loss change are averaged across processes (one all-reduce each), so every process takes
the same decision. A non-finite ``g`` skips the update (``zo/skipped``).

Precision: finite differences need the perturbation to survive the forward pass. On a bf16 base
the probes are invisible (bf16 keeps 8 significant bits), so the stage computes in fp32 while the
base keeps its bf16 storage (:func:`workflow.models.fp32_compute`; rounding the frozen weights is a
fixed change of model, rounding activations in each pass is noise). tests/test_zopro_guarded.py
checks the finite difference against the autograd directional derivative on a bf16 base.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from workflow.zopro_direction import tensor_seed

MOMENTUM_GRID = tuple(k / 8 for k in range(1, 9))  # multiples of mu tried, smallest first


@dataclasses.dataclass
class GuardedConfig:
    """Hyper-parameters of the guarded variant (config.yaml ``zopro:``, help there)."""

    step_size: float
    eps: float
    n_perturbations: int
    updates_per_batch: int
    momentum_kl: float
    momentum_prompts: int
    seed: int = 0

    @property
    def lr(self) -> float:
        """The step size, under the name the Trainer logs (``learning_rate``)."""
        return self.step_size

    def __post_init__(self) -> None:
        if self.eps <= 0 or self.n_perturbations < 1 or self.updates_per_batch < 1:
            raise ValueError("zopro: eps must be > 0, n_perturbations and updates_per_batch >= 1")
        if self.momentum_kl < 0:
            raise ValueError("zopro.momentum_kl must be >= 0 (0 = no momentum step)")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], seed: int | None = None) -> GuardedConfig:
        """From the whole config; ``seed`` defaults to config ``seed``."""
        section = config["zopro"]
        return cls(step_size=float(section["step_size"]), eps=float(section["eps"]),
                   n_perturbations=int(section["n_perturbations"]),
                   updates_per_batch=int(section["updates_per_batch"]),
                   momentum_kl=float(section["momentum_kl"]), momentum_prompts=int(section["momentum_prompts"]),
                   seed=int(config.get("seed", 0) if seed is None else seed))


@dataclasses.dataclass
class GuardedState:
    """What a checkpoint holds to resume a stage mid-way (plain data)."""

    step: int = 0            # updates drawn (kept, rejected or skipped): the seed of the next one
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    momentum_alpha: float | None = None   # None: the momentum step has not been taken yet
    momentum_kl: float | None = None


def _mean_across_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over data-parallel processes (one all-reduce; identity when alone)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    out = values.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device) / dist.get_world_size()


def _mean_scalar(value: float) -> float:
    """A scalar averaged over data-parallel processes (each estimated it on its own rollouts)."""
    return float(_mean_across_processes(torch.tensor([float(value)], dtype=torch.float64))[0])


def _as_float(loss: Any) -> float:
    return float(loss.detach().double().item()) if torch.is_tensor(loss) else float(loss)


class GuardedEngine:
    """The guarded zeroth-order optimiser over the trainable tensors ``named_params``.

    ``mu``/``v``: the previous policy update and the reward update, dicts keyed like the names
    (missing keys count as zero). ``momentum(kl_of)`` takes the bounded momentum step once;
    ``update(loss_fn)`` takes the ``updates_per_batch`` guarded updates of one rollout batch.
    """

    def __init__(self, named_params: Sequence[tuple[str, torch.Tensor]], mu: Mapping[str, torch.Tensor] | None,
                 v: Mapping[str, torch.Tensor] | None, config: GuardedConfig):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.config = config
        self.state = GuardedState()
        self.last_loss = float("nan")  # batch loss after the last update() (logged as the training loss)
        self._sizes = [p.numel() for p in self.params]
        self._device = self.params[0].device
        self.mu = self._flat(mu or {})
        self._basis = self._orthonormal([self._flat(v or {}), self.mu])

    # --- flat views of the trainable tensors ----------------------------------------------
    def _flat(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for name, p in zip(self.names, self.params):
            t = tensors.get(name)
            if t is not None and tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match parameter {tuple(p.shape)}")
            parts.append(torch.zeros(p.numel()) if t is None else t.detach().reshape(-1).float().cpu())
        return torch.cat(parts).to(self._device)

    @staticmethod
    def _orthonormal(vectors: list[torch.Tensor]) -> torch.Tensor:
        """Gram-Schmidt basis (rows) of the non-zero ``vectors``."""
        basis: list[torch.Tensor] = []
        for x in vectors:
            x = x.clone()
            for b in basis:
                x -= torch.dot(b, x) * b
            norm = float(x.norm())
            if norm > 1e-12:
                basis.append(x / norm)
        return torch.stack(basis) if basis else vectors[0].new_zeros(0, vectors[0].numel())

    def flat_params(self) -> torch.Tensor:
        """A float32 copy of the trainable tensors, concatenated."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def add_(self, flat: torch.Tensor, alpha: float = 1.0) -> None:
        """``params += alpha * flat`` (``flat`` in the order of :meth:`flat_params`)."""
        for p, t in zip(self.params, flat.split(self._sizes)):
            p.add_(t.view(p.shape).to(p.dtype), alpha=alpha)

    @torch.no_grad()
    def set_(self, flat: torch.Tensor) -> None:
        """``params = flat`` (restores a copy taken with :meth:`flat_params`)."""
        for p, t in zip(self.params, flat.split(self._sizes)):
            p.copy_(t.view(p.shape))

    def probes(self, step: int) -> torch.Tensor:
        """The ``[q, d]`` unit-variance probes of update ``step``, orthogonal to ``v`` and ``mu``."""
        gen = torch.Generator(device=self._device)
        gen.manual_seed(tensor_seed(self.config.seed, step, 0, 0))
        z = torch.randn(self.config.n_perturbations, sum(self._sizes), generator=gen, device=self._device)
        if len(self._basis):
            z -= (z @ self._basis.T) @ self._basis
        return z

    # --- 1. momentum ----------------------------------------------------------------------
    @torch.no_grad()
    def momentum(self, kl_of: Callable[[], float],
                 reference_kl_of: Callable[[], float] | None = None) -> dict[str, float]:
        """Move along ``mu`` by the largest grid multiple within both budgets; returns the metrics.

        ``kl_of()``: KL from the starting policy, evaluated at the current parameters, at most
        ``momentum_kl``. ``reference_kl_of()``: KL of the current policy to the frozen reference
        (SFT) on its own rollouts; it may rise by at most ``momentum_kl`` over its value at the
        start. NaN ends the search (a NaN reference KL at the start: no reference, no such bound).
        """
        alpha, kl, reference_kl = 0.0, 0.0, float("nan")
        budget = self.config.momentum_kl
        if budget > 0 and float(self.mu.norm()) > 0:
            start = self.flat_params()
            reference_start = _mean_scalar(reference_kl_of()) if reference_kl_of is not None else float("nan")
            reference_kl = reference_start
            for candidate in MOMENTUM_GRID:
                self.set_(start)
                self.add_(self.mu, candidate)
                value = _mean_scalar(kl_of())
                if not value <= budget:
                    break
                if math.isfinite(reference_start):
                    to_reference = _mean_scalar(reference_kl_of())
                    if not to_reference - reference_start <= budget:
                        break
                    reference_kl = to_reference
                alpha, kl = candidate, value
            self.set_(start)
            self.add_(self.mu, alpha)
        self.state.momentum_alpha, self.state.momentum_kl = alpha, kl
        return {"zo/momentum_alpha": alpha, "zo/momentum_kl": kl, "zo/momentum_reference_kl": reference_kl}

    # --- 2./3. guarded exploration --------------------------------------------------------
    @torch.no_grad()
    def update(self, loss_fn: Callable[[], Any]) -> dict[str, float]:
        """The guarded updates of one rollout batch (``loss_fn()``: the batch loss at the current
        parameters); returns the metrics of the batch."""
        cfg = self.config
        q, eps = cfg.n_perturbations, cfg.eps
        base = _as_float(loss_fn())
        start_loss, kept, g_abs = base, 0, []
        for _ in range(cfg.updates_per_batch):
            z = self.probes(self.state.step)
            self.state.step += 1
            saved = self.flat_params()
            g = torch.empty(q, dtype=torch.float64)
            for j in range(q):
                self.add_(z[j], eps)
                g[j] = (_as_float(loss_fn()) - base) / eps
                self.set_(saved)
            g = _mean_across_processes(g)
            if not bool(torch.isfinite(g).all()):
                self.state.skipped += 1
                continue
            g_abs.append(float(g.abs().mean()))
            step = g.to(device=z.device, dtype=z.dtype) @ z
            norm = float(step.norm())
            if norm > 0:
                self.add_(step, -cfg.step_size * math.sqrt(step.numel()) / norm)
            new = _as_float(loss_fn())
            change = float(_mean_across_processes(torch.tensor([new - base], dtype=torch.float64))[0])
            if math.isfinite(change) and change < 0:
                base, kept = new, kept + 1
                self.state.accepted += 1
            else:
                self.set_(saved)
                self.state.rejected += 1
        self.last_loss = base
        return {"zo/accepted_fraction": kept / cfg.updates_per_batch, "zo/rejected": float(self.state.rejected),
                "zo/skipped": float(self.state.skipped), "zo/loss_change": base - start_loss,
                "zo/g_abs": sum(g_abs) / len(g_abs) if g_abs else float("nan")}

    # --- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.state), "config": dataclasses.asdict(self.config)}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        saved = d.get("config") or {}
        if saved and int(saved.get("seed", self.config.seed)) != self.config.seed:
            raise ValueError(f"checkpoint seed {saved.get('seed')} differs from the configured {self.config.seed}")
        fields = {f.name for f in dataclasses.fields(GuardedState)}
        self.state = GuardedState(**{k: v for k, v in d.items() if k in fields})

    def apply(self, lr: float | None = None) -> dict[str, float]:
        """Nothing to apply: :meth:`update` steps inside the training step (the optimizer facade's hook)."""
        return {}
