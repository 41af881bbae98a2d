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

Then the zero-shot `mc_order` questions (the truth against its reversed-motion option, scored by the VTM match
logit as in the evaluation) are asked twice, with the clip played forward and backward. A model that sees order
changes its preference when the clip is reversed; one blind to order keeps it, and its `mc_order` accuracy is then
set by which motion words it prefers, not by the video's direction (which is how it can fall below 50).

`--random_init` probes the same architecture with random weights (what the features give before any training);
without `--init` the architecture is the flags' (`--pretrain` defaults plus e.g. `--temporal=flatten`).

The supervised motion task (issue 24) asks the opposite question: can a model learn the direction of motion when
it is the training signal itself?

    python tests/probe_order.py --random_init --temporal=flatten --motion_steps=1500 [--lr=1e-3] [--seed=S]
    python tests/probe_order.py --cnn_steps=1500                  # the positive control: a small CNN
    ... [--warmup=N (default 10% of the steps)] [--clip_cache=/tmp/motion.pt] [--out=results.jsonl]

It trains the whole model (from random weights with `--random_init`, or from `--init`) with a linear head on the
joint [CLS] of the action prompt (the features of `--finetune=action`; the joint pass runs the temporal layer) to
name the motion of msrvtt/action's clips: 9 classes, one object per clip and its motion the label (4000 training,
200 val, 1000 test clips). Training: batches of 64, AdamW, linear warm-up then cosine decay; each clip a random
frame in each of the T bins and three label-mapping symmetries, each with probability 1/2 -- played backwards
(every motion becomes its reversal), mirrored left-right (left <-> right), upside down (up <-> down) -- so no
variant sees one direction of a pair more than the other. Reported on the test split at bin midpoints: accuracy,
the reversal-pair accuracy (the true class against its reversal, chance 50: the order-sensitive part, overall and
per pair), accuracy with every clip reversed, and the first step at which val accuracy reached 70%.
The CNN sees the T frames stacked as channels (order is in its input by construction): if it learns and a
transformer does not, the signal is in the pixels and the transformer misses it.

Not collected by pytest (its scoring and its symmetries are tested in tests/test_tools.py); the numbers go to the
README (All-in-one: does rolling see time?).
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import all_in_one as aio  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.text import Tokenizer  # noqa: E402
from common.train import autocast, choose_precision, load_checkpoint, lr_at, seed_everything  # noqa: E402
from common.video import IMAGENET_MEAN, IMAGENET_STD, VideoReadError, read_frames, video_meta  # noqa: E402
from common.errors import UserError, user_errors  # noqa: E402
from data.synthetic import MOTION_CLASS_NAMES as MOTION_CLASSES, MOTIONS, REVERSE  # noqa: E402


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


@torch.no_grad()
def mc_order_flip(model, cfg, tok):
    """-> (mc_order accuracy %, the same with every clip reversed %, share of questions whose choice changes when
    the clip is reversed %, the same between two forward passes %, n). The last is the control: with random roll
    slots (roll_tokens=random) a forward pass is itself random, and part of any change is that noise. Accuracy
    is aio.mc_metrics' order_acc (ties share the credit), as in the evaluation."""
    ds = aio.ClipTextDataset(aio.build_task_items(cfg, "mc", "test"), cfg, train=False)
    scores, labels, reversed_options = {"fwd": [], "again": [], "bwd": []}, [], []
    for b in aio.make_loader(ds, aio.Collate(tok, cfg, "eval"), cfg, None, False):
        if "video" not in b:
            continue
        labels.append(b["label"])
        reversed_options.append(b["reversed_option"])
        for name, video in (("fwd", b["video"]), ("again", b["video"]), ("bwd", b["video"].flip(1))):
            scores[name].append(aio.mc_scores(model, dict(b, video=video)))
    y, r = torch.cat(labels), torch.cat(reversed_options)
    scores = {k: torch.cat(v) for k, v in scores.items()}
    rows = torch.nonzero(r >= 0)[:, 0]
    wins = {k: s[rows, y[rows]] > s[rows, r[rows]] for k, s in scores.items()}  # per question: the truth wins
    changed = lambda a, b: (wins[a] != wins[b]).float().mean().item() * 100
    order_acc = lambda k: aio.mc_metrics(scores[k], y, r)["order_acc"]
    return order_acc("fwd"), order_acc("bwd"), changed("fwd", "bwd"), changed("fwd", "again"), len(rows)


