"""Benchmark: the update phase of first-order RLOO vs ZOPrO, on the same LoRA Llama and rollouts.

Each method runs in a fresh subprocess (``--worker``) on the same randomly initialised Llama
(built from a ``LlamaConfig``, seed 0) with the same LoRA and the same synthetic rollout batch:

* ``fo``: RLOO/PPO-clip loss forward + backward + ``torch.optim.AdamW`` step;
* ``zo``: ZOPrO's reference variant (``workflow.zo.engine.ZOEngine``): two forwards under
  ``torch.no_grad`` at ``theta +/- eps z`` + in-place perturb/restore/update (no grads, no optimizer state);
* ``zo_one_sided``: the same engine one-sided with the known base (``zopro.reference.two_sided:
  false``, ``known_base: true``): at the rollout policy the loss is ``-mean(advantages)``, so one
  forward at ``theta + eps z``;
* ``zo_guarded``: ZOPrO's guarded variant (``workflow.zo.guarded.GuardedEngine``), one guarded
  update as configured in config.yaml (``zopro.n_perturbations`` probes, one-sided, plus the base and
  the guard's forward), computing in fp32 on a bf16 base as the policy stage does.

``--dtype bf16`` loads the base in bf16 (LoRA weights stay fp32) and runs ``fo`` and ``zo`` under bf16
autocast, as the trainers do on a GPU; ``--size 1b`` is the Llama-3.2-1B shape (1.5B parameters with
its 128k vocabulary).

Times: wall-clock per update (min over ``--reps`` after one warm-up) and process CPU time, per
fresh process; and, fairer on a shared machine, both methods alternating in one process on the
same model and batch (``interleaved_*`` ratios: the headline time ratio). The interleaved worker
also profiles ``--profile-updates`` more updates of each method (``torch.profiler``) and counts,
per update, the host reads of device values (``aten::_local_scalar_dense``: every ``.item()``,
``float(tensor)``, each a synchronisation on a GPU) and, on a GPU, the kernel launches and the
CUDA synchronisation calls (``.tolist()`` and copies to the host included). Both use the same loss (trl's per-sequence PPO-clip with ``selective_log_softmax``, as in
``RLOOTrainer._compute_loss``). Memory: on CPU, the peak RSS of the phase minus the RSS right
before it (the peak is reset with ``/proc/self/clear_refs`` and read from ``VmHWM``; a polling
thread is the fallback); on GPU, ``torch.cuda.max_memory_allocated`` minus the allocation before
the phase. ``--full`` also times a full iteration: generation + scoring (reference and old
log-probs, a cheap length reward, leave-one-out advantages) + update.

    python benchmarks/zopro_update.py --out results/benchmarks/zopro_update.json
    python benchmarks/zopro_update.py --size small --full --out /tmp/zopro_small.json
    python benchmarks/zopro_update.py --size 1b --dtype bf16 --batch 16 --prompt-len 256 --completion-len 256
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workflow.io import atomic_path  # noqa: E402

SIZES = {  # LlamaConfig kwargs
    "default": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=12,
    ),
    "small": dict(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}
METHODS = ("fo", "zo", "zo_one_sided", "zo_guarded")


# --- memory ------------------------------------------------------------------------------------
def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class PeakMemory:
    """Peak memory (MiB) of a phase above the level at its start."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = _rss_kb()
        self.hwm = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.hwm = False
            self.peak_polled = self.start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_polled = max(self.peak_polled, _rss_kb())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            return
        if self.hwm:
            with open("/proc/self/status") as f:
                peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
        else:
            self._stop.set()
            self._thread.join()
            peak = self.peak_polled
        self.mib = (peak - self.start) / 1024


# --- the worker ---------------------------------------------------------------------------------
def build(size: str, r: int, seed: int, device: str, dtype: str = "fp32"):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):  # initialised where it runs (a 1.5B model's CPU initialisation takes minutes)
        model = LlamaForCausalLM(config).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        ),
    )
    model.to(device)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, n_params, n_lora


def per_token_logps(model, input_ids, attention_mask, n_completion):
    from trl.trainer.utils import selective_log_softmax

    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -n_completion - 1 : -1, :]
    return selective_log_softmax(logits, input_ids[:, -n_completion:])


