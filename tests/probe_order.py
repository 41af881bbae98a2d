"""Does an All-in-one checkpoint tell a clip from its time reversal? A linear probe on frozen features
(issue 15, deliverable 2: why `temporal=roll` does not beat `mean` on the order-sensitive probes).

    python tests/probe_order.py --init=runs/all_in_one/ckpt.pt [--data_root=data/synth] [--random_init]

The clips are the MSR-VTT-style test videos whose first caption names a motion (a word of MOTION_WORDS): each is
shown forward (label 1) and with its frames played backwards (label 0). For each feature below, a logistic
regression on standardised features is trained and tested with 5-fold cross-validation, the two versions of a
clip always in the same fold; chance is 50%.

    joint_cls      the pooled text [CLS] of the joint pass with the clip's own caption (what VTM and MC score)
    joint_video    the mean visual token of the joint pass (the T copies averaged after the final norm)
    video          the video-only pass pooled as for retrieval (rolls only with roll_unimodal)
    frames_concat  the video-only pass per frame, pooled per frame and concatenated in time order (T*D): a control
                   that sees order by construction; if it fails, the frames themselves carry too little signal

Caveat: the synthetic world is closed under time reversal (every motion has its reversed twin among the forward
clips), so features of the video alone (joint_video, video, frames_concat) cannot tell forward from reversed even in
principle; only joint_cls, which sees the caption, is a fair test. (Default run of 2026-12-02: 50.1 / 50.0 / 50.0 /
49.3%.)

`--random_init` probes the same architecture with random weights (what the features give before any training).
Not collected by pytest; the numbers go to the issue, not to a test.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import all_in_one as aio  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.text import Tokenizer  # noqa: E402
from common.train import load_checkpoint, seed_everything  # noqa: E402


def linear_probe_accuracy(x, y, pair, folds=5, epochs=300, weight_decay=1e-3):
    """5-fold CV accuracy (%) of a logistic regression; rows with the same `pair` id share a fold."""
    ids = pair.unique()
    g = torch.Generator().manual_seed(0)
    ids = ids[torch.randperm(len(ids), generator=g)]
    accs = []
    for k in range(folds):
        test_ids = ids[k::folds]
        test = torch.isin(pair, test_ids)
        mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-6
        xtr, xte = (x[~test] - mu) / sd, (x[test] - mu) / sd
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2, weight_decay=weight_decay)
        for _ in range(epochs):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(xtr @ w + b, y[~test].float()).backward()
            opt.step()
        with torch.no_grad():
            accs.append(((xte @ w + b > 0).long() == y[test]).float().mean().item() * 100)
    return sum(accs) / len(accs), accs


@torch.no_grad()
def features(model, cfg, tok, clips):
    out = {k: [] for k in ("joint_cls", "joint_video", "video", "frames_concat")}
    for s in range(0, len(clips), 32):
        part = clips[s:s + 32]
        video = torch.stack([c["video"] for c in part])                       # (B, T, 3, H, W)
        t = tok([c["text"] for c in part], cfg.max_text_len, pad_to_max=False)
        for v in (video, video.flip(1)):                                       # forward, then reversed
            _, vis, cls = model.forward_joint(t["input_ids"], t["attention_mask"], v)
            frames = model.forward_frames(v)                                   # (B, T, 1+N, D)
            out["joint_cls"].append(cls)
            out["joint_video"].append(vis.mean(1))
            out["video"].append(model.pool_visual(frames.mean(1)))
            out["frames_concat"].append(model.pool_visual(frames).flatten(1))  # (B, T*D)
    n = len(clips)
    # rows: batch by batch, forward block then reversed block
    y, pair = [], []
    for s in range(0, n, 32):
        b = min(32, n - s)
        y += [1] * b + [0] * b
        pair += list(range(s, s + b)) * 2
    return {k: torch.cat(v).float() for k, v in out.items()}, torch.tensor(y), torch.tensor(pair)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    random_init = "--random_init" in argv
    argv = [a for a in argv if a != "--random_init"]
    cfg = parse_config(aio.Config, argv, aio.PRESETS)
    ck = load_checkpoint(cfg.init)
    for k in aio.ARCH_FIELDS:
        if k in ck["config"]:
            setattr(cfg, k, ck["config"][k])
    tok = Tokenizer(cfg.vocab_file or str(Path(cfg.data_root) / "vocab.txt"))
    cfg.vocab_size = cfg.vocab_size or tok.vocab_size
    seed_everything(cfg.seed)
    model = aio.AllInOne(cfg)
    if not random_init:
        model.load_state_dict(ck["model"], strict=False)
    model.eval()
    motion = set(aio.MOTION_WORDS)
    ds = aio.ClipTextDataset(aio.build_task_items(cfg, "retrieval", "test"), cfg, train=False)
    clips = [c for c in (ds[i] for i in range(len(ds))) if c is not None and motion & set(c["text"].split())]
    feats, y, pair = features(model, cfg, tok, clips)
    print(f"{cfg.init} ({'random weights' if random_init else 'trained'}; temporal={cfg.temporal}, "
          f"roll_unimodal={cfg.roll_unimodal}): {len(clips)} test clips with a motion word, forward vs reversed")
    for name, x in feats.items():
        mean, accs = linear_probe_accuracy(x, y, pair)
        print(f"  {name:<14} dim {x.shape[1]:4d}  linear probe {mean:5.1f}%  (folds {' '.join(f'{a:.0f}' for a in accs)})")


if __name__ == "__main__":
    main()