# The three symmetries of the motion task, each a class permutation (classes in MOTION_CLASS_NAMES order: left,
# right, up, down, grow, shrink, appear, disappear, still): played backwards every motion becomes its reversal;
# mirrored left-right, left and right swap; upside down, up and down swap.
REVERSED = [MOTIONS.index(REVERSE[m]) for m in MOTIONS]         # [1, 0, 3, 2, 5, 4, 7, 6, 8]
H_FLIPPED = [1, 0, 2, 3, 4, 5, 6, 7, 8]
V_FLIPPED = [0, 1, 3, 2, 4, 5, 6, 7, 8]


def load_motion_clips(cfg, splits=("train", "val", "test"), cache=""):
    """Every clip of msrvtt/action decoded in full once -> {split: (frames uint8 (n, F, H, W, 3), labels (n,))}.
    Each clip holds one object and its motion is the label (data/synthetic.py build_motion_classes). `cache`: a
    file that keeps the decoded clips for the next run (1.2 GB for the default corpus; ~45 s of decoding saved)."""
    if cache and Path(cache).exists():
        return torch.load(cache)
    data = {}
    for split in splits:
        items = aio.build_task_items(cfg, "action", split)
        frames, labels = [], []
        for it in items:
            try:
                frames.append(torch.from_numpy(read_frames(it["path"], range(video_meta(it["path"]).num_frames))))
                labels.append(it["label"])
            except VideoReadError as e:
                print(f"warning: {e}; clip skipped")
        data[split] = torch.stack(frames), torch.tensor(labels)
    if cache:
        torch.save(data, cache)
    return data


_MEAN = torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)


def motion_batch(frames, labels, T, g=None, augment=False):
    """T frames per clip -> (video (B, T, 3, H, W) normalised as VideoTransform does, labels (B,)).
    augment=False: the bin midpoints (evaluation). augment=True (training): a random frame in each of the T bins,
    and each symmetry with probability 1/2 -- time reversal, left-right mirror, up-down mirror -- with the label
    mapped by the same symmetry, so that no variant sees a clip of one direction more than its reversal."""
    B, F = frames.shape[:2]
    edges = torch.linspace(0, F, T + 1)
    if augment:
        pos = edges[:-1] + torch.rand(B, T, generator=g) * (edges[1:] - edges[:-1])   # (B, T) in [bin start, end)
    else:
        pos = ((edges[:-1] + edges[1:]) / 2).expand(B, T)
    idx = pos.floor().long().clamp(0, F - 1)
    video = frames[torch.arange(B)[:, None], idx]                                      # (B, T, H, W, 3) uint8
    if augment:
        video, labels = video.clone(), labels.clone()
        for dim, perm in ((1, REVERSED), (3, H_FLIPPED), (2, V_FLIPPED)):               # dims of (B, T, H, W, 3)
            flip = torch.rand(B, generator=g) < 0.5
            video[flip] = video[flip].flip(dim)
            labels[flip] = torch.tensor(perm)[labels[flip]]
    video = rearrange(video, "b t h w c -> b t c h w").float() / 255
    return (video - _MEAN) / _STD, labels


