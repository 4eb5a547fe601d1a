"""Streaming LoRA trajectories: read, validate, subsample and reduce snapshot folders.

A *trajectory* is the concatenation of the snapshots (``<stage>/snapshots``, format in
docs/design.md) of one stage folder per iteration, e.g. policy iterations 0..N-1 of a method,
with the iteration each snapshot belongs to recorded (``Trajectory.iteration``) so that
iteration boundaries can be drawn and updates are never taken across them.

Memory is bounded by design: no snapshot, and no projection matrix for all parameters, is ever
held whole. :func:`stream` walks the parameter space chunk by chunk (``CHUNK`` consecutive
elements of one flattened tensor) and, for each chunk, reads that slice from every snapshot
file of every trajectory (plain ``pread`` at the offsets of the safetensors header, so nothing
is memory-mapped and the page cache never counts towards the process's RSS). Peak memory is
about ``(total snapshots) x CHUNK x 8`` bytes plus the projection block, independent of the
model size.

Reduction (primary choice: a seeded Gaussian random projection, not IncrementalPCA, because
IncrementalPCA needs ``reduce_dim x n_params`` of components in memory and two passes): the
reduced coordinates of a snapshot ``x`` are ``x @ G`` with ``G`` of shape
``(n_params, reduce_dim)``, entries ``N(0, 1/reduce_dim)`` (so squared norms and distances are
preserved in expectation, Johnson-Lindenstrauss). ``G`` is never built: the rows of chunk ``c``
of tensor ``key`` come from a PCG64 generator seeded by ``(seed, crc32(key), c)``
(:func:`projection_block`), so they are reproducible, independent of the order of reading, and
identical for policy and reward on shared keys. Only keys present in both trajectories with
the same shape are used (the reward head ``score.weight`` and anything else not shared is left
out), so policy and reward live in one common reduced space.

``keep_rm`` replay (``loop.keep_rm_close``): the reward snapshots on disk are the raw training
trajectory of each refinement. With ``keep_rm_alpha = a``, every snapshot ``s`` of reward
iteration ``i >= 1`` is replaced by ``a * prev + (1 - a) * s`` where ``prev`` is the (already
replayed) last snapshot of reward iteration ``i - 1``; iteration 0 is left as is. This is the
averaging the refinement applies to its final adapter (workflow/judges/pairs.py), replayed on every
intermediate snapshot: since refinement i starts from the saved (averaged) adapter of i - 1, the
replayed first snapshot of each iteration is that adapter and the replayed last snapshot is
exactly the averaged adapter the refinement saves. It is applied to the exact weights (before the
projection and before the interplay metrics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from workflow.io import SNAPSHOT_INDEX as INDEX
from workflow.io import read_snapshot_index, reading

#: elements of one flattened tensor per streamed chunk; part of the projection's definition
#: (the random block of chunk c is seeded by (seed, key, c)), so never change it silently.
CHUNK = 32768
_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": np.uint16}


class IncompleteTrajectoryError(RuntimeError):
    """A stage folder of a trajectory has no snapshots, a partial index or missing files."""


# --------------------------------------------------------------------------- files


def snapshots_dir(path: str | os.PathLike) -> Path:
    """``path`` itself when it is a snapshots folder, else ``path/snapshots`` (a stage folder)."""
    p = Path(path)
    if p.name == "snapshots" or (p / INDEX).exists():
        return p
    return p / "snapshots"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file
    end: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Tensor names, dtypes, shapes and byte ranges of a safetensors file (header only)."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (truncated)")
        (n,) = struct.unpack("<Q", raw)
        with reading(path, "snapshot"):
            header = json.loads(handle.read(n))
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[key] = TensorInfo(meta["dtype"], tuple(meta["shape"]), base + begin, base + end)
    return out


def read_elements(
    path: str | os.PathLike, info: TensorInfo, start: int, stop: int, fd: int | None = None
) -> np.ndarray:
    """Elements ``[start, stop)`` of the flattened tensor ``info`` of ``path`` as float32."""
    if info.dtype not in _DTYPES:
        raise ValueError(f"{path}: unsupported dtype {info.dtype}")
    dtype = np.dtype(_DTYPES[info.dtype])
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        nbytes = (stop - start) * dtype.itemsize
        buf = os.pread(fd, nbytes, info.begin + start * dtype.itemsize)
    finally:
        if own:
            os.close(fd)
    if len(buf) != nbytes:
        raise IncompleteTrajectoryError(f"{path}: file is shorter than its header says")
    arr = np.frombuffer(buf, dtype=dtype)
    if info.dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- trajectories


@dataclasses.dataclass
class Trajectory:
    """Snapshots of one model across iterations (after subsampling), in order."""

    name: str
    dirs: list[Path]  # snapshots folder of each iteration
    files: list[Path]  # one per kept snapshot
    steps: np.ndarray  # optimizer step of each kept snapshot (within its iteration)
    iteration: np.ndarray  # iteration of each kept snapshot
    snapshot: np.ndarray  # position of each kept snapshot in its iteration's index

    def __len__(self) -> int:
        return len(self.files)

    @property
    def n_iterations(self) -> int:
        return len(self.dirs)

    def rows(self, i: int) -> np.ndarray:
        """Row numbers of iteration ``i``."""
        return np.flatnonzero(self.iteration == i)

    @property
    def boundaries(self) -> list[int]:
        """Row where each iteration starts."""
        return [int(self.rows(i)[0]) for i in range(self.n_iterations)]

    def progress(self) -> np.ndarray:
        """Training progress of each row: iteration + fraction of that iteration's steps."""
        out = np.zeros(len(self), dtype=float)
        for i in range(self.n_iterations):
            r = self.rows(i)
            s = self.steps[r].astype(float)
            span = s[-1] - s[0]
            out[r] = i + ((s - s[0]) / span if span > 0 else np.linspace(0, 1, len(r)))
        return out


