"""Interplay metrics between a policy trajectory and a reward trajectory.

Exact metrics are computed in the full LoRA parameter space over the keys shared by policy and
reward (see ``workflow.analysis.trajectories``), by streaming: :class:`UpdateAccumulator` is a
``trajectories.stream`` hook that adds, chunk by chunk, the per-step dot products, squared norms
and sums of the updates (float64); nothing is ever flattened whole.

Definitions (all per aligned step ``t`` within one iteration):

* Alignment (:func:`align`): policy and reward steps are paired by index within an iteration.
  With ``nP`` policy and ``nR`` reward snapshots in iteration ``i``, ``m = min(nP, nR)`` points
  of the common normalised progress grid ``u_k = k / (m - 1)`` are taken and each trajectory
  uses its snapshot nearest to ``u_k`` (position ``round(u_k (n - 1))``); with equal counts this
  is the identity. Step ``t`` goes from grid point ``t`` to ``t + 1`` (``m - 1`` steps per
  iteration); steps never cross an iteration boundary.
* ``dP_t = P_{t+1} - P_t``, ``dR_t = R_{t+1} - R_t`` (aligned snapshots).
* ``cosine`` / ``angle_deg``: between ``dP_t`` and ``dR_t`` (the exact update angle).
* ``obi_wan_cosine`` / ``obi_wan_angle_deg``: between ``dR_t`` and ``dP_{t+1}`` (the reward
  step and the *next* policy step; NaN on an iteration's last step).
* ``policy_consecutive_cosine``: between ``dP_t`` and ``dP_{t+1}``; ``reward_consecutive_cosine``
  likewise for the reward (NaN on the last step of an iteration).
* ``pearson``: Pearson correlation over the shared parameters of the elements of ``dP_t`` and
  ``dR_t`` (the correlation of the weight changes; unlike the cosine, it centres them).
* ``policy_norm`` / ``reward_norm``: ``|dP_t|``, ``|dR_t|``; ``policy_speed`` / ``reward_speed``:
  the velocity magnitude, norm divided by the optimizer steps between the two snapshots.
* ``cosine_reduced``: the cosine of the same two updates in the random-projection space (a
  check of how well the reduction preserves angles).
* ``velocity_angle_pca3_deg``: the reference's "angle between velocities" was taken after a
  non-linear reduction; here velocity = update / optimizer steps, and this is the angle between
  the policy and reward velocity vectors in the 3D PCA projection of the joint reduced
  trajectory (a linear map, so the number is interpretable but is a *projected* angle; the
  exact one is ``angle_deg``, dividing by step counts does not change an angle).

Per iteration (:func:`iteration_table`): the mean of every per-step column, plus
``distance_correlation`` and ``procrustes_disparity`` between the aligned policy and reward
points (reduced coordinates; scipy.spatial.procrustes), ``iteration_cosine`` between the whole
iteration updates ``P_last - P_first`` and ``R_last - R_first``, and
``policy_momentum_cosine`` between the iteration update of the policy and that of the
previous iteration (the assumption behind ZOPrO's momentum term). A last row with
``scope == "trajectory"`` aggregates every step / aligned point of the whole trajectory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from workflow.analysis.trajectories import Trajectory

# --------------------------------------------------------------------------- elementary metrics


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    return _cos(float(a @ b), float(a @ a), float(b @ b))


def _cos(ab: float, aa: float, bb: float) -> float:
    if aa <= 0 or bb <= 0:
        return float("nan")
    return float(np.clip(ab / np.sqrt(aa * bb), -1.0, 1.0))


def angle_deg(cos: float | np.ndarray) -> float | np.ndarray:
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def pearson_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float:
    """Pearson correlation from the sums of x, y, x^2, y^2 and xy over ``n`` elements."""
    if n < 2:
        return float("nan")
    cov = sxy - sx * sy / n
    vx = sxx - sx * sx / n
    vy = syy - sy * sy / n
    if vx <= 0 or vy <= 0:
        return float("nan")
    return float(np.clip(cov / np.sqrt(vx * vy), -1.0, 1.0))


def distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Székely's (biased, V-statistic) distance correlation between paired samples."""
    from scipy.spatial.distance import cdist

    x = np.asarray(x, dtype=float).reshape(len(x), -1)
    y = np.asarray(y, dtype=float).reshape(len(y), -1)
    if len(x) < 2:
        return float("nan")

    def centred(z):
        d = cdist(z, z)
        return d - d.mean(0) - d.mean(1)[:, None] + d.mean()

    a, b = centred(x), centred(y)
    vxy, vx, vy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    if vx <= 0 or vy <= 0:
        return float("nan")
    return float(np.sqrt(max(vxy, 0.0) / np.sqrt(vx * vy)))