def train_classifier(logits, params, data, cfg, steps, lr, warmup, precision, eval_every=250, target=70.0):
    """AdamW (weight decay 0.01) on random batches of 64 augmented clips (motion_batch), linear warm-up then cosine
    decay, cross-entropy of logits(video). Every `eval_every` steps the val accuracy; returns the first step at
    which it reached `target` % (None if never)."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(cfg.seed)
    frames, labels = data["train"]
    reached, t0 = None, time.time()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, steps, lr, warmup, "cosine")
        idx = torch.randint(len(labels), (64,), generator=g)
        video, y = motion_batch(frames[idx], labels[idx], cfg.num_frames, g, augment=True)
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(logits(video).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            val = evaluate(logits, data["val"], cfg.num_frames, precision)["acc"]
            if reached is None and val >= target:
                reached = step
            print(f"    step {step:5d}  loss {loss.item():.3f}  val acc {val:5.1f}%  ({time.time() - t0:.0f} s)",
                  flush=True)
    return reached


@torch.no_grad()
def test_classifier(logits, video, y, precision):
    """-> dict(acc, pair, n_pair, by_pair, acc_reversed) for clips video (n, T, 3, H, W) of motions y (n,):
    accuracy (%); the true motion against its reversal on the clips whose class has one (%, chance 50), overall
    and per pair of classes; accuracy with every clip played backwards against its original label (%: a model
    that reads the direction falls to about the share of "staying still")."""
    def predict(v):
        with autocast(torch.device("cpu"), precision):
            return torch.cat([logits(v[s:s + 64]).float() for s in range(0, len(v), 64)])
    out = predict(video)
    result = dict(acc=(out.argmax(-1) == y).float().mean().item() * 100,
                  acc_reversed=(predict(video.flip(1)).argmax(-1) == y).float().mean().item() * 100)
    partner = torch.tensor(REVERSED)[y]
    has = partner != y
    wins = out[has, y[has]] > out[has, partner[has]]                   # the truth beats its reversal
    result.update(pair=wins.float().mean().item() * 100, n_pair=int(has.sum()), by_pair={})
    for c in (6, 4, 2, 0):                                             # appear, grow, up, left and their reversals
        rows = (y[has] == c) | (y[has] == REVERSED[c])
        if rows.any():
            result["by_pair"][f"{MOTION_CLASSES[c]}/{MOTION_CLASSES[REVERSED[c]]}"] = wins[rows].float().mean().item() * 100
    return result


def evaluate(logits, data, T, precision):
    """test_classifier on the bin-midpoint frames of data = (frames, labels)."""
    return test_classifier(logits, *motion_batch(*data, T), precision)


def with_train_fit(result, logits, data, T, precision, n=1000):
    """result + train_acc / train_pair: the same scores on the first n training clips (bin midpoints, no
    symmetries). Near the test scores and low: the model does not learn the motion; high above them: it learns the
    training clips and does not generalise (more clips would help)."""
    frames, labels = data["train"]
    fit = evaluate(logits, (frames[:n], labels[:n]), T, precision)
    return dict(result, train_acc=fit["acc"], train_pair=fit["pair"])


def supervised_motion(model, cfg, tok, steps, lr, warmup, data):
    """Train the whole model (from its current weights) + a new linear head on the joint [CLS] of the action prompt
    (the features of `--finetune=action`; the joint pass runs the temporal layer) to name each clip's motion
    -> (test_classifier's dict on the test split, the first step with val accuracy >= 70%)."""
    prompt = tok([aio.ACTION_PROMPT], cfg.max_text_len, pad_to_max=False)
    head = torch.nn.Linear(cfg.width, len(MOTION_CLASSES))
    logits = lambda v: head(model.forward_joint(prompt["input_ids"].expand(len(v), -1),
                                                prompt["attention_mask"].expand(len(v), -1), v)[2].float())
    model.train()
    reached = train_classifier(logits, [*model.parameters(), *head.parameters()], data, cfg, steps, lr, warmup,
                               cfg.precision)
    model.eval()
    return with_train_fit(evaluate(logits, data["test"], cfg.num_frames, cfg.precision), logits, data, cfg.num_frames,
                          cfg.precision), reached


def cnn_control(cfg, steps, lr, warmup, data):
    """The positive control: a small CNN, from scratch, that sees the T frames stacked as channels (frame order is
    in its input by construction), trained the same way -> (test_classifier's dict, first step >= 70%). If it
    learns and a transformer does not, the signal is in the pixels and the transformer misses it."""
    torch.manual_seed(cfg.seed)
    T = cfg.num_frames
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3 * T, 64, 5, stride=2, padding=2), torch.nn.GELU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, len(MOTION_CLASSES)))
    logits = lambda v: net(v.flatten(1, 2))                                # (B, T, 3, H, W) -> (B, 3T, H, W)
    net.train()
    reached = train_classifier(logits, list(net.parameters()), data, cfg, steps, lr, warmup, "fp32")
    net.eval()
    return with_train_fit(evaluate(logits, data["test"], T, "fp32"), logits, data, T, "fp32"), reached


def report(result, reached, out=None, **run):
    """Print a supervised run's result (and append it, with the run's settings, to the JSON-lines file `out`)."""
    print(f"  test accuracy {result['acc']:.1f}% (9 classes, chance 11.1); reversal pairs {result['pair']:.1f}% "
          f"(chance 50, {result['n_pair']} clips: " + ", ".join(f"{k} {v:.0f}" for k, v in result["by_pair"].items())
          + f"); {result['acc_reversed']:.1f}% with every clip reversed; on training clips {result['train_acc']:.1f}% "
          f"(pairs {result['train_pair']:.1f}%); val accuracy reached 70% at step "
          f"{reached if reached else 'never'}")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(dict(run, **result, steps_to_70=reached)) + "\n")


def pop_flag(argv, name, default):
    """Remove `--name=value` (or a bare `--name` for a bool) from argv -> its value, typed like `default`."""
    for a in list(argv):
        if a == f"--{name}" and isinstance(default, bool):
            argv.remove(a)
            return True
        if a.startswith(f"--{name}="):
            argv.remove(a)
            return type(default)(a.split("=", 1)[1])
    return default


