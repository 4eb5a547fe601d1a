"""The reference variant's optimiser (``zopro.variant: reference``): q-SPSA along the ZOPrO
direction (:mod:`workflow.zo.direction`), with its state and the ``torch.optim`` facade the
HF Trainer steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from workflow.runtime import rng_snapshot
from workflow.zo.direction import (
    Direction,
    ZOConfig,
    decays,
    gamma_at,
    loss_tensor,
    mean_across_processes,
)


@dataclasses.dataclass
class ZOState:
    """What a checkpoint must hold to resume a stage mid-way (plain data)."""

    step: int = 0  # updates done (applied or skipped)
    skipped: int = 0  # updates skipped because g was not finite
    total_steps: int | None = None
    g_sum: list[float] = dataclasses.field(default_factory=list)  # pending accumulation
    n_micro: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ZOState:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


class ZOEngine:
    """Zeroth-order SPSA optimiser over ``params`` with the ZOPrO direction.

    Use: per micro-batch ``estimate(loss_fn)`` (perturbs, evaluates, restores, accumulates the
    projected gradients ``g_j``); once per update ``apply()`` (averages over micro-batches and,
    under ``torch.distributed``, across processes with one all-reduce of ``n_perturbations``
    scalars; skips non-finite ``g``; ``theta <- theta - lr * (mean_j g_j z_j + wd * theta)``;
    advances the step, hence the seed). No optimizer state, no autograd graph.

    Everything stays on the parameters' device: the directions of an update are drawn once into
    flat buffers (``n_perturbations`` float32 copies of the trainable tensors) and reused by every
    micro-batch and by ``apply``; losses and ``g`` are device tensors. The one host
    synchronisation per update is ``apply``'s decision on a non-finite ``g`` (with its metrics).
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.Tensor]],
        mu: Mapping[str, torch.Tensor] | None,
        v: Mapping[str, torch.Tensor] | None,
        config: ZOConfig,
        total_steps: int | None = None,
        common_random_numbers: bool = True,
    ):
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.config = config
        self.direction = Direction(self.names, self.params, mu, v)
        self.flat = self.direction.flat
        self.decaying = [p for p, n in zip(self.params, self.names) if decays(n)]
        self.state = ZOState(total_steps=total_steps)
        self.common_random_numbers = common_random_numbers
        self._g_sum = torch.zeros(config.n_perturbations, dtype=torch.float64, device=self.flat.device)
        self._z: tuple[tuple[int, float], list[torch.Tensor]] | None = None  # (step, gamma) -> directions

    # --- schedule -------------------------------------------------------------------------
    @property
    def gamma(self) -> float:
        return gamma_at(self.config.gamma_schedule, self.config.gamma_start, self.state.step, self.state.total_steps)

    def directions(self) -> list[torch.Tensor]:
        """The ``n_perturbations`` flat directions of the current update (drawn once, then cached)."""
        key = (self.state.step, self.gamma)
        if self._z is None or self._z[0] != key:
            self._z = (
                key,
                [
                    self.direction.z(self.config.seed, self.state.step, j, key[1])
                    for j in range(self.config.n_perturbations)
                ],
            )
        return self._z[1]

    def z(self, j: int = 0) -> list[torch.Tensor]:
        """Direction ``j`` of the current update shaped like the parameters (tests and diagnostics)."""
        return [t.clone() for t in self.flat.views(self.directions()[j])]

    # --- estimation -----------------------------------------------------------------------
    @torch.no_grad()
    def estimate(self, loss_fn: Callable[[], Any], base: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected gradients ``g_j`` of one micro-batch (accumulated until ``apply``) and the loss,
        both device tensors (float64).

        ``loss_fn()`` evaluates the micro-batch loss at the current parameters. Every evaluation
        starts from the same RNG state (common random numbers: same dropout masks at all points).
        ``base``: the loss at the current parameters when already known (one-sided estimates use
        it instead of a forward pass; ignored when two-sided). Parameters are restored (up to
        float rounding) before returning.
        """
        eps, device = self.config.eps, self.flat.device
        restore_rng = rng_snapshot() if self.common_random_numbers else lambda: None

        def evaluate() -> torch.Tensor:
            restore_rng()
            return loss_tensor(loss_fn(), device)

        g, losses = [], []
        if not self.config.two_sided:
            base = evaluate() if base is None else loss_tensor(base, device)
        for z in self.directions():
            self.flat.add_(z, eps)
            plus = evaluate()
            if self.config.two_sided:
                self.flat.add_(z, -2 * eps)
                minus = evaluate()
                self.flat.add_(z, eps)
                g.append((plus - minus) / (2 * eps))
                losses.append(0.5 * (plus + minus))
            else:
                self.flat.add_(z, -eps)
                g.append((plus - base) / eps)
                losses.append(base)
        g_t = torch.stack(g)
        self._g_sum += g_t
        self.state.n_micro += 1
        return g_t, torch.stack(losses).mean()

    # --- update ---------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, lr: float | None = None) -> dict[str, float]:
        """Apply the accumulated update; returns metrics (``zo/...``)."""
        lr = self.config.lr if lr is None else float(lr)
        if self.state.n_micro == 0:
            return {}
        g = mean_across_processes(self._g_sum / self.state.n_micro)
        gamma = self.gamma
        finite, g_mean, g_abs = torch.stack([torch.isfinite(g).all().double(), g.mean(), g.abs().mean()]).tolist()
        metrics = {"zo/gamma": gamma, "zo/step": float(self.state.step), "zo/lr": lr}
        if not finite:
            self.state.skipped += 1
            metrics["zo/g"] = float("nan")
        else:
            wd = self.config.weight_decay
            if wd and self.decaying:
                torch._foreach_mul_(self.decaying, 1.0 - lr * wd)
            step = (g.float() / len(g)) @ torch.stack(self.directions())
            self.flat.add_(step, -lr)
            metrics["zo/g"], metrics["zo/g_abs"] = g_mean, g_abs
        metrics["zo/skipped"] = float(self.state.skipped)
        self.state.step += 1
        self._g_sum.zero_()
        self.state.n_micro = 0
        return metrics

    # --- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.state.g_sum = self._g_sum.tolist()
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
        self._g_sum = torch.tensor(g, dtype=torch.float64, device=self.flat.device)


class ZOOptimizer(torch.optim.Optimizer):
    """A stateless ``torch.optim.Optimizer`` facade over :class:`ZOEngine` for the HF Trainer.

    ``step()`` applies the accumulated zeroth-order update with the group's (scheduled) lr;
    ``zero_grad()`` does nothing (there are no gradients); ``state_dict()`` carries the engine's
    state (step, seed, skipped, pending accumulation) under ``"zo"`` so HF checkpoints resume it.
    """

    def __init__(
        self, engine: ZOEngine, lr: float | None = None, on_step: Callable[[dict[str, float]], None] | None = None
    ):
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
