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


def resolve_device(name="auto"):
    """"auto" -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device=cuda but no CUDA device is available")
    return torch.device(name)


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
    assert precision == "bf16", f"precision must be bf16 or fp32, got {precision}"
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
