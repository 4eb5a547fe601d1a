"""ZOPrO data-parallel: 2 CPU processes (gloo), each with its own loss.

After every update the parameters are identical on both processes and the applied update equals
``-lr * mean_over_processes(g) * z``, with each process's projected gradient gathered to check it.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workflow.zopro_direction import ZOConfig, ZOEngine

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, two_sided: bool) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(0)  # same init on every process
        shapes = {"layers.0.a.lora_A.weight": (3, 8), "layers.0.a.lora_B.weight": (8, 3)}
        params = [torch.randn(s, generator=gen) for s in shapes.values()]
        mu = {k: 0.1 * torch.randn(s, generator=gen) for k, s in shapes.items()}
        v = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        targets = [torch.randn(s, generator=torch.Generator().manual_seed(100 + rank)) for s in shapes.values()]

        def loss():  # a different loss per process
            return float(sum(((p - t) ** 2).sum() for p, t in zip(params, targets)))

        cfg = ZOConfig(lr=0.05, eps=1e-3, gamma_schedule="linear", two_sided=two_sided, seed=3)
        eng = ZOEngine(list(zip(shapes, params)), mu, v, cfg, total_steps=STEPS)
        for _ in range(STEPS):
            before = [p.clone() for p in params]
            z = eng.z(0)
            g_local, _ = eng.estimate(loss)
            eng.apply()
            gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(gathered, g_local.clone())
            g_mean = float(torch.cat(gathered).mean())
            assert float(gathered[0]) != float(gathered[1])  # the losses really differ
            for p, b, zk in zip(params, before, z):
                torch.testing.assert_close(p, b - cfg.lr * g_mean * zk, rtol=1e-5, atol=1e-6)
                others = [torch.zeros_like(p) for _ in range(world)]
                dist.all_gather(others, p.contiguous())
                assert all(torch.equal(others[0], o) for o in others[1:])  # identical on every process
        assert eng.state.step == STEPS
    finally:
        dist.destroy_process_group()


def _run(two_sided: bool) -> None:
    mp.spawn(_worker, args=(2, _free_port(), two_sided), nprocs=2, join=True)


def test_two_process_update_is_the_average_and_params_stay_in_sync():
    _run(True)


def test_two_process_one_sided():
    _run(False)
