"""Training helpers that teach nothing about a paper: device, seeding, mixed precision, the lr schedule,
optimizer parameter groups, atomic checkpoints, the JSONL log and metrics.json."""

import contextlib
import json
import math
import os
import random
import tempfile
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def resolve_device(name="auto", has_cuda=None, has_mps=None):
    """"auto" -> cuda, then Apple mps, then cpu (the first one present). An explicit device that is absent is an
    error. `has_cuda` / `has_mps` override the detection (for tests)."""
    has_cuda = torch.cuda.is_available() if has_cuda is None else has_cuda
    if has_mps is None:
        has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if has_cuda else "mps" if has_mps else "cpu"
    elif name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise SystemExit(f"error: --device must be auto, cpu, cuda or mps, got {name!r}")
    if name.startswith("cuda") and not has_cuda:
        raise SystemExit(f"error: --device={name} but no CUDA device is available")
    if name == "mps" and not has_mps:
        raise SystemExit("error: --device=mps but this PyTorch build or machine has no Apple MPS device")
    if name == "mps" and os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") != "1":
        # An op without an MPS kernel otherwise stops the run; with the fallback it runs on the CPU (slower,
        # same result). Similarities, losses and metrics are computed in fp32 on every device.
        print("note: on mps, set PYTORCH_ENABLE_MPS_FALLBACK=1 so that ops without an MPS kernel run on the CPU")
    return torch.device(name)


def matmul_rates(device, n=256, budget_seconds=0.05, max_rounds=20):
    """Measured GFLOP/s of an n x n matmul in fp32 and in bf16 on `device`: the start-up probe behind
    precision="auto". The two dtypes are timed in alternation and each keeps its fastest matmul, so a busy machine
    slows both alike; on a CPU the probe runs on one thread (the ratio is what matters, and a thread that waits for a
    busy core would otherwise dominate the timing). A few ms where bf16 is native; on a CPU without native bf16 one bf16 matmul of this size
    takes ~0.1 s (PyTorch falls back to a path ~150x slower than fp32) and the probe stops after two of them."""
    mats = {name: [torch.randn(n, n, device=device).to(dtype) for _ in range(2)]
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = {name: float("inf") for name in mats}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    start = time.perf_counter()
    for round_ in range(max_rounds + 1):
        for name, (a, b) in mats.items():
            t0 = time.perf_counter()
            (a @ b).sum().item()  # .item() waits for an asynchronous device
            if round_ > 0:  # round 0 is the warm-up (kernel selection)
                best[name] = min(best[name], time.perf_counter() - t0)
        if round_ > 0 and time.perf_counter() - start >= budget_seconds:
            break
    torch.set_num_threads(threads)
    return {name: 2 * n ** 3 / seconds / 1e9 for name, seconds in best.items()}


def choose_precision(requested, device, rates=None, min_speedup=1.2):
    """-> "bf16" or "fp32" for a run, and a one-line reason to print.

    "auto": bf16 where the device runs bf16 matmuls at least `min_speedup` x faster than fp32 (a GPU since Ampere,
    a CPU with AVX512-BF16 / AMX), else fp32, decided by `matmul_rates` (pass `rates` to skip the probe). An
    explicit "bf16" is kept but warned about when the probe finds bf16 slower than fp32. "fp32" is never probed."""
    if requested not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"error: --precision must be auto, bf16 or fp32, got {requested!r}")
    if requested == "fp32":
        return "fp32", "precision fp32 (asked for)"
    rates = rates or matmul_rates(device)
    speedup = rates["bf16"] / rates["fp32"]
    measured = f"{device.type} matmul {rates['fp32']:.0f} GFLOP/s fp32, {rates['bf16']:.0f} GFLOP/s bf16"
    if requested == "bf16":
        if speedup < 1:
            return "bf16", (f"warning: precision bf16 (asked for) runs {1 / speedup:.0f}x SLOWER than fp32 on this "
                            f"{device.type} ({measured}): it has no native bf16; use --precision=auto or fp32")
        return "bf16", f"precision bf16 (asked for; {measured})"
    chosen = "bf16" if speedup >= min_speedup else "fp32"
    return chosen, f"precision auto -> {chosen} ({measured})"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, precision):
    """One mixed-precision context for the whole loop body: bf16 autocast on CPU and CUDA (no GradScaler needed
    for bf16), or nothing for fp32. Similarities and losses should still be computed in fp32 by the caller.

    On CPU, bf16 attention also takes SDPA's plain math backend: the fused CPU flash kernel's bf16 backward is
    slow for our short (17-100 token) sequences — a default all_in_one step took ~0.6 s of CPU time with it and
    ~0.42 s with the math path (tests/bench.py). CUDA keeps the fused kernels. The returned object can be
    entered again and again, like torch.autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    assert precision == "bf16", f"precision must be bf16 or fp32 (auto is resolved by choose_precision), got {precision}"
    return _Bf16(device)


class _Bf16:
    """bf16 autocast, plus the math attention backend on CPU; fresh inner contexts on every `with`."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
        if self.device.type == "cpu":
            self.stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return self

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def lr_at(step, max_steps, base_lr, warmup_steps, schedule="cosine", min_lr_ratio=0.0):
    """Linear warmup over `warmup_steps`, then cosine / linear decay to min_lr_ratio * base_lr, or constant."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * decay)


def param_groups(model, weight_decay):
    """AdamW groups: decay on matrices (linear / conv weights), none on biases, norms, embeddings of rank 1
    and learned tokens (cls_token, position / temporal tables are >= 2-D but are excluded by name)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "token" in name or "pos_embed" in name or "temporal_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(state, path):
    """torch.save to a temporary file in the same folder, then os.replace: a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


class JsonlLogger:
    """Appends one JSON object per line to `path` (adding a wall-clock "time"); a no-op when disabled, so the
    training loop never asks whether it is the main process."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def write_metrics(out_dir, metrics):
    """metrics.json: a flat {"<task>/<metric>": number} object, keys sorted, written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({k: float(v) for k, v in sorted(metrics.items())}, f, indent=1)
    os.replace(tmp, path)
    return path


def format_table(metrics, title=None):
    """A small aligned text table of a metrics dict, for the end-of-run summary."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    lines = [title] if title else []
    lines += [f"{k:<{width}}  {v:8.2f}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)