def procrustes_disparity(x: np.ndarray, y: np.ndarray) -> float:
    """scipy.spatial.procrustes disparity (0 = same shape up to translation, scale, rotation)."""
    from scipy.spatial import procrustes

    try:
        return float(procrustes(np.asarray(x, float), np.asarray(y, float))[2])
    except ValueError:  # fewer than 2 distinct points
        return float("nan")


# --------------------------------------------------------------------------- alignment


@dataclasses.dataclass
class Alignment:
    """Aligned grid points (rows of each trajectory) and the steps between them."""

    iteration_points: np.ndarray  # iteration of each aligned point
    policy_rows: np.ndarray  # row of the policy trajectory at each aligned point
    reward_rows: np.ndarray
    # steps: from point a to point a + 1 within one iteration
    iteration: np.ndarray
    step_index: np.ndarray  # position of the step within its iteration
    p_from: np.ndarray
    p_to: np.ndarray
    r_from: np.ndarray
    r_to: np.ndarray

    @property
    def n_steps(self) -> int:
        return len(self.iteration)

    def next_in_iteration(self) -> np.ndarray:
        """True where step t + 1 exists in the same iteration."""
        nxt = np.zeros(self.n_steps, dtype=bool)
        nxt[:-1] = self.iteration[1:] == self.iteration[:-1]
        return nxt


def align(policy: Trajectory, reward: Trajectory) -> Alignment:
    """Pair policy and reward snapshots on the common progress grid (module docstring)."""
    if policy.n_iterations != reward.n_iterations:
        raise ValueError(f"policy has {policy.n_iterations} iterations, reward {reward.n_iterations}")
    pts_it, prow, rrow = [], [], []
    it, idx, pf, pt, rf, rt = [], [], [], [], [], []
    for i in range(policy.n_iterations):
        p, r = policy.rows(i), reward.rows(i)
        m = min(len(p), len(r))
        u = np.linspace(0.0, 1.0, m)
        sp = p[np.round(u * (len(p) - 1)).astype(int)]
        sr = r[np.round(u * (len(r) - 1)).astype(int)]
        pts_it += [i] * m
        prow += list(sp)
        rrow += list(sr)
        for t in range(m - 1):
            it.append(i)
            idx.append(t)
            pf.append(sp[t])
            pt.append(sp[t + 1])
            rf.append(sr[t])
            rt.append(sr[t + 1])
    a = np.asarray
    return Alignment(
        a(pts_it, int),
        a(prow, int),
        a(rrow, int),
        a(it, int),
        a(idx, int),
        a(pf, int),
        a(pt, int),
        a(rf, int),
        a(rt, int),
    )


# --------------------------------------------------------------------------- streaming sums


