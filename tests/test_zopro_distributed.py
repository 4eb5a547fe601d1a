"""ZOPrO data-parallel: 2 CPU processes (gloo), each with its own loss.

After every update the parameters are identical on both processes and the applied update equals
``-lr * mean_over_processes(g) * z``, with each process's projected gradient gathered to check it.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from smk import pythonpath

from workflow.zo.direction import ZOConfig
from workflow.zo.engine import ZOEngine

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


# --- the trainer itself in 2 processes (torchrun; HF Trainer + accelerate pick MULTI_CPU, gloo) ----
def _trainer_main(base: str, out: str) -> None:
    """Worker: 2 ZOPrO updates of the real trainer; each rank writes its final LoRA tensors."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig

    from workflow.models.snapshots import lora_state
    from workflow.zo.trainer import ZOConfig, ZOPrOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False),
    )
    rank = int(os.environ.get("RANK", 0))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"say {i}"}] for i in range(16)]})
    mu = {k: 0.01 * torch.randn_like(t) for k, t in lora_state(model).items()}

    def reward(completions, **kw):  # differs per process: different losses
        return [float(len(str(c))) * (1 + rank) / 10 for c in completions]

    args = RLOOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        seed=0,
        lr_scheduler_type="constant",
        use_cpu=True,
    )
    trainer = ZOPrOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        mu=mu,
        v=None,
        zo_config=ZOConfig(lr=1e-2, eps=1e-2, gamma_schedule="linear", seed=5),
    )
    assert trainer.accelerator.num_processes == 2 and dist.get_world_size() == 2
    before = lora_state(model)
    trainer.train()
    after = lora_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in after)
    save_file(after, os.path.join(out, f"rank{rank}.safetensors"))


@pytest.mark.slow
def test_trainer_two_processes_stay_in_sync(tiny_base, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = dict(
        os.environ, PYTHONPATH=pythonpath(os.getcwd()), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""
    )  # CPU processes
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        __file__,
        tiny_base,
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    import sys

    _trainer_main(sys.argv[1], sys.argv[2])
