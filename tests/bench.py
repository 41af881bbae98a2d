"""Speed of each paper's training step, at its CPU default and at its paper size, and the FLOPs table.

    python tests/bench.py                       # every paper, default + paper size, fp32 (+ bf16 where native)
    python tests/bench.py --papers egovlp --configs default --steps 10
    python tests/bench.py --device cuda --paper_batch 16      # on a GPU
    python tests/bench.py --flops               # the FLOPs / parameters table (batch 1, forward), no timing
    python tests/bench.py --data                # the data path at paper size: tests/bench_data.py
    python tests/bench.py --papers all_in_one --configs default --data_steps 0 --profile   # + where the time goes

Each row runs in its own process (so its peak memory is its own) and times forward + backward + AdamW on random
inputs of the config's shapes, after two warm-up steps: all_in_one its real pre-training step (VTC on the batch,
VTM + MLM on the joint share); oa_trans its real four-stream step (anchor regions and tags included); egovlp its
dual encoder with a symmetric InfoNCE on the batch doubled by the scene negatives (EgoNCE only changes the loss's
mask, not its matmuls). The columns:
- ms/step: median wall time; clips/s: clips of the batch (egovlp: with its negatives) per second.
- GFLOP/step: forward + backward FLOPs counted by torch.utils.flop_counter (a multiply-add = 2 FLOPs; matmuls,
  convolutions and attention, counted through SDPA's math decomposition; elementwise ops are not counted).
- MFU: GFLOP/step / step time / the machine's peak, where the peak is a 2048 x 2048 matmul (4096 on CUDA) in the
  same dtype measured at the start of the same run.
- peak MB: the process's peak resident memory (CPU), or the peak allocated CUDA memory.
- data wait: the share of wall time the real training loop spent waiting for its DataLoader, read from the log of
  `python <paper>.py --pretrain` run for --data_steps steps (default rows, in the precision `auto` picks: the faster
  step, so the larger share; the run is stopped there).
bf16 rows run only where the start-up probe of common.train finds bf16 faster than fp32 (or with --bf16 always).
The table is printed and written as markdown to --out. Not a test: pytest does not collect it.
"""

import argparse
import importlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common.train as train  # noqa: E402
from common.config import parse_config  # noqa: E402

VOCAB = 1000  # the synthetic corpus' vocab is a few hundred words; the paper presets set 30522 themselves
TEXT_LEN = 20  # caption tokens in every row
CONFIGS = {  # paper -> {row name: flags}; paper rows take --batch_size from --paper_batch
    "all_in_one": {"default": ["--pretrain"], "paper Ti": ["--pretrain", "--Ti"], "paper B": ["--pretrain", "--B"]},
    "egovlp": {"default": ["--pretrain"], "paper": ["--paper"]},
    "oa_trans": {"default T=1": ["--pretrain", "--num_frames=1"], "default T=4": ["--pretrain"],
                 "paper": ["--paper"]},
}


def infonce(t, v, temperature=0.05):
    sim = F.normalize(t.float(), dim=-1) @ F.normalize(v.float(), dim=-1).t() / temperature
    labels = torch.arange(len(sim), device=sim.device)
    return F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)