class UpdateAccumulator:
    """``trajectories.stream`` hook: exact per-step sums over the shared parameters."""

    def __init__(
        self,
        alignment: Alignment,
        policy: Trajectory,
        reward: Trajectory,
        policy_name: str = "policy",
        reward_name: str = "reward",
    ):
        self.al = alignment
        self.pn, self.rn = policy_name, reward_name
        s = alignment.n_steps
        self.n = 0
        self.pp, self.rr, self.pr = np.zeros(s), np.zeros(s), np.zeros(s)
        self.sp, self.sr = np.zeros(s), np.zeros(s)
        self.pp_next, self.rr_next, self.rp_next = np.zeros(s), np.zeros(s), np.zeros(s)
        # whole-iteration updates: [policy_0..N-1, reward_0..N-1] and their Gram matrix
        n_it = policy.n_iterations
        self.n_it = n_it
        self.it_p = [(policy.rows(i)[0], policy.rows(i)[-1]) for i in range(n_it)]
        self.it_r = [(reward.rows(i)[0], reward.rows(i)[-1]) for i in range(n_it)]
        self.gram = np.zeros((2 * n_it, 2 * n_it))

    def __call__(self, key: str, chunk: int, data: dict[str, np.ndarray]) -> None:
        P, R = data[self.pn], data[self.rn]
        al = self.al
        self.n += P.shape[1]
        if al.n_steps:
            dp = P[al.p_to].astype(np.float64)
            dp -= P[al.p_from]
            dr = R[al.r_to].astype(np.float64)
            dr -= R[al.r_from]
            self.pp += np.einsum("ij,ij->i", dp, dp)
            self.rr += np.einsum("ij,ij->i", dr, dr)
            self.pr += np.einsum("ij,ij->i", dp, dr)
            self.sp += dp.sum(1)
            self.sr += dr.sum(1)
            self.pp_next[:-1] += np.einsum("ij,ij->i", dp[:-1], dp[1:])
            self.rr_next[:-1] += np.einsum("ij,ij->i", dr[:-1], dr[1:])
            self.rp_next[:-1] += np.einsum("ij,ij->i", dr[:-1], dp[1:])
            del dp, dr
        u = np.stack(
            [P[b].astype(np.float64) - P[a] for a, b in self.it_p]
            + [R[b].astype(np.float64) - R[a] for a, b in self.it_r]
        )
        self.gram += u @ u.T

    def step_table(self) -> pd.DataFrame:
        """Exact per-step metrics (no reduced-space columns)."""
        al = self.al
        nxt = al.next_in_iteration()
        cos = np.array([_cos(a, b, c) for a, b, c in zip(self.pr, self.pp, self.rr)])
        pp_n = np.append(self.pp[1:], np.nan)
        obi = np.array([_cos(a, b, c) if ok else np.nan for a, b, c, ok in zip(self.rp_next, self.rr, pp_n, nxt)])
        pcons = np.array([_cos(a, b, c) if ok else np.nan for a, b, c, ok in zip(self.pp_next, self.pp, pp_n, nxt)])
        rr_n = np.append(self.rr[1:], np.nan)
        rcons = np.array([_cos(a, b, c) if ok else np.nan for a, b, c, ok in zip(self.rr_next, self.rr, rr_n, nxt)])
        pear = np.array([pearson_from_sums(self.n, *v) for v in zip(self.sp, self.sr, self.pp, self.rr, self.pr)])
        return pd.DataFrame(
            {
                "iteration": al.iteration,
                "step_index": al.step_index,
                "n_params": self.n,
                "cosine": cos,
                "angle_deg": angle_deg(cos),
                "obi_wan_cosine": obi,
                "obi_wan_angle_deg": angle_deg(obi),
                "policy_consecutive_cosine": pcons,
                "reward_consecutive_cosine": rcons,
                "pearson": pear,
                "policy_norm": np.sqrt(self.pp),
                "reward_norm": np.sqrt(self.rr),
            }
        )

    def iteration_cosines(self) -> pd.DataFrame:
        g, n = self.gram, self.n_it
        rows = []
        for i in range(n):
            rows.append(
                {
                    "iteration": i,
                    "iteration_cosine": _cos(g[i, n + i], g[i, i], g[n + i, n + i]),
                    "policy_momentum_cosine": _cos(g[i, i - 1], g[i, i], g[i - 1, i - 1]) if i else np.nan,
                    "reward_momentum_cosine": (
                        _cos(g[n + i, n + i - 1], g[n + i, n + i], g[n + i - 1, n + i - 1]) if i else np.nan
                    ),
                    "policy_iteration_norm": float(np.sqrt(g[i, i])),
                    "reward_iteration_norm": float(np.sqrt(g[n + i, n + i])),
                }
            )
        return pd.DataFrame(rows)