def validate(dirs: Sequence[str | os.PathLike], label: str, check_headers: bool = True) -> None:
    """Raise :class:`IncompleteTrajectoryError` naming every missing or partial iteration.

    Complete = the snapshots folder and ``index.csv`` exist, the index has columns
    snapshot/step/file, at least two rows, snapshots numbered 0..n-1 with non-decreasing steps,
    and every listed file exists, is not empty and has a readable safetensors header.
    """
    problems = []
    for i, d in enumerate(dirs):
        sd = snapshots_dir(d)
        where = f"{label} iteration {i} ({sd})"
        if not sd.is_dir():
            problems.append(f"{where}: snapshots folder is missing")
            continue
        if not (sd / INDEX).exists():
            problems.append(f"{where}: {INDEX} is missing")
            continue
        try:
            index = read_snapshot_index(sd)
        except Exception as err:  # noqa: BLE001 - reported with its cause (a missing column included)
            problems.append(f"{where}: {INDEX} is unreadable ({err})")
            continue
        if len(index) < 2:
            problems.append(f"{where}: partial index, {len(index)} snapshot(s) (need >= 2)")
            continue
        if list(index["snapshot"]) != list(range(len(index))):
            problems.append(f"{where}: partial index, snapshots are not numbered 0..{len(index) - 1}")
        if (np.diff(index["step"].to_numpy()) < 0).any():
            problems.append(f"{where}: steps are not in order")
        absent = []
        for name in index["file"]:
            f = sd / str(name)
            if not f.is_file() or f.stat().st_size == 0:
                absent.append(str(name))
            elif check_headers:
                try:
                    read_header(f)
                except Exception:  # noqa: BLE001
                    absent.append(f"{name} (unreadable)")
        if absent:
            shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            problems.append(
                f"{where}: partial snapshots, {len(absent)} of {len(index)} indexed file(s) missing or empty: {shown}"
            )
    if problems:
        raise IncompleteTrajectoryError(f"{label} trajectory is incomplete:\n  " + "\n  ".join(problems))