def setup(paper, flags, device):
    """-> (model, step loss function, clips per step, config) for a paper's config given as command-line flags."""
    mod = importlib.import_module(paper)
    cfg = parse_config(mod.Config, flags, mod.PRESETS)
    if getattr(cfg, "vocab_size", None) == 0:
        cfg.vocab_size = VOCAB
    g = torch.Generator().manual_seed(0)
    B, L = cfg.batch_size, TEXT_LEN
    ids = lambda n, length=L: torch.randint(5, VOCAB, (n, length), generator=g).to(device)
    ones = lambda n, length=L: torch.ones(n, length, dtype=torch.long, device=device)
    if paper == "all_in_one":
        model = mod.AllInOne(cfg).to(device)
        n = max(2, round(cfg.joint_fraction * B))
        text = ids(B)
        mlm_labels = torch.full((B, L), -100, device=device)
        mlm_labels[:, 3] = text[:, 3]
        batch = dict(video=torch.randn(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g).to(device),
                     text_ids=text, text_mask=ones(B), mlm_ids=text.clone(), mlm_labels=mlm_labels,
                     vtm_video_index=torch.randperm(n, generator=g).to(device),
                     vtm_labels=torch.randint(2, (n,), generator=g).to(device))
        return model, lambda: model(batch, "pretrain")["loss"], B, cfg
    if paper == "egovlp":
        model = mod.FrozenInTime(cfg, cfg.vocab_size).init_weights(cfg.time_init).to(device)
        B = B * (2 if cfg.negatives == "scene" else 1)
        video = torch.randn(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g).to(device)
        text = ids(B)
        return model, lambda: infonce(*model(text, ones(B), video)), B, cfg
    model = mod.OATrans(cfg, VOCAB).to(device)
    S, N, Lt = cfg.img_size, (cfg.img_size // cfg.patch_size) ** 2, 8
    inputs = dict(video=torch.randn(B, cfg.num_frames, 3, S, S, generator=g).to(device), text=(ids(B), ones(B)))
    if cfg.objects == "on":  # the object streams of the paper's loss: one region group and one tag group
        inputs.update(anchor=torch.randn(B, 3, S, S, generator=g).to(device),
                      regions=(torch.rand(B, 1, N, generator=g) < 0.3).to(device),
                      tags=(ids(B, Lt), ones(B, Lt)), tag_groups=torch.ones(B, 1, Lt, dtype=torch.bool, device=device))
    terms = mod.LOSS_TERMS[cfg.oa_loss] if cfg.objects == "on" else mod.LOSS_TERMS[cfg.oa_loss][:1]
    weights = dict(main_weight=cfg.main_weight, tags_weight=cfg.tags_weight, regions_weight=cfg.regions_weight)
    return model, lambda: mod.oa_trans_loss(model(**inputs), terms, weights, cfg.temperature)[0], B, cfg


def step_flops(model, loss_fn):
    """Forward + backward FLOPs of one step (SDPA through its math decomposition, so attention is counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_rate(device, dtype):
    """Measured GFLOP/s of a large square matmul in `dtype`: the denominator of MFU."""
    n = 4096 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    (a @ a).sum().item()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        (a @ a).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


OP_GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
             "attention": ("scaled_dot_product",), "gelu": ("aten::gelu",)}


def op_shares(step, n=3):
    """Share (%) of the CPU ops' self time per group of OP_GROUPS over n steps, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {g: 100 * sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / total
              for g, keys in OP_GROUPS.items()}
    return dict(shares, other=100 - sum(shares.values()))