# --------------------------------------------------------------------------- tables


def step_table(
    acc: UpdateAccumulator,
    policy: Trajectory,
    reward: Trajectory,
    reduced: dict[str, np.ndarray],
    pca3: dict[str, np.ndarray] | None = None,
    policy_name: str = "policy",
    reward_name: str = "reward",
) -> pd.DataFrame:
    """Per-step table: exact metrics plus steps, progress, speeds and reduced-space angles."""
    al = acc.al
    df = acc.step_table()
    pprog, rprog = policy.progress(), reward.progress()
    df.insert(2, "progress", pprog[al.p_from])
    df.insert(3, "progress_end", pprog[al.p_to])
    df.insert(4, "policy_step_from", policy.steps[al.p_from])
    df.insert(5, "policy_step_to", policy.steps[al.p_to])
    df.insert(6, "reward_step_from", reward.steps[al.r_from])
    df.insert(7, "reward_step_to", reward.steps[al.r_to])
    df["reward_progress"] = rprog[al.r_from]
    dsp = np.maximum(policy.steps[al.p_to] - policy.steps[al.p_from], 1)
    dsr = np.maximum(reward.steps[al.r_to] - reward.steps[al.r_from], 1)
    df["policy_speed"] = df["policy_norm"] / dsp
    df["reward_speed"] = df["reward_norm"] / dsr
    yp, yr = reduced[policy_name], reduced[reward_name]
    dp, dr = yp[al.p_to] - yp[al.p_from], yr[al.r_to] - yr[al.r_from]
    df["cosine_reduced"] = [cosine(a, b) for a, b in zip(dp, dr)]
    if pca3 is not None:
        vp = (pca3[policy_name][al.p_to] - pca3[policy_name][al.p_from]) / dsp[:, None]
        vr = (pca3[reward_name][al.r_to] - pca3[reward_name][al.r_from]) / dsr[:, None]
        df["velocity_angle_pca3_deg"] = angle_deg(np.array([cosine(a, b) for a, b in zip(vp, vr)]))
    return df


def iteration_table(
    steps: pd.DataFrame,
    acc: UpdateAccumulator,
    reduced: dict[str, np.ndarray],
    policy_name: str = "policy",
    reward_name: str = "reward",
) -> pd.DataFrame:
    """Per-iteration means of the step metrics plus shape metrics (module docstring)."""
    al = acc.al
    skip = {
        "iteration",
        "step_index",
        "n_params",
        "policy_step_from",
        "policy_step_to",
        "reward_step_from",
        "reward_step_to",
        "progress",
        "progress_end",
        "reward_progress",
    }
    cols = [c for c in steps.columns if c not in skip]
    yp, yr = reduced[policy_name], reduced[reward_name]
    itc = acc.iteration_cosines().set_index("iteration")
    rows = []
    for i in range(acc.n_it):
        s = steps[steps["iteration"] == i]
        pts = al.iteration_points == i
        x, y = yp[al.policy_rows[pts]], yr[al.reward_rows[pts]]
        row = {"scope": "iteration", "iteration": i, "n_steps": len(s)}
        row.update({c: float(s[c].mean()) if len(s) else np.nan for c in cols})
        row["distance_correlation"] = distance_correlation(x, y)
        row["procrustes_disparity"] = procrustes_disparity(x, y)
        row.update(itc.loc[i].to_dict())
        rows.append(row)
    x, y = yp[al.policy_rows], yr[al.reward_rows]
    row = {"scope": "trajectory", "iteration": pd.NA, "n_steps": len(steps)}
    row.update({c: float(steps[c].mean()) if len(steps) else np.nan for c in cols})
    row["distance_correlation"] = distance_correlation(x, y)
    row["procrustes_disparity"] = procrustes_disparity(x, y)
    rows.append(row)
    out = pd.DataFrame(rows)
    out["iteration"] = out["iteration"].astype("Int64")
    return out