def rloo_loss(model, batch, clip=0.2, autocast=False):
    """The PPO-clip sequence loss of ``RLOOTrainer._compute_loss`` (``autocast``: under bf16 autocast)."""
    import contextlib

    import torch

    ctx = torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        logps = (
            per_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["n_completion"]).float()
            * batch["completion_mask"]
        ).sum(1)
    coef_1 = torch.exp(logps - batch["old_logps"])
    coef_2 = torch.clamp(coef_1, 1 - clip, 1 + clip)
    adv = batch["advantages"]
    return -torch.min(coef_1 * adv, coef_2 * adv).mean()


def make_batch(model, args, device):
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len + args.completion_len), generator=g).to(device)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "n_completion": args.completion_len,
        "completion_mask": torch.ones(args.batch, args.completion_len, device=device),
        "advantages": torch.randn(args.batch, generator=g).to(device),
    }
    with torch.no_grad():
        batch["old_logps"] = (
            per_token_logps(model, ids, batch["attention_mask"], args.completion_len) * batch["completion_mask"]
        ).sum(1)
    return batch


def rollout(model, args, device, k=2):
    """Generation + scoring of one iteration: completions, ref/old logps, reward, RLOO advantages."""
    import torch

    g = torch.Generator().manual_seed(2)
    n_prompts = max(1, args.batch // k)
    prompts = torch.randint(3, model.config.vocab_size, (n_prompts, args.prompt_len), generator=g).to(device)
    prompts = prompts.repeat_interleave(k, 0)
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            max_new_tokens=args.completion_len,
            min_new_tokens=args.completion_len,
            pad_token_id=0,
            eos_token_id=None,
        )
        mask = torch.ones_like(out)
        n = out.shape[1] - args.prompt_len
        cmask = torch.ones(out.shape[0], n, device=device)
        old = (per_token_logps(model, out, mask, n) * cmask).sum(1)
        with model.disable_adapter():
            ref = (per_token_logps(model, out, mask, n) * cmask).sum(1)
        reward = (out[:, -n:] % 7 == 0).float().mean(1) - 0.05 * (old - ref)
        r = reward.view(-1, k)
        adv = (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)
    return {
        "input_ids": out,
        "attention_mask": mask,
        "n_completion": n,
        "completion_mask": cmask,
        "old_logps": old,
        "advantages": adv,
    }


