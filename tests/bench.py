"""Speed of one training step of each paper's default model, in fp32 and bf16, on this machine.

    python tests/bench.py                      # all three papers, CPU, default configs
    python tests/bench.py --papers all_in_one --steps 10
    python tests/bench.py --device cuda --extra --B    # e.g. a paper-size preset on a GPU (all_in_one)

Each row times forward + backward + AdamW on random inputs of the default shapes (so decoding is not counted):
all_in_one runs its real pre-training step (VTC on the batch, VTM + MLM on the joint share); egovlp and oa_trans
run their dual encoders with a symmetric InfoNCE on the batch (egovlp's batch doubled by the scene negatives;
OA-Trans's object streams are not included). Three settings: fp32; bf16 autocast with PyTorch's default
attention kernel ("bf16-fused"); and bf16 as the paper files run it ("bf16", common.train.autocast: on CPU the
math attention backend). Reports the median wall ms per step and, on CPU, the process CPU ms per step (steadier
when the machine is shared). Not a test: pytest does not collect it.
"""

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common.train as train  # noqa: E402
from common.config import parse_config  # noqa: E402

VOCAB = 1000  # the synthetic corpus' vocab is a few hundred words; the paper presets set 30522 themselves


def infonce(t, v, temperature=0.05):
    sim = F.normalize(t.float(), dim=-1) @ F.normalize(v.float(), dim=-1).t() / temperature
    labels = torch.arange(len(sim), device=sim.device)
    return F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)


def setup(paper, extra, device):
    """-> (model, a function computing the step's loss) for the paper's default config (+ extra flags)."""
    mod = importlib.import_module(paper)
    cfg = parse_config(mod.Config, ["--pretrain", *extra], mod.PRESETS)
    if getattr(cfg, "vocab_size", None) == 0:
        cfg.vocab_size = VOCAB
    g = torch.Generator().manual_seed(0)
    if paper == "all_in_one":
        model = mod.AllInOne(cfg)
        B, L, n = cfg.batch_size, 20, max(2, round(cfg.joint_fraction * cfg.batch_size))
        ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
        mlm_labels = torch.full((B, L), -100)
        mlm_labels[:, 3] = ids[:, 3]
        batch = dict(video=torch.randn(B, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g),
                     text_ids=ids, text_mask=torch.ones(B, L, dtype=torch.long), mlm_ids=ids.clone(),
                     mlm_labels=mlm_labels, vtm_video_index=torch.randperm(n, generator=g),
                     vtm_labels=torch.randint(2, (n,), generator=g))
        batch = {k: v.to(device) for k, v in batch.items()}
        return model.to(device), lambda: model(batch, "pretrain")["loss"]
    if paper == "egovlp":
        model = mod.FrozenInTime(cfg, cfg.vocab_size).init_weights(cfg.time_init)
        B, S = cfg.batch_size * (2 if cfg.negatives == "scene" else 1), cfg.img_size
    else:
        model = mod.OATrans(cfg, VOCAB)
        B, S = cfg.batch_size, cfg.img_size
    L = 20
    video = torch.randn(B, cfg.num_frames, 3, S, S, generator=g).to(device)
    ids = torch.randint(5, VOCAB, (B, L), generator=g).to(device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    model = model.to(device)
    if paper == "egovlp":
        return model, lambda: infonce(*model(ids, mask, video))
    return model, lambda: infonce(model.encode_text(ids, mask), model.encode_video(video))


def time_steps(model, loss_fn, device, precision, fused, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # "bf16-fused": plain torch.autocast, i.e. PyTorch's default attention kernel; otherwise as the paper files run
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if fused else train.autocast(device, precision)
    wall, cpu = [], []
    for i in range(steps + 2):  # two warm-up steps
        t0, c0 = time.perf_counter(), time.process_time()
        with ctx:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            wall.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
    return statistics.median(wall), statistics.median(cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--papers", default="all_in_one,egovlp,oa_trans")
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (after 2 warm-up steps)")
    p.add_argument("--device", default="auto")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="config flags passed to every paper")
    args = p.parse_args()
    device = train.resolve_device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'paper':<11} {'setting':<11} {'wall ms/step':>12} {'cpu ms/step':>12}")
    for paper in args.papers.split(","):
        for setting, precision, fused in [("fp32", "fp32", False), ("bf16-fused", "bf16", True),
                                          ("bf16", "bf16", False)]:
            torch.manual_seed(0)
            model, loss_fn = setup(paper, args.extra, device)
            wall, cpu = time_steps(model, loss_fn, device, precision, fused, args.steps)
            cpu_s = f"{cpu:12.0f}" if device.type == "cpu" else f"{'-':>12}"
            print(f"{paper:<11} {setting:<11} {wall:12.0f} {cpu_s}", flush=True)


if __name__ == "__main__":
    main()