def subsample(n: int, k: int | None) -> np.ndarray:
    """At most ``k`` evenly spaced positions of ``range(n)``, always keeping the first and last."""
    if k is None or n <= k:
        return np.arange(n)
    k = max(2, int(k))
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


def load_trajectory(
    name: str, dirs: Sequence[str | os.PathLike], max_snapshots: int | None = None, validate_first: bool = True
) -> Trajectory:
    """The trajectory over ``dirs`` (one stage or snapshots folder per iteration).

    ``max_snapshots`` caps the whole trajectory: each iteration keeps at most
    ``max(2, max_snapshots // n_iterations)`` evenly spaced snapshots, its first and last
    included (so boundaries survive subsampling).
    """
    if validate_first:
        validate(dirs, name)
    sdirs = [snapshots_dir(d) for d in dirs]
    per_iter = None if max_snapshots is None else max(2, int(max_snapshots) // max(1, len(sdirs)))
    files, steps, iters, snaps = [], [], [], []
    for i, sd in enumerate(sdirs):
        index = read_snapshot_index(sd)
        keep = subsample(len(index), per_iter)
        for j in keep:
            files.append(sd / str(index["file"].iloc[j]))
            steps.append(int(index["step"].iloc[j]))
            iters.append(i)
            snaps.append(int(index["snapshot"].iloc[j]))
    return Trajectory(name, sdirs, files, np.asarray(steps), np.asarray(iters), np.asarray(snaps))


def layer_of(key: str) -> int | None:
    m = re.match(r"layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def shared_keys(trajectories: Iterable[Trajectory], layer: int | None = None) -> dict[str, TensorInfo]:
    """Keys (with the first trajectory's header info) present with one shape in every
    trajectory's first snapshot, optionally only those of layer ``layer``; sorted by name."""
    headers = [read_header(t.files[0]) for t in trajectories]
    keys = set(headers[0])
    for h in headers[1:]:
        keys &= {k for k in h if k in headers[0] and h[k].shape == headers[0][k].shape}
    if layer is not None:
        keys = {k for k in keys if layer_of(k) == int(layer)}
    if not keys:
        raise ValueError(
            "no LoRA tensor is shared by the trajectories" + (f" in layer {layer}" if layer is not None else "")
        )
    return {k: headers[0][k] for k in sorted(keys)}


# --------------------------------------------------------------------------- projection


def projection_block(seed: int, key: str, chunk: int, rows: int, dim: int) -> np.ndarray:
    """Rows of the random projection for chunk ``chunk`` of tensor ``key``: ``(rows, dim)``
    float32, entries N(0, 1/dim), from PCG64 seeded by ``(seed, crc32(key), chunk)``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode()), int(chunk)])
    block = np.random.Generator(np.random.PCG64(ss)).standard_normal((rows, dim), dtype=np.float32)
    block *= np.float32(1.0 / np.sqrt(dim))
    return block


def chunks(keys: dict[str, TensorInfo], chunk: int = CHUNK):
    """``(key, chunk_number, start, stop)`` over the flattened tensors, in key order."""
    for key, info in keys.items():
        for c, start in enumerate(range(0, info.numel, chunk)):
            yield key, c, start, min(start + chunk, info.numel)


def replay_keep_rm(x: np.ndarray, traj: Trajectory, alpha: float) -> np.ndarray:
    """Apply the keep_rm replay (module docstring) to rows ``x`` of ``traj``, in place."""
    prev = None
    for i in range(traj.n_iterations):
        r = traj.rows(i)
        if prev is not None:
            x[r] = alpha * prev + (1.0 - alpha) * x[r]
        prev = x[r[-1]].copy()
    return x


@dataclasses.dataclass
class Layout:
    """Byte offset and dtype of every used tensor in every snapshot file of a trajectory
    (compact arrays: headers are parsed once, not kept as objects)."""

    keys: list[str]
    begin: np.ndarray  # (n_files, n_keys) int64
    dtype: np.ndarray  # (n_files, n_keys) index into DTYPE_NAMES


DTYPE_NAMES = list(_DTYPES)


def layout(traj: Trajectory, keys: dict[str, TensorInfo]) -> Layout:
    """Read every header of ``traj`` once; every file must hold ``keys`` with their shapes."""
    names = list(keys)
    begin = np.zeros((len(traj), len(names)), dtype=np.int64)
    dtype = np.zeros((len(traj), len(names)), dtype=np.int8)
    for row, f in enumerate(traj.files):
        header = read_header(f)
        for j, k in enumerate(names):
            info = header.get(k)
            if info is None or info.shape != keys[k].shape:
                raise IncompleteTrajectoryError(
                    f"{f}: tensor {k} is missing or has another shape than in {traj.files[0]}"
                )
            if info.dtype not in _DTYPES:
                raise ValueError(f"{f}: unsupported dtype {info.dtype} of {k}")
            begin[row, j] = info.begin
            dtype[row, j] = DTYPE_NAMES.index(info.dtype)
    return Layout(names, begin, dtype)


def read_chunk(
    traj: Trajectory, key: str, start: int, stop: int, keep_rm_alpha: float | None = None, lay: Layout | None = None
) -> np.ndarray:
    """Elements ``[start, stop)`` of tensor ``key`` in every snapshot of ``traj``: (n, stop-start)."""
    out = np.empty((len(traj), stop - start), dtype=np.float32)
    if lay is None:
        lay = layout(traj, {key: read_header(traj.files[0])[key]})
    j = lay.keys.index(key)
    for row, f in enumerate(traj.files):
        name = DTYPE_NAMES[lay.dtype[row, j]]
        size = np.dtype(_DTYPES[name]).itemsize
        info = TensorInfo(name, (stop,), int(lay.begin[row, j]), int(lay.begin[row, j]) + stop * size)
        out[row] = read_elements(f, info, start, stop)
    if keep_rm_alpha is not None:
        replay_keep_rm(out, traj, float(keep_rm_alpha))
    return out


ChunkHook = Callable[[str, int, dict[str, np.ndarray]], None]


def stream(
    trajectories: dict[str, Trajectory],
    keys: dict[str, TensorInfo],
    dim: int = 100,
    seed: int = 0,
    keep_rm: dict[str, float] | None = None,
    hooks: Sequence[ChunkHook] = (),
    chunk: int = CHUNK,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """One pass over the parameters: the reduced coordinates ``(n_snapshots, dim)`` (float64)
    of every trajectory, and every ``hook(key, chunk_number, {name: chunk})`` called on the way
    (the interplay metrics accumulate their exact dot products there).

    ``dim`` larger than the number of shared parameters is capped at it. ``keep_rm`` maps a
    trajectory name to the alpha of its keep_rm replay.
    """
    keep_rm = keep_rm or {}
    total = sum(info.numel for info in keys.values())
    dim = int(min(dim, total))
    reduced = {name: np.zeros((len(t), dim)) for name, t in trajectories.items()}
    lays = {name: layout(t, keys) for name, t in trajectories.items()}
    all_chunks = list(chunks(keys, chunk))
    for n, (key, c, start, stop) in enumerate(all_chunks):
        data = {
            name: read_chunk(t, key, start, stop, keep_rm.get(name), lays[name]) for name, t in trajectories.items()
        }
        block = projection_block(seed, key, c, stop - start, dim)
        for name, x in data.items():
            reduced[name] += x @ block
        for hook in hooks:
            hook(key, c, data)
        del data, block
        if progress is not None:
            progress(n + 1, len(all_chunks))
    return reduced


def dense_projection(keys: dict[str, TensorInfo], dim: int, seed: int = 0, chunk: int = CHUNK) -> np.ndarray:
    """The whole projection matrix ``(n_params, dim)`` (keys in order, flattened): tests and
    small cases only; :func:`stream` never builds it."""
    return np.concatenate(
        [projection_block(seed, key, c, stop - start, dim) for key, c, start, stop in chunks(keys, chunk)]
    )