def make_update(method, model, params, dtype="fp32"):
    """One update of ``method`` on a rollout batch: ``fo`` (AdamW), ``zo`` (ZOPrO reference),
    ``zo_one_sided`` (reference, one-sided with the known base) or ``zo_guarded`` (ZOPrO guarded)."""
    import torch
    import yaml

    bf16 = dtype == "bf16"
    if method == "fo":
        opt = torch.optim.AdamW(params, lr=1e-5)

        def update(b):
            loss = rloo_loss(model, b, autocast=bf16)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return update

    from workflow.models.snapshots import normalise_key
    from workflow.zo.direction import ZOConfig
    from workflow.zo.engine import ZOEngine

    named = [(normalise_key(n), p) for n, p in model.named_parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(3)
    mu = {n: 1e-3 * torch.randn(p.shape, generator=gen) for n, p in named}
    v = {n: torch.randn(p.shape, generator=gen) for n, p in named}
    if method in ("zo", "zo_one_sided"):
        one_sided = method == "zo_one_sided"
        engine = ZOEngine(
            named,
            mu,
            v,
            ZOConfig(lr=1e-5, eps=1e-3, gamma_schedule="linear", two_sided=not one_sided),
            total_steps=1000,
        )

        def update(b):
            with torch.no_grad():
                engine.estimate(
                    lambda: rloo_loss(model, b, autocast=bf16), base=-b["advantages"].mean() if one_sided else None
                )
                engine.apply()

        return update

    from workflow.models.loading import fp32_compute
    from workflow.zo.guarded import GuardedConfig, GuardedEngine

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    config["zopro"]["updates_per_batch"] = 1  # one update, as for the other methods
    engine = GuardedEngine(named, mu, v, GuardedConfig.from_config(config))
    if bf16:
        fp32_compute(model)

    def update(b):
        engine.update(lambda: rloo_loss(model, b))

    return update


def profile_counts(update, batch, n_updates: int, device: str) -> dict:
    """Host reads of device values and (on a GPU) kernel launches per update, from ``torch.profiler``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_updates):
            update(batch)
        if device == "cuda":
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    out = {"host_reads_per_update": sum(n == "aten::_local_scalar_dense" for n in names) / n_updates}
    if device == "cuda":
        out["kernel_launches_per_update"] = sum("LaunchKernel" in n for n in names) / n_updates
        out["syncs_per_update"] = sum("Synchronize" in n for n in names) / n_updates
    return out


def interleaved_times(args) -> dict:
    """Wall and CPU time per update of both methods, alternating in one process (fair under load)."""
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, n_params, n_lora = build(args.size, args.r, 0, device, args.dtype)
    model.train()
    batch = make_batch(model, args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # zo_guarded on a bf16 base switches the model to fp32 computation: timed in its own process only
    methods = METHODS if args.dtype == "fp32" else ("fo", "zo", "zo_one_sided")
    updates = {m: make_update(m, model, params, args.dtype) for m in methods}
    wall = {m: [] for m in updates}
    cpu = {m: [] for m in updates}
    for rep in range(args.reps + 1):
        for m, fn in updates.items() if rep % 2 == 0 else reversed(list(updates.items())):
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(batch)
            if device == "cuda":
                torch.cuda.synchronize()
            if rep:  # rep 0 is the warm-up
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    counts = {}
    for m, fn in updates.items():
        counts.update({f"{m}_{k}": v for k, v in profile_counts(fn, batch, args.profile_updates, device).items()})
    return {
        "phase": "interleaved",
        "device": device,
        "params_base": n_params,
        "params_lora": n_lora,
        **counts,
        **{f"{m}_time_min_s": min(wall[m]) for m in updates},
        **{f"{m}_time_median_s": sorted(wall[m])[len(wall[m]) // 2] for m in updates},
        **{f"{m}_cpu_min_s": min(cpu[m]) for m in updates},
    }


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cuda = device == "cuda"
    model, n_params, n_lora = build(args.size, args.r, 0, device, args.dtype)
    model.train()
    batch = make_batch(model, args, device)
    import gc

    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]

    update = make_update(args.worker, model, params, args.dtype)
    cpu_times = []

    def timed(fn, reps):
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        return times

    if args.phase == "update":
        # memory: peak of the first updates (AdamW state creation included) over the level after load
        with PeakMemory(cuda) as mem:
            times = timed(lambda: update(batch), args.reps + 1)
        peak = mem.mib
    else:
        del batch

        def iteration():
            update(rollout(model, args, device))

        with PeakMemory(cuda) as mem:
            times = timed(iteration, args.reps + 1)
        peak = mem.mib
    steady = times[1:]  # the first run warms allocator and lazy buffers
    result = {
        "method": args.worker,
        "phase": args.phase,
        "device": device,
        "params_base": n_params,
        "params_lora": n_lora,
        "peak_mib": peak,
        "time_min_s": min(steady),
        "time_mean_s": sum(steady) / len(steady),
        "cpu_min_s": min(cpu_times[1:]),
        "rss_after_load_mib": _rss_kb() / 1024,
    }
    return result


# --- the driver ---------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="default", help="model size (default ~106M params)")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="base model dtype (LoRA stays fp32)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (rollouts)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="timed updates per method (after one warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--profile-updates", type=int, default=3, help="profiled updates per method (counts)")
    ap.add_argument("--full", action="store_true", help="also a full iteration: generation + scoring + update")
    ap.add_argument("--cpu", action="store_true", help="force CPU even with a GPU")
    ap.add_argument("--out", default="results/benchmarks/zopro_update.json", help="JSON path; a .csv is written beside")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="check the arguments, print the plan and the parameter counts (model built on the meta device); run nothing",
    )
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=["update", "full", "interleaved"], default="update", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:
        _, n_params, n_lora = build(args.size, args.r, 0, "meta", args.dtype)
        plan = {"size": args.size, "params_base": n_params, "params_lora": n_lora, "methods": list(METHODS)}
        print(json.dumps({**plan, "phases": ["update", "full"] if args.full else ["update"], "out": args.out}))
        return
    if args.worker:
        print(json.dumps(interleaved_times(args) if args.phase == "interleaved" else worker(args)))
        return

    root = Path(__file__).resolve().parents[1]
    rows = []
    phases = ["update", "full"] if args.full else ["update"]
    for phase in phases:
        for method in METHODS:  # one fresh process per (method, phase)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--phase", phase] + list(
                argv if argv is not None else sys.argv[1:]
            )
            env = dict(
                os.environ,
                PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                TRL_EXPERIMENTAL_SILENCE="1",
                TOKENIZERS_PARALLELISM="false",
            )
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"worker {method}/{phase} failed")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "zo", "--phase", "interleaved"] + list(
        argv if argv is not None else sys.argv[1:]
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit("interleaved timing worker failed")
    inter = json.loads(proc.stdout.strip().splitlines()[-1])
    by = {(r["method"], r["phase"]): r for r in rows}
    fo = by[("fo", "update")]
    ratios = {}
    for phase in phases:
        f = by[("fo", phase)]
        for m in METHODS[1:]:
            z = by[(m, phase)]
            ratios[f"{phase}_memory_{m}_over_fo"] = z["peak_mib"] / f["peak_mib"] if f["peak_mib"] > 0 else float("nan")
            ratios[f"{phase}_time_{m}_over_fo"] = z["time_min_s"] / f["time_min_s"]
            ratios[f"{phase}_cpu_time_{m}_over_fo"] = z["cpu_min_s"] / f["cpu_min_s"]
    for m in METHODS[1:]:
        if f"{m}_time_min_s" in inter:
            ratios[f"interleaved_update_time_{m}_over_fo"] = inter[f"{m}_time_min_s"] / inter["fo_time_min_s"]
            ratios[f"interleaved_update_median_time_{m}_over_fo"] = (
                inter[f"{m}_time_median_s"] / inter["fo_time_median_s"]
            )
            ratios[f"interleaved_update_cpu_time_{m}_over_fo"] = inter[f"{m}_cpu_min_s"] / inter["fo_cpu_min_s"]
    summary = {
        "command": " ".join([os.path.relpath(sys.argv[0], root)] + list(argv if argv is not None else sys.argv[1:])),
        "setup": {
            k: getattr(args, k)
            for k in ("size", "r", "dtype", "batch", "prompt_len", "completion_len", "reps", "threads", "full")
        },
        "model": SIZES[args.size],
        "device": fo["device"],
        "params_base": fo["params_base"],
        "params_lora": fo["params_lora"],
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "methods": rows,
        "interleaved": inter,
        "ratios": ratios,
        "targets": {"update_memory_zo_over_fo": "<= 0.5", "update_time_zo_over_fo": "<= 1.0"},
    }
    out = Path(args.out)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    print(
        f"model: Llama {fo['params_base'] / 1e6:.1f}M params, LoRA r={args.r} {fo['params_lora'] / 1e6:.2f}M "
        f"trainable; batch {args.batch} x ({args.prompt_len}+{args.completion_len}) tokens; device {fo['device']}, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'phase':<8}{'method':<8}{'peak MiB':>10}{'min s':>9}{'mean s':>9}{'cpu s':>9}")
    for r in rows:
        print(
            f"{r['phase']:<8}{r['method']:<8}{r['peak_mib']:>10.1f}{r['time_min_s']:>9.3f}{r['time_mean_s']:>9.3f}{r['cpu_min_s']:>9.3f}"
        )
    print(
        "interleaved (one process, alternating), min wall per update: "
        + ", ".join(f"{m} {inter[f'{m}_time_min_s']:.3f} s" for m in METHODS if f"{m}_time_min_s" in inter)
    )
    for m in METHODS:
        if f"{m}_host_reads_per_update" in inter:
            launches, syncs = inter.get(f"{m}_kernel_launches_per_update"), inter.get(f"{m}_syncs_per_update")
            print(
                f"{m}: {inter[f'{m}_host_reads_per_update']:.0f} host reads per update"
                + (f", {launches:.0f} kernel launches, {syncs:.0f} synchronisations" if launches is not None else "")
            )
    for k, val in ratios.items():
        print(f"{k}: {val:.3f}")
    print(f"wrote {out} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
