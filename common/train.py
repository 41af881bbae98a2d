"""Training helpers that teach nothing about a paper: device, seeding, mixed precision, the lr schedule,
optimizer parameter groups, atomic checkpoints, the JSONL log and metrics.json, and the run's safety rails (an
out_dir that is not silently reused, the random states an exact --resume needs, a non-finite loss that stops the
run, a count of unreadable videos with a limit)."""

import contextlib
import glob
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.annotations import set_strict, skipped_rows
from common.config import config_to_dict
from common.errors import UserError, check_inputs, os_error


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
    g = torch.Generator().manual_seed(0)  # its own draws: a run's seeded ones do not depend on whether it probed
    mats = {name: [torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2)]
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


def cpu_name():
    """The CPU's model name, its widest vector ISA (avx512_bf16 / avx512f / avx2) and core count, for tables."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags")).split()
        isa = "avx512_bf16" if "avx512_bf16" in flags else "avx512f" if "avx512f" in flags else \
            "avx2" if "avx2" in flags else "no avx2"
        name += f" ({isa}, {os.cpu_count()} cores)"
    except (OSError, StopIteration):
        pass
    return name


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


def compile_blocks(blocks, mode, device, train_steps, cxx=None, min_steps=200):
    """torch.compile each transformer block in place (mode "auto" | "on" | "off") -> a one-line note for the log.

    Inductor fuses what sits between the matmuls (layer norms, GELU, residual adds, bf16 casts, attention
    reshapes) into generated kernels; for these small models that is most of what is not a matmul. The first steps
    pay for compiling (tens of seconds on a CPU the first time; the kernels are then cached on disk) and evaluation
    under no_grad compiles once more, so "auto" compiles only runs of at least `min_steps` training steps (not the
    tests' few-step runs, not --eval). Shapes are dynamic: text lengths and frame counts that change between
    batches reuse the kernels. Weights and their names are untouched, so checkpoints are the same either way. On a
    CPU inductor writes C++: with no C++ compiler on the PATH (`cxx` overrides the lookup, for tests) the blocks
    stay eager; on mps they stay eager too."""
    if mode == "off":
        return "compile: off"
    if mode == "auto" and train_steps < min_steps:
        return f"compile: off (auto: fewer than {min_steps} training steps)"
    if device.type == "mps":
        return "compile: off on mps (eager)"
    if cxx is None:
        cxx = shutil.which("g++") or shutil.which("clang++") or shutil.which("c++") or ""
    if device.type == "cpu" and not cxx:
        return "compile: off, no C++ compiler (g++ / clang++) on the PATH for inductor's CPU kernels (eager)"
    for block in blocks:
        block.compile(dynamic=True)
    return f"compile: {len(blocks)} transformer blocks with torch.compile (the first steps include compiling them)"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, precision):
    """One mixed-precision context for the whole loop body: bf16 autocast on CPU and CUDA (no GradScaler needed
    for bf16), or nothing for fp32. Similarities and losses should still be computed in fp32 by the caller.

    On CPU, bf16 attention also takes SDPA's plain math backend: the fused CPU flash kernel's bf16 backward is
    slower than the math path for our short (17-100 token) sequences (tests/bench.py shows the step time).
    CUDA keeps the fused kernels. The returned object can be
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


def loader_settings(num_workers, device, log=print):
    """DataLoader keyword arguments for this machine. Workers: at most the cores this rank has (the machine's
    cores over torchrun's LOCAL_WORLD_SIZE; `--paper` asks for 8-16, and a 2-core machine running 16 decoders
    only thrashes). With workers: persistent (no re-fork, no re-import, every epoch). On CUDA: pinned memory (the
    loop's non_blocking copies then overlap the step) and 4 batches prefetched per worker, enough to ride out
    a slow clip while the GPU works (the log's `data wait` says whether it does)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    workers = min(num_workers, cores)
    if workers < num_workers:
        log(f"num_workers={num_workers} but this rank has {cores} core(s): using {workers} loader workers")
    kwargs = dict(num_workers=workers, pin_memory=device.type == "cuda")
    if workers:
        kwargs.update(persistent_workers=True, prefetch_factor=4 if device.type == "cuda" else 2)
    return kwargs


def data_bound(wait_pct, num_workers, threshold=20.0):
    """A note for the log line when the loop waited on its DataLoader for more than threshold % of the interval:
    the loader, not the model, is the bottleneck (README, "Real data at its real size")."""
    if wait_pct <= threshold:
        return ""
    return (f" | data-bound: the loader (workers {num_workers}) is the bottleneck; more cores, or "
            f"`python -m data.prepare` the videos")


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


PARTIAL = ".partial-"  # prefix of a checkpoint being written; a kill mid-write leaves one, the next start removes it


def save_checkpoint(state, path):
    """torch.save to `.partial-*.tmp` in the same folder, then os.replace: a kill mid-write never leaves half a
    checkpoint (the previous one stays whole). Weights that are not finite are never written: the last good
    checkpoint is kept and the run stops (a NaN checkpoint would be resumed from, or evaluated, later)."""
    bad = [k for k, v in state.get("model", {}).items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"error: step {state.get('step')}: {len(bad)} weight tensors are not finite (first: "
                         f"{bad[0]}); {path} was not overwritten and keeps the last good weights. Lower --lr?")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=PARTIAL, suffix=".tmp")
    except OSError as e:
        raise os_error(e, path, "cannot write") from None
    os.close(fd)
    try:
        with open(tmp, "wb") as f:  # a Python file, not a path: a full disk is then an OSError saying so (torch's
            torch.save(state, f)    # own writer reports it as "RuntimeError: ... unexpected pos")
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a quota, a lost mount: the previous checkpoint is untouched
        raise os_error(e, path, "cannot write", f"the last good {os.path.basename(path)} there (if one was written) "
                                                f"is kept whole, --resume continues from it") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, paper=None, need=()):
    """A checkpoint read with weights_only=True: no pickled code runs (common/weights.py; classes it names become
    inert placeholders). `paper` = the reading file's tag: a checkpoint another paper file wrote is refused; `need`
    = keys it must hold (--resume: model, optimizer, step), else a message instead of a KeyError later."""
    from common.weights import read_checkpoint
    try:
        ck = read_checkpoint(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # a pickle weights_only refuses, a truncated or foreign file
        raise SystemExit(f"error: cannot read {path} as a checkpoint ({type(e).__name__}: {str(e)[:300]})") from None
    check_paper(ck, paper, path)
    missing = [k for k in need if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise SystemExit(f"error: {path} is not a checkpoint this code wrote (no {', '.join(missing)})")
    return ck  # on the CPU; load_state_dict copies to the model's device


def check_paper(ck, paper, path):
    """A checkpoint tagged by another paper file (ours carry "paper") is refused: its tensors would not fit."""
    if paper and isinstance(ck, dict) and ck.get("paper") not in (None, paper):
        raise SystemExit(f"error: {path} is a checkpoint of {ck['paper']}.py, not of {paper}.py")


LOCK = ".lock"  # out_dir/.lock: held (fcntl.flock) by the run writing there, and holding its process id
_HELD = {}  # real path of an out_dir -> the open lock file this process holds on it


def lock_out_dir(out_dir, resume=False):
    """One writer per out_dir: an exclusive flock on out_dir/.lock, held until this process ends (the OS releases
    it then, SIGKILL included, so a dead run never blocks the next), with our process id written into it. A second
    run on the same out_dir (or a --resume of a run still running) is refused at once, naming the other process.
    A process that already holds the lock (main() called twice, as the tests do) keeps it. Without fcntl
    (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        return
    key = os.path.realpath(out_dir)
    if key in _HELD:
        return
    path = os.path.join(out_dir, LOCK)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise os_error(e, out_dir, "--out_dir", "a run writes its checkpoints there") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        what = (f"--resume refused: the run in {out_dir} is still running" if resume else
                f"{out_dir} is in use by another run")
        raise UserError(f"{what} (process {pid}, holding {path}); two runs would write the same ckpt.pt, log.jsonl "
                        f"and metrics.json. Wait for it to end (or stop it: kill {pid}), or choose another --out_dir") \
            from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _HELD[key] = f  # kept open: closing it would release the lock


def prepare_out_dir(out_dir, resume=False, overwrite=False):
    """Make out_dir safe to write: a folder (created if need be) that we can write, locked for this run
    (lock_out_dir); remove half-written checkpoints a killed run left (.partial-*.tmp); refuse to write over another
    run's files unless --resume (continue it) or --overwrite (start afresh, its files removed)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is a file, not a folder; choose another --out_dir (or move the file)")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise os_error(e, out_dir, "cannot create --out_dir", "choose a folder you can write") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir={out_dir} is not writable (permission denied); check its permissions or choose "
                        f"another --out_dir")
    lock_out_dir(out_dir, resume)  # before anything is removed or written: the other run's files are its own
    for tmp in glob.glob(os.path.join(out_dir, PARTIAL + "*.tmp")):
        os.remove(tmp)
        print(f"removed {tmp}: a checkpoint write that a killed run left unfinished")
    used = [f for f in ("ckpt.pt", "best.pt", "metrics.json", "log.jsonl") if os.path.exists(os.path.join(out_dir, f))]
    if resume:
        if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            raise SystemExit(f"error: --resume, but {out_dir}/ckpt.pt does not exist")
    elif used and not overwrite:
        raise SystemExit(f"error: {out_dir} holds another run's files ({', '.join(used)}); pass --resume to continue "
                         f"that run, --overwrite to replace it, or choose another --out_dir")
    elif used:
        for f in used:
            os.remove(os.path.join(out_dir, f))
        print(f"--overwrite: removed {', '.join(used)} from {out_dir}")


def rng_states():
    """Every random state the loop draws from (python, numpy, torch, cuda), as plain tensors / lists so that a
    checkpoint holding them still loads with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate(_tuples(states["python"]))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _tuples(x):  # random.setstate wants the nested tuples that a save may have turned into lists
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def check_finite(step, **losses):
    """Stop the run at the step a loss term turns NaN / inf, naming every term, before backward() can spread the
    non-finite values into the weights (the last checkpoint stays the last good one)."""
    values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in losses.items()}
    if not all(math.isfinite(v) for v in values.values()):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise SystemExit(f"error: non-finite loss at step {step + 1}: {terms}. The run stops here; the last "
                         f"checkpoint is kept as it was. Lower --lr (or raise --warmup_steps)?")


class BadVideos:
    """Distinct unreadable video files met by a run (missing, empty, truncated, not a video, too few frames).

    Each is named once in the log and on the console; `skipped` counts the clips dropped from batches. When more
    than `max_share` of the `total` training videos is unreadable the run stops, naming the first files: a corpus
    that bad needs fixing, not training on."""

    def __init__(self, total, max_share, log=print, logger=None):
        self.total, self.max_share, self.log, self.logger = total, max_share, log, logger
        self.errors, self.skipped = {}, 0  # path -> first error; clips dropped

    def add(self, failures, skipped=None):
        """failures: (path, error) pairs of one batch (or of a preload pass)."""
        self.skipped += len(failures) if skipped is None else skipped
        for path, error in failures:
            if path not in self.errors:
                self.errors[path] = error
                self.log(f"warning: unreadable video {path}: {error} (skipped; {len(self.errors)} so far)")
                if self.logger:
                    self.logger.log({"bad_video": path, "error": error})
        if len(self.errors) > self.max_share * self.total:
            first = "\n  ".join(f"{p}: {e}" for p, e in list(self.errors.items())[:10])
            raise SystemExit(f"error: {len(self.errors)} of {self.total} training videos are unreadable, more than "
                             f"--max_bad_videos={self.max_share} of them. First ones:\n  {first}")

    def next_batch(self, batches, max_empty):
        """-> (the next batch from `batches` that holds a readable clip, batches drawn for it). Each draw's
        unreadable files are added here; `max_empty` batches in a row without a readable clip stop the run."""
        for drawn in range(1, max_empty + 1):
            batch = next(batches)
            self.add(batch.pop("bad_videos"), batch.pop("skipped"))
            if "video" in batch:
                return batch, drawn
        raise SystemExit(f"error: {max_empty} batches in a row held no readable video (see the warnings)")

    def state(self):
        return {"errors": dict(self.errors), "skipped": self.skipped}

    def load(self, state):
        """The counts of an interrupted run (its checkpoint's "bad_videos"; None: nothing to load)."""
        if state:
            self.errors, self.skipped = dict(state["errors"]), state["skipped"]

    def metrics(self, prefix):
        return {f"{prefix}/bad_videos": len(self.errors), f"{prefix}/skipped_clips": self.skipped}


class JsonlLogger:
    """Appends one JSON object per line to `path` (adding a wall-clock "time"); a no-op when disabled, so the
    training loop never asks whether it is the main process."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step):
        """On --resume: drop the records a killed run wrote after its last checkpoint (step > `step`), so that the
        resumed run's records are not duplicated."""
        if self.enabled and os.path.exists(self.path):
            keep = [line for line in open(self.path) if line.strip() and json.loads(line).get("step", 0) <= step]
            with open(self.path, "w") as f:
                f.writelines(keep)

    def log(self, record):
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            except OSError as e:  # a full disk: stop here, naming it (the last checkpoint is kept)
                raise os_error(e, self.path, "cannot write") from None


def write_metrics(out_dir, metrics):
    """metrics.json: a flat {"<task>/<metric>": number} object, keys sorted, written atomically."""
    path = os.path.join(out_dir, "metrics.json")
    tmp = path + ".tmp"
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({k: float(v) for k, v in sorted(metrics.items())}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a full disk: the numbers go into the error line, so that they are not lost
        if os.path.exists(tmp):
            os.remove(tmp)
        raise os_error(e, path, "cannot write", "the metrics were: " + json.dumps(
            {k: round(float(v), 4) for k, v in sorted(metrics.items())})) from None
    return path


def format_table(metrics, title=None):
    """A small aligned text table of a metrics dict, for the end-of-run summary."""
    if not metrics:
        return "(no metrics)"
    width = max(len(k) for k in metrics)
    lines = [title] if title else []
    lines += [f"{k:<{width}}  {v:8.2f}" for k, v in sorted(metrics.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# A run's frame, the same in the three paper files: start_run, the training state (save_state / resume_state),
# StepClock (step timing and data wait), log_step, data_report and end_run. main() calls them by name.

def start_run(cfg, default_root, needs):
    """Everything before a model is built -> (dist, logger).

    --strict (common/annotations.py), the process group (common/dist.py), precision (cfg.precision becomes "bf16"
    or "fp32", the reason printed), seeds (seed + rank), the built-in corpus (written on first use and rewritten
    when outdated, when data_root is `default_root`), the inputs (`needs`: paths under data_root, and every weights
    or vocab file a flag names: a missing one is one error line, common/errors.py), out_dir (another run's files
    are refused unless --resume / --overwrite, and it is locked: one run writes into it) and the JSONL log (rank 0
    writes it)."""
    from common.dist import barrier, print0, setup_distributed  # (common/dist.py imports this module)
    set_strict(cfg.strict)
    dist = setup_distributed(cfg.device)
    cfg.precision, why = choose_precision(cfg.precision, dist.device)
    print0(why)
    seed_everything(cfg.seed + dist.rank)
    if cfg.data_root == default_root:
        from data.synthetic import ensure_corpus  # (the repo's corpus generator; common/ itself reads no corpus)
        if dist.is_main:
            ensure_corpus(cfg.data_root)
        barrier()
    check_inputs(cfg, needs, default_root)
    if dist.is_main:
        prepare_out_dir(cfg.out_dir, cfg.resume, cfg.overwrite)
    barrier()
    return dist, JsonlLogger(os.path.join(cfg.out_dir, "log.jsonl"), enabled=dist.is_main)


def save_state(path, model, optimizer, step, cfg, paper, bad, **extra):
    """ckpt.pt with everything an exact --resume needs: weights, optimiser, step, the config, the random states,
    the unreadable videos met so far, and the paper's own entries (`extra`: e.g. how many batches were drawn)."""
    save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                         config=config_to_dict(cfg), paper=paper, rng=rng_states(), bad_videos=bad.state(), **extra),
                    path)


def resume_state(path, model, optimizer, paper, logger):
    """--resume: ckpt.pt's weights and optimiser state loaded, the log's records after its step dropped (a killed run
    wrote them after its last checkpoint) -> the checkpoint dict (step, rng, bad_videos and the paper's entries).
    The random states are set by the caller once its data stream has started (set_rng_states)."""
    from common.dist import print0
    ck = load_checkpoint(path, paper=paper, need=("model", "optimizer", "step"))
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    logger.truncate_after(ck["step"])
    print0(f"resumed from {path} at step {ck['step']}")
    return ck


class StepClock:
    """Step timing and data-wait accounting: wall time, seconds blocked on the data loader and clips trained, per
    logging interval (`interval`) and for the whole loop (`data_wait_pct`: validation and checkpoints included)."""

    def __init__(self):
        self.start = self.t0 = time.time()
        self.wait = self.wait_total = 0.0
        self.clips = self.steps = 0

    @contextlib.contextmanager
    def waiting(self):
        """`with clock.waiting(): batch = next(batches)`: the time inside counts as waiting for data."""
        t = time.time()
        yield
        self.wait += time.time() - t

    def tick(self, clips):
        """One optimiser step done, on `clips` clips (all ranks)."""
        self.clips, self.steps = self.clips + clips, self.steps + 1

    def interval(self):
        """-> ms_per_step, clips_per_s and data_wait_pct since the last call; the next interval starts now."""
        dt = max(1e-9, time.time() - self.t0)
        rec = {"ms_per_step": 1000 * dt / max(1, self.steps), "clips_per_s": self.clips / dt,
               "data_wait_pct": 100 * self.wait / dt}
        self.wait_total += self.wait
        self.t0, self.clips, self.steps, self.wait = time.time(), 0, 0, 0.0
        return rec

    def data_wait_pct(self):
        """The share of the loop so far spent waiting for data, %."""
        return 100 * (self.wait_total + self.wait) / max(1e-9, time.time() - self.start)


def log_step(logger, step, numbers, clock, bad, num_workers, write=print):
    """One training record into the log (`numbers`: losses, lr, ...; then speed, data wait and the unreadable
    videos so far) and, on rank 0, one console line, ending in a hint when the loop mostly waits for data."""
    rec = {"step": step, **numbers, **clock.interval(), "bad_videos": len(bad.errors), "skipped_clips": bad.skipped}
    logger.log(rec)
    if logger.enabled:
        shown = " ".join(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4g}" for k, v in numbers.items())
        write(f"step {step:5d} | {shown} | {rec['ms_per_step']:.0f} ms/step | {rec['clips_per_s']:.1f} clips/s"
              f" | data wait {rec['data_wait_pct']:.0f}%" + (f" | bad videos {len(bad.errors)}" if bad.errors else "")
              + data_bound(rec["data_wait_pct"], num_workers))
    return rec


def data_report(bad, clock, prefix):
    """The end-of-training data metrics: unreadable training videos and the clips dropped for them, bad annotation
    rows (one console line when there were any; each was named when met) and the loop's data-wait share."""
    from common.dist import print0
    metrics = {**bad.metrics(prefix), "data/bad_rows": len(skipped_rows())}
    if bad.errors or skipped_rows():
        print0(f"skipped: {len(bad.errors)} unreadable training videos ({bad.skipped} clips), "
              f"{len(skipped_rows())} bad annotation rows (named above and in the log)")
    metrics[f"{prefix}/data_wait_pct"] = clock.data_wait_pct()
    return metrics


def end_run(cfg, dist, metrics, title):
    """metrics.json and the summary table (rank 0), then the process group closed -> metrics."""
    from common.dist import cleanup, print0
    if dist.is_main:
        write_metrics(cfg.out_dir, metrics)
        print0(format_table(metrics, title=f"{title} ({cfg.out_dir}/metrics.json)"))
    cleanup()
    return metrics
