"""ZOPrO pure math: search directions, in-place perturbations and the SPSA update (no trl here).

Notation (docs/design.md, reference notes section 3). For every trainable tensor ``k`` (LoRA
matrices, in the fixed order of ``model.named_parameters()``):

* ``mu_k``: the previous policy update (policy_{i-1} - policy_{i-2}; minus the SFT adapter for i = 1);
* ``v_k``: the reward-model update (reward_i - reward_{i-1}), ``v_hat_k = v_k / |v_k|``;
* per update step and per direction ``j`` (q-SPSA), fresh Gaussian noise ``n_k`` regenerated from
  ``(seed, step, j, k)``, projected **per tensor** off ``v_hat_k``:
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

Noise is generated tensor by tensor with a ``torch.Generator`` on the parameters' device, seeded
from ``(seed, step, j, k)`` through ``numpy.random.SeedSequence``, into one flat buffer per
direction; the per-tensor projections and rescalings are segment sums over that buffer, and the
parameters move through ``torch._foreach_*`` ops (:class:`FlatParams`). The engine holds ``mu``,
``v_hat`` and the ``n_perturbations`` directions of the current update (float32 copies of the
trainable tensors: LoRA-sized) and never copies the parameters themselves (MeZO style).

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
update ``t`` always draws the noise of ``(seed, t)``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from workflow.schema import default, section

GAMMA_SCHEDULES = ("linear", "exp", "constant")
# Parameters never weight-decayed (name-based): biases and normalisation layers.
NO_DECAY = re.compile(r"(^|[._])(bias|[a-z_]*norm[a-z_0-9]*|ln_?[a-z0-9_]*)([._]|$)", re.IGNORECASE)


@dataclasses.dataclass
class ZOConfig:
    """Hyper-parameters of the reference variant's optimiser (config ``zopro.reference``; the
    defaults are the schema's)."""

    lr: float = default("zopro.reference.learning_rate")
    eps: float = default("zopro.reference.eps")
    gamma_start: float = default("zopro.reference.gamma_start")
    gamma_schedule: str = default("zopro.reference.gamma_schedule")
    n_perturbations: int = default("zopro.reference.n_perturbations")
    two_sided: bool = default("zopro.reference.two_sided")
    known_base: bool = default("zopro.reference.known_base")
    weight_decay: float = default("zopro.reference.weight_decay")
    seed: int = default("seed")

    def __post_init__(self) -> None:
        if self.gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"gamma_schedule must be one of {GAMMA_SCHEDULES}, got {self.gamma_schedule!r}")
        if not 0.0 <= self.gamma_start <= 1.0:
            raise ValueError("gamma_start must be in [0, 1]")
        if self.eps <= 0 or self.n_perturbations < 1:
            raise ValueError("eps must be > 0 and n_perturbations >= 1")

    @classmethod
    def from_config(cls, reference: Mapping[str, Any], seed: int) -> ZOConfig:
        """From config section ``zopro.reference`` (keys it lacks at the schema's defaults)."""
        ref = {**section({}, "zopro.reference"), **reference}
        return cls(lr=float(ref.pop("learning_rate")), seed=int(seed), **ref)


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
    """63-bit generator seed of tensor ``index``, direction ``direction`` of update ``step`` of a stage
    seeded ``seed``. The four enter the seed sequence apart, so that no update of one stage draws the
    noise of another (stage seeds are ``seed`` + 1009 x iteration, and a stage makes over 1009 updates)."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(step), int(direction), int(index)])
    lo, hi = (int(w) for w in words.generate_state(2, np.uint32))
    return ((hi << 32) | lo) & 0x7FFFFFFFFFFFFFFF


def decays(name: str) -> bool:
    """Whether weight decay applies to parameter ``name`` (not to biases and norms)."""
    return NO_DECAY.search(name) is None


class FlatParams:
    """The trainable tensors seen as one flat float32 vector (the order of ``params``).

    Updates go through ``torch._foreach_*`` over views of a flat buffer: one fused kernel per
    operation on a GPU instead of one per tensor, and no host synchronisation.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor]):
        if len(names) != len(params):
            raise ValueError("names and params differ in length")
        if len(set(names)) != len(names):
            raise ValueError("duplicate parameter names after normalisation")
        self.names = list(names)
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.device = self.params[0].device

    def flat(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``tensors`` (keyed like the names; missing keys are zero) as one float32 vector."""
        parts = []
        for name, p in zip(self.names, self.params):
            t = tensors.get(name)
            if t is not None and tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match parameter {tuple(p.shape)}")
            parts.append(torch.zeros(p.numel()) if t is None else t.detach().reshape(-1).float().cpu())
        return torch.cat(parts).to(self.device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat`` split into tensors shaped (and typed) like the parameters."""
        return [t.view(p.shape).to(p.dtype) for p, t in zip(self.params, flat.split(self.sizes))]

    def copy(self) -> torch.Tensor:
        """A float32 copy of the trainable tensors, concatenated."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.params])

    @torch.no_grad()
    def add_(self, flat: torch.Tensor, alpha: float = 1.0) -> None:
        """``params += alpha * flat`` in place."""
        torch._foreach_add_(self.params, self.views(flat), alpha=alpha)

    @torch.no_grad()
    def set_(self, flat: torch.Tensor) -> None:
        """``params = flat`` (restores a :meth:`copy`)."""
        torch._foreach_copy_(self.params, self.views(flat))


class Direction:
    """The ingredients of ``z`` on flat buffers: ``mu``, ``v_hat`` and the norm each tensor's noise
    is rescaled to (module docstring). ``mu``/``v``: dicts keyed like ``names`` (normalised LoRA
    keys); keys that are not parameters are ignored. Per-tensor reductions are segment sums
    (``index_add_``) on the parameters' device: no loop over tensors, no host synchronisation.
    """

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        mu: Mapping[str, torch.Tensor] | None,
        v: Mapping[str, torch.Tensor] | None,
    ):
        self.flat = FlatParams(names, params)
        device, sizes = self.flat.device, self.flat.sizes
        self.segment = torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
        )
        self.mu = self.flat.flat(mu or {})
        v_flat = self.flat.flat(v or {})
        v_norms = self.norms(v_flat)
        self.v_hat = v_flat / torch.where(v_norms > 0, v_norms, 1.0)[self.segment]
        mu_norms = self.norms(self.mu)
        numel = torch.tensor(sizes, device=device, dtype=torch.float32)
        with_mu = mu_norms > 0
        mu_numel = float(numel[with_mu].sum())
        self.mu_rms = math.sqrt(float(mu_norms.pow(2).sum()) / mu_numel) if mu_numel else None
        # the norm each tensor's noise is rescaled to; NaN = keep the noise's own norm (no mu anywhere)
        fill = self.mu_rms * numel.sqrt() if self.mu_rms is not None else torch.full_like(numel, math.nan)
        self.target_norm = torch.where(with_mu, mu_norms, fill)

    def norms(self, flat: torch.Tensor) -> torch.Tensor:
        """The norm of each tensor's segment of ``flat`` (``[n_tensors]``)."""
        return self.segment_sums(flat * flat).sqrt()

    def segment_sums(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.new_zeros(len(self.flat.sizes)).index_add_(0, self.segment, flat)

    def noise(self, seed: int, step: int, j: int) -> torch.Tensor:
        """The raw Gaussian noise of direction ``j`` of update ``step`` (flat float32): tensor ``k``'s
        segment is drawn from its own generator seeded by ``tensor_seed(seed, step, j, k)``."""
        out = torch.empty(sum(self.flat.sizes), device=self.flat.device)
        gen = torch.Generator(device=self.flat.device)
        for k, part in enumerate(out.split(self.flat.sizes)):
            gen.manual_seed(tensor_seed(seed, step, j, k))
            part.normal_(generator=gen)
        return out

    def z(self, seed: int, step: int, j: int, gamma: float) -> torch.Tensor:
        """``z`` of direction ``j`` of update ``step`` (flat float32, a fresh buffer)."""
        n = self.noise(seed, step, j)
        n -= self.v_hat * self.segment_sums(n * self.v_hat)[self.segment]
        norms = self.norms(n)
        scale = torch.where(torch.isnan(self.target_norm), 1.0, torch.where(norms > 0, self.target_norm / norms, 0.0))
        n *= (scale * math.sqrt(max(0.0, 1.0 - gamma * gamma)))[self.segment]
        if gamma != 0.0:
            n.add_(self.mu, alpha=gamma)
        return n


def mean_across_processes(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over data-parallel processes (one all-reduce; identity when alone).
    Stays on ``values``' device (NCCL reduces on the current GPU)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else values.device
    out = values.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device) / dist.get_world_size()


def loss_tensor(loss: Any, device: torch.device) -> torch.Tensor:
    """A loss as a float64 scalar on ``device`` (no host synchronisation for a tensor)."""
    if torch.is_tensor(loss):
        return loss.detach().reshape(()).to(device=device, dtype=torch.float64)
    return torch.tensor(float(loss), dtype=torch.float64, device=device)
