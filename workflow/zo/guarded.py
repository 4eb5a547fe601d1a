"""ZOPrO's ``guarded`` variant (``zopro.variant: guarded``, the default): momentum apart from exploration.

The reference variant (:mod:`workflow.zo.direction`) mixes the previous policy update ``mu``
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
seeded by ``(seed, update)`` (:func:`workflow.zo.direction.tensor_seed`), so a run is replayable.
In data-parallel runs every process draws the same probes; the ``q`` projected gradients and the
guard's loss change are averaged across processes (one all-reduce each), so every process takes
the same decision. A non-finite ``g`` skips the update (``zo/skipped``).

Precision: finite differences need the perturbation to survive the forward pass. On a bf16 base
the probes are invisible (bf16 keeps 8 significant bits), so the stage computes in fp32 while the
base keeps its bf16 storage (:func:`workflow.models.loading.fp32_compute`; rounding the frozen weights is a
fixed change of model, rounding activations in each pass is noise). tests/test_zopro_guarded.py
checks the finite difference against the autograd directional derivative on a bf16 base.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from workflow.schema import default, section, setting
from workflow.zo.direction import FlatParams, loss_tensor, mean_across_processes, tensor_seed

MOMENTUM_GRID = tuple(k / 8 for k in range(1, 9))  # multiples of mu tried, smallest first


@dataclasses.dataclass
class GuardedConfig:
    """Hyper-parameters of the guarded variant (config ``zopro``; its descriptions are the schema's)."""

    step_size: float
    eps: float
    n_perturbations: int
    updates_per_batch: int
    momentum_kl: float
    momentum_prompts: int
    known_base: bool = default("zopro.known_base")
    seed: int = default("seed")

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
        """From the whole config (keys it lacks at the schema's defaults); ``seed`` defaults to config ``seed``."""
        zo = section(config, "zopro")
        fields = {f.name for f in dataclasses.fields(cls)} - {"seed"}
        return cls(**{name: zo[name] for name in fields}, seed=int(setting(config, "seed") if seed is None else seed))


@dataclasses.dataclass
class GuardedState:
    """What a checkpoint holds to resume a stage mid-way (plain data)."""

    step: int = 0  # updates drawn (kept, rejected or skipped): the seed of the next one
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    momentum_alpha: float | None = None  # None: the momentum step has not been taken yet
    momentum_kl: float | None = None


def _mean_scalar(value: float) -> float:
    """A scalar averaged over data-parallel processes (each estimated it on its own rollouts)."""
    return float(mean_across_processes(torch.tensor([float(value)], dtype=torch.float64))[0])


class GuardedEngine:
    """The guarded zeroth-order optimiser over the trainable tensors ``named_params``.

    ``mu``/``v``: the previous policy update and the reward update, dicts keyed like the names
    (missing keys count as zero). ``momentum(kl_of)`` takes the bounded momentum step once;
    ``update(loss_fn)`` takes the ``updates_per_batch`` guarded updates of one rollout batch.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.Tensor]],
        mu: Mapping[str, torch.Tensor] | None,
        v: Mapping[str, torch.Tensor] | None,
        config: GuardedConfig,
    ):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.flat = FlatParams(self.names, self.params)
        self.config = config
        self.state = GuardedState()
        self.last_loss = float("nan")  # batch loss after the last update() (logged as the training loss)
        self.mu = self.flat.flat(mu or {})
        self._basis = self._orthonormal([self.flat.flat(v or {}), self.mu])

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

    def probes(self, step: int) -> torch.Tensor:
        """The ``[q, d]`` unit-variance probes of update ``step``, orthogonal to ``v`` and ``mu``."""
        gen = torch.Generator(device=self.flat.device)
        gen.manual_seed(tensor_seed(self.config.seed, step, 0, 0))
        z = torch.randn(self.config.n_perturbations, sum(self.flat.sizes), generator=gen, device=self.flat.device)
        if len(self._basis):
            z -= (z @ self._basis.T) @ self._basis
        return z

    # --- 1. momentum ----------------------------------------------------------------------
    @torch.no_grad()
    def momentum(
        self, kl_of: Callable[[], float], reference_kl_of: Callable[[], float] | None = None
    ) -> dict[str, float]:
        """Move along ``mu`` by the largest grid multiple within both budgets; returns the metrics.

        ``kl_of()``: KL from the starting policy, evaluated at the current parameters, at most
        ``momentum_kl``. ``reference_kl_of()``: KL of the current policy to the frozen reference
        (SFT) on its own rollouts; it may rise by at most ``momentum_kl`` over its value at the
        start. NaN ends the search (a NaN reference KL at the start: no reference, no such bound).
        """
        alpha, kl, reference_kl = 0.0, 0.0, float("nan")
        budget = self.config.momentum_kl
        if budget > 0 and float(self.mu.norm()) > 0:
            start = self.flat.copy()
            reference_start = _mean_scalar(reference_kl_of()) if reference_kl_of is not None else float("nan")
            reference_kl = reference_start
            for candidate in MOMENTUM_GRID:
                self.flat.set_(start)
                self.flat.add_(self.mu, candidate)
                value = _mean_scalar(kl_of())
                if not value <= budget:
                    break
                if math.isfinite(reference_start):
                    to_reference = _mean_scalar(reference_kl_of())
                    if not to_reference - reference_start <= budget:
                        break
                    reference_kl = to_reference
                alpha, kl = candidate, value
            self.flat.set_(start)
            self.flat.add_(self.mu, alpha)
        self.state.momentum_alpha, self.state.momentum_kl = alpha, kl
        return {"zo/momentum_alpha": alpha, "zo/momentum_kl": kl, "zo/momentum_reference_kl": reference_kl}

    # --- 2./3. guarded exploration --------------------------------------------------------
    @torch.no_grad()
    def update(self, loss_fn: Callable[[], Any], base: Any = None) -> dict[str, float]:
        """The guarded updates of one rollout batch; returns the metrics of the batch.

        ``loss_fn()``: the batch loss at the current parameters; ``base``: that loss at the start
        when already known (no forward pass then). Decisions are device tensors (``torch.where``),
        so the updates make no host synchronisation; the metrics are read once at the end.
        """
        cfg = self.config
        q, eps, device = cfg.n_perturbations, cfg.eps, self.flat.device
        base = loss_tensor(loss_fn() if base is None else base, device)
        start_loss = base
        zero = torch.zeros((), dtype=torch.float64, device=device)
        kept, skipped, g_abs, n_finite = zero, zero, zero, zero
        for _ in range(cfg.updates_per_batch):
            z = self.probes(self.state.step)
            self.state.step += 1
            saved = self.flat.copy()
            g = torch.empty(q, dtype=torch.float64, device=device)
            for j in range(q):
                self.flat.add_(z[j], eps)
                g[j] = (loss_tensor(loss_fn(), device) - base) / eps
                self.flat.set_(saved)
            g = mean_across_processes(g)
            finite = torch.isfinite(g).all()
            step = torch.where(finite, g, 0.0).to(z.dtype) @ z  # a non-finite g: no step (skipped)
            norm = step.norm()
            self.flat.add_(step * (cfg.step_size * math.sqrt(step.numel()) / torch.where(norm > 0, norm, 1.0)), -1.0)
            new = loss_tensor(loss_fn(), device)
            change = mean_across_processes((new - base).reshape(1))[0]
            accept = finite & (change < 0)  # NaN compares false: rejected
            self.flat.set_(torch.where(accept, self.flat.copy(), saved))
            base = torch.where(accept, new, base)
            kept, skipped = kept + accept.double(), skipped + (~finite).double()
            g_abs, n_finite = g_abs + torch.where(finite, g.abs().mean(), 0.0), n_finite + finite.double()
        kept_n, skipped_n, g_abs_sum, finite_n, end, start = torch.stack(
            [kept, skipped, g_abs, n_finite, base, start_loss]
        ).tolist()
        kept_n, skipped_n = int(kept_n), int(skipped_n)
        self.state.accepted += kept_n
        self.state.skipped += skipped_n
        self.state.rejected += cfg.updates_per_batch - kept_n - skipped_n
        self.last_loss = end
        return {
            "zo/accepted_fraction": kept_n / cfg.updates_per_batch,
            "zo/rejected": float(self.state.rejected),
            "zo/skipped": float(self.state.skipped),
            "zo/loss_change": end - start,
            "zo/g_abs": g_abs_sum / finite_n if finite_n else float("nan"),
        }

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