@user_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    random_init = pop_flag(argv, "random_init", False)
    motion_steps = pop_flag(argv, "motion_steps", 0)
    cnn_steps = pop_flag(argv, "cnn_steps", 0)
    warmup = pop_flag(argv, "warmup", -1)
    out = pop_flag(argv, "out", "")
    clip_cache = pop_flag(argv, "clip_cache", "")
    lr_given = any(a.startswith("--lr=") for a in argv)
    cfg = parse_config(aio.Config, argv, aio.PRESETS)
    lr = cfg.lr if lr_given else 1e-3
    if not (cfg.init or random_init or cnn_steps):  # (checked before the clips are decoded)
        raise UserError("probe_order needs --init=<ckpt.pt> (or --random_init, or --cnn_steps=N)")
    if cnn_steps or motion_steps:
        steps = cnn_steps or motion_steps
        warmup = warmup if warmup >= 0 else steps // 10
        t0 = time.time()
        data = load_motion_clips(cfg, cache=clip_cache)
        print(f"motion classes: {len(data['train'][1])} training clips, {len(data['val'][1])} val, "
              f"{len(data['test'][1])} test, decoded in {time.time() - t0:.0f} s", flush=True)
    if cnn_steps:
        print(f"CNN control (frames stacked as channels, from scratch): {cnn_steps} steps, lr {lr}, warm-up "
              f"{warmup}, seed {cfg.seed}, fp32", flush=True)
        report(*cnn_control(cfg, cnn_steps, lr, warmup, data), out, model="cnn", seed=cfg.seed, steps=steps, lr=lr)
        return
    ck = load_checkpoint(cfg.init) if cfg.init else None
    if ck:  # the checkpoint's architecture; --random_init without --init keeps the flags'
        for k in aio.ARCH_FIELDS:
            if k in ck["config"]:
                setattr(cfg, k, ck["config"][k])
    tok = Tokenizer(cfg.vocab_file or str(Path(cfg.data_root) / "vocab.txt"))
    cfg.vocab_size = cfg.vocab_size or tok.vocab_size
    seed_everything(cfg.seed)
    model = aio.AllInOne(cfg)
    if not random_init:
        model.load_state_dict(ck["model"], strict=False)
    which = (f"{cfg.init or 'the flags'} ({'random weights' if random_init else 'trained'}; temporal={cfg.temporal}, "
             f"time_init={cfg.time_init}, roll_unimodal={cfg.roll_unimodal}, patch {cfg.patch_size}")
    if motion_steps:
        cfg.precision, why = choose_precision(cfg.precision, torch.device("cpu"))
        print(f"{which}; {why}): {motion_steps} steps on the motion classes, lr {lr}, warm-up {warmup}, "
              f"seed {cfg.seed}", flush=True)
        t0 = time.time()
        result, reached = supervised_motion(model, cfg, tok, motion_steps, lr, warmup, data)
        report(result, reached, out, model=cfg.temporal, time_init=cfg.time_init, pos_init=cfg.pos_init,
               patch_size=cfg.patch_size,
               init=cfg.init, seed=cfg.seed, steps=steps, lr=lr, warmup=warmup, seconds=round(time.time() - t0))
        return
    model.eval()
    motion = set(aio.MOTION_WORDS)
    ds = aio.ClipTextDataset(aio.build_task_items(cfg, "retrieval", "test"), cfg, train=False)
    clips = [c for c in (ds[i] for i in range(len(ds))) if c is not None and motion & set(c["text"].split())]
    feats, y, pair = features(model, cfg, tok, clips)
    print(f"{which}): {len(clips)} test clips with a motion word, forward vs reversed")
    for name, x in feats.items():
        mean, accs = linear_probe_accuracy(x, y, pair)
        print(f"  {name:<14} dim {x.shape[1]:4d}  linear probe {mean:5.1f}%  (folds {' '.join(f'{a:.0f}' for a in accs)})")
    acc, acc_reversed, changed, noise, n = mc_order_flip(model, cfg, tok)
    print(f"  mc_order (zero-shot, {n} questions): truth preferred {acc:.1f}% with the clip forward, "
          f"{acc_reversed:.1f}% with it reversed; the choice changes in {changed:.1f}% of the questions when the "
          f"clip is reversed, in {noise:.1f}% between two forward passes")


if __name__ == "__main__":
    main()