def run_row(paper, flags, device, precision, steps, peak, profile=False):
    """Time one config in this process -> dict of the row's numbers (+ op_shares with profile, CPU only)."""
    torch.manual_seed(0)
    model, loss_fn, clips, cfg = setup(paper, flags, device)
    ctx = train.autocast(device, precision)
    with ctx:
        flops = step_flops(model, loss_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))  # as the paper files
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    def step():
        with ctx:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    shares = op_shares(step) if profile and device.type == "cpu" else None
    mem = (torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return dict(ms=1000 * sec, clips_s=clips / sec, gflop=flops / 1e9, mfu=100 * flops / 1e9 / sec / peak,
                mem_mb=mem, params_m=sum(p.numel() for p in model.parameters()) / 1e6, batch=cfg.batch_size,
                shares=shares)


def data_wait(paper, precision, steps):
    """Run the paper's real default training loop until its log passes `steps`, stop it, and return the data-wait
    share of the last logged interval (%), or None if the run ended without one."""
    with tempfile.TemporaryDirectory() as out:
        log = Path(out) / "log.jsonl"
        cmd = [sys.executable, f"{paper}.py", "--pretrain", f"--precision={precision}", f"--out_dir={out}",
               "--log_every=25"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while proc.poll() is None:
                time.sleep(1)
                records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
                records = [r for r in records if "data_wait_pct" in r]
                if records and records[-1]["step"] >= steps:
                    return records[-1]["data_wait_pct"]
            return None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def flops_table():
    """Forward FLOPs and parameters at batch 1 (meta tensors: nothing is allocated)."""
    rows = []
    aio = importlib.import_module("all_in_one")
    ego = importlib.import_module("egovlp")
    for size, paper_gflops in (("Ti", None), ("S", None), ("B", 58.7)):
        cfg = parse_config(aio.Config, ["--pretrain", f"--{size}"], aio.PRESETS)
        with torch.device("meta"):
            model = aio.AllInOne(cfg)
            ids, mask = torch.zeros(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)
            video = torch.zeros(1, 3, 3, 224, 224)
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                model.forward_joint(ids, mask, video)
        rows.append((f"All-in-one-{size}, joint pass, 3 frames + 40 tokens", aio.backbone_parameters(model),
                     fc.get_total_flops(), paper_gflops))
    for frames, paper_gflops in ((4, None), (8, 217.3), (16, None)):
        cfg = parse_config(ego.Config, ["--paper", f"--num_frames={frames}"], ego.PRESETS)
        with torch.device("meta"):
            model = ego.FrozenInTime(cfg, 30522)
            video = torch.zeros(1, frames, 3, 224, 224)
            ids, mask = torch.zeros(1, 40, dtype=torch.long), torch.ones(1, 40, dtype=torch.long)
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                model(ids, mask, video)
        rows.append((f"Frozen ViT-B + DistilBERT, {frames} frames + 40 tokens", sum(p.numel() for p in model.parameters()),
                     fc.get_total_flops(), paper_gflops))
    # All-in-one: the backbone and text embeddings (the paper's 12M / 33M / 110M), without the pre-training heads
    lines = ["| model (batch 1, forward) | parameters | GFLOPs (multiply-add = 2) | GMACs (= GFLOPs / 2) | paper |",
             "|---|---|---|---|---|"]
    for name, params, flops, paper in rows:
        lines.append(f"| {name} | {params / 1e6:.1f} M | {flops / 1e9:.1f} | {flops / 2e9:.1f} | "
                     f"{f'{paper} G' if paper else '-'} |")
    return "\n".join(lines)


def main():
    if "--data" in sys.argv[1:]:  # the data path: tests/bench_data.py (its flags follow --data)
        import bench_data
        return bench_data.main([a for a in sys.argv[1:] if a != "--data"])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--papers", default="all_in_one,egovlp,oa_trans")
    p.add_argument("--configs", default="", help="comma list of row names (default: all of each paper's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after 2 warm-up steps)")
    p.add_argument("--paper_batch", type=int, default=2, help="batch size of the paper-size rows")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 rows even where the probe finds bf16 slower")
    p.add_argument("--data_steps", type=int, default=50, help="steps of each default's real loop for the data-wait "
                                                              "column (0 = skip)")
    p.add_argument("--out", default="runs/bench/bench.md")
    p.add_argument("--flops", action="store_true", help="print the FLOPs / parameters table and exit")
    p.add_argument("--profile", action="store_true", help="also the share of step time per op group "
                                                          "(matmul, attention, GELU; torch.profiler, CPU)")
    p.add_argument("--row", default="", help=argparse.SUPPRESS)  # internal: paper|row|precision|peak
    args = p.parse_args()
    if args.flops:
        print(flops_table())
        return
    device = train.resolve_device(args.device)
    if args.row:  # a child process: one row, printed as JSON
        paper, row, precision, peak = args.row.split("|")
        flags = CONFIGS[paper][row] + ([f"--batch_size={args.paper_batch}"] if row.startswith("paper") else [])
        print(json.dumps(run_row(paper, flags, device, precision, args.steps, float(peak), args.profile)))
        return

    precisions = ["fp32"]
    rates = train.matmul_rates(device)
    if args.bf16 or train.choose_precision("auto", device, rates)[0] == "bf16":
        precisions.append("bf16")
    peaks = {pr: peak_rate(device, torch.float32 if pr == "fp32" else torch.bfloat16) for pr in precisions}
    machine = torch.cuda.get_device_name() if device.type == "cuda" else train.cpu_name()
    header = (f"{machine}; torch {torch.__version__}, {torch.get_num_threads()} threads; peak matmul "
              + ", ".join(f"{pr} {peaks[pr]:.0f} GFLOP/s" for pr in precisions)
              + f"; bf16 probe {rates['bf16'] / rates['fp32']:.2f}x fp32; {time.strftime('%Y-%m-%d')}")
    lines = [header, "",
             "| paper | config | precision | batch | params | ms/step | clips/s | GFLOP/step | MFU | peak MB | data wait |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    wanted = set(filter(None, args.configs.split(",")))
    for paper in args.papers.split(","):
        for row in CONFIGS[paper]:
            if wanted and row not in wanted:
                continue
            for precision in precisions:
                cmd = [sys.executable, __file__, f"--row={paper}|{row}|{precision}|{peaks[precision]}",
                       f"--steps={args.steps}", f"--paper_batch={args.paper_batch}", f"--device={args.device}"]
                cmd += ["--profile"] if args.profile else []
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    print(f"{paper} {row} {precision}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(done.stdout.strip().splitlines()[-1])
                wait = "-"
                if (row.startswith("default") and row != "default T=1" and args.data_steps and device.type == "cpu"
                        and precision == precisions[-1]):  # the precision auto picks: the faster steps, the worst wait
                    w = data_wait(paper, precision, args.data_steps)
                    wait = f"{w:.1f}%" if w is not None else "n/a"
                line = (f"| {paper} | {row} | {precision} | {r['batch']} | {r['params_m']:.1f} M | {r['ms']:.0f} | "
                        f"{r['clips_s']:.1f} | {r['gflop']:.1f} | {r['mfu']:.0f}% | {r['mem_mb']:.0f} | {wait} |")
                lines.append(line)
                print(line, flush=True)
                if r["shares"]:
                    print("  op time: " + ", ".join(f"{g} {v:.0f}%" for g, v in r["shares"].items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
