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

    python tests/probe_order.py --init=<ckpt.pt> --finetune_steps=300 [--lr=3e-4] [--seed=S] [--random_init]

asks the opposite question: can the model learn the direction of motion when it is the training signal itself?
The whole model is fine-tuned from the checkpoint (or from random weights of its architecture), with a new linear
head on the joint [CLS] of the action prompt (the features of `--finetune=action`; the joint pass rolls), to name
the main object's motion among the 9 classes of msrvtt/action (train split, 1500 clips, bin-midpoint frames, batch
64, AdamW), then tested on the test split, forward and with every clip reversed. Eight classes come in reversal
pairs (left / right, up / down, growing / shrinking, appearing / disappearing), so the printed `pair` accuracy --
the true class against its reversal only, chance 50 -- is the order-sensitive part. This is supervised
fine-tuning: it says what the architecture can see at 3 frames of 64x64, not what pre-training teaches it.
Two controls:

    ... --finetune_steps=300 --target=scene     the same route and recipe on a static label (the background scene)
    python tests/probe_order.py --cnn_steps=600 --lr=1e-3    a small CNN with the frames stacked as channels

The first checks the route itself learns (a single frame shows the scene); the second that the motion is in the
pixels (it sees frame order by construction, so reversing the clips should break it).

Not collected by pytest (its scoring, `test_classifier`, is tested in tests/test_tools.py); the numbers go to the
README (the order investigation, points 3, 6 and 7).
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import all_in_one as aio  # noqa: E402
from common.config import parse_config  # noqa: E402
from common.text import Tokenizer  # noqa: E402
from common.train import autocast, choose_precision, load_checkpoint, seed_everything  # noqa: E402


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


MOTION_PARTNERS = {"moving left": "moving right", "moving up": "moving down", "growing": "shrinking",
                   "appearing": "disappearing"}


def load_classes(cfg, target):
    """Every clip of msrvtt/action decoded once (bin-midpoint frames, centre crop) -> (class names, {split: (videos
    (n, T, 3, H, W), labels (n,))}). target "motion": the action label, the main object's motion; "scene": the
    background, read from the clip's MSR-VTT captions by the corpus's scene phrases (data/synthetic.py SCENE_WORDS;
    a clip whose captions name no scene, or two, is left out) -- a label a single frame shows."""
    if target == "motion":
        names = [n for n in (Path(cfg.data_root) / "msrvtt" / "action" / "classes.txt").read_text().split("\n") if n]
    else:
        from data.synthetic import SCENE_WORDS
        names = list(SCENE_WORDS)
        captions = {Path(path).stem: caps for split in ("train", "val", "test")
                    for _, path, caps in aio.read_msrvtt(cfg.data_root, split)}

        def scene(path):
            text = " ".join(captions.get(Path(path).stem, []))
            hits = [i for i, phrases in enumerate(SCENE_WORDS.values()) if any(p in text for p in phrases)]
            return hits[0] if len(hits) == 1 else -1
    data = {}
    for split in ("train", "test"):
        items = aio.build_task_items(cfg, "action", split)
        if target == "scene":
            items = [dict(it, label=scene(it["path"])) for it in items]
            items = [it for it in items if it["label"] >= 0]
        ds = aio.ClipTextDataset(items, cfg, train=False)
        clips = [c for c in (ds[i] for i in range(len(ds))) if "bad_video" not in c]
        data[split] = torch.stack([c["video"] for c in clips]), torch.tensor([c["label"] for c in clips])
    return names, data


def train_classifier(logits, params, x, y, steps, lr, seed, precision):
    """AdamW on random batches of 64 (x, y), cross-entropy of logits(videos); prints the loss every 50 steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(len(y), (64,), generator=g)
        with autocast(torch.device("cpu"), precision):
            loss = F.cross_entropy(logits(x[idx]).float(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"    step {step:4d}  loss {loss.item():.3f}", flush=True)


@torch.no_grad()
def test_classifier(logits, names, x, y, precision):
    """-> dict(acc, pair, n_pair, acc_reversed): accuracy (%), the true motion against its reversal on the clips
    whose class has a reversed partner (%, chance 50; motion classes only), accuracy with every clip reversed (%)."""
    def predict(v):
        with autocast(torch.device("cpu"), precision):
            return torch.cat([logits(v[s:s + 64]).float() for s in range(0, len(v), 64)])
    out = predict(x)
    result = dict(acc=(out.argmax(-1) == y).float().mean().item() * 100,
                  acc_reversed=(predict(x.flip(1)).argmax(-1) == y).float().mean().item() * 100)
    partners = {**MOTION_PARTNERS, **{b: a for a, b in MOTION_PARTNERS.items()}}
    partner = torch.tensor([names.index(partners[n]) if n in partners else -1 for n in names])
    has = partner[y] >= 0
    if has.any():
        rows = torch.arange(len(y))[has]
        result.update(pair=(out[rows, y[has]] > out[rows, partner[y[has]]]).float().mean().item() * 100,
                      n_pair=int(has.sum()))
    return result


def finetune(model, cfg, tok, steps, lr, target):
    """Fine-tune the whole model + a new linear head on the joint [CLS] of the action prompt (the features of
    `--finetune=action`; the joint pass rolls) to name each clip's `target` class -> test_classifier's dict."""
    names, data = load_classes(cfg, target)
    prompt = tok([aio.ACTION_PROMPT], cfg.max_text_len, pad_to_max=False)
    head = torch.nn.Linear(cfg.width, len(names))
    logits = lambda v: head(model.forward_joint(prompt["input_ids"].expand(len(v), -1),
                                                prompt["attention_mask"].expand(len(v), -1), v)[2].float())
    model.train()
    train_classifier(logits, [*model.parameters(), *head.parameters()], *data["train"], steps, lr, cfg.seed,
                     cfg.precision)
    model.eval()
    return test_classifier(logits, names, *data["test"], cfg.precision)


def cnn_control(cfg, steps, lr):
    """The control for `finetune`: a small CNN, from scratch, that sees the T frames stacked as channels (frame
    order is in its input by construction), trained the same way on the motion classes -> test_classifier's dict.
    If it learns and the transformer does not, the signal is in the pixels and the transformer misses it."""
    names, data = load_classes(cfg, "motion")
    torch.manual_seed(cfg.seed)
    T = data["train"][0].shape[1]
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3 * T, 64, 5, stride=2, padding=2), torch.nn.GELU(),
        torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.GELU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, len(names)))
    logits = lambda v: net(v.flatten(1, 2))                                # (B, T, 3, H, W) -> (B, 3T, H, W)
    net.train()
    train_classifier(logits, list(net.parameters()), *data["train"], steps, lr, cfg.seed, "fp32")
    net.eval()
    return test_classifier(logits, names, *data["test"], "fp32")


def report(result, target):
    chance = {"motion": "9 classes, chance 11.1", "scene": "7 scenes, chance 14.3"}[target]
    line = f"  test accuracy {result['acc']:.1f}% ({chance}); {result['acc_reversed']:.1f}% with every clip reversed"
    if "pair" in result:
        line += f"; reversal pairs {result['pair']:.1f}% (chance 50, {result['n_pair']} clips)"
    print(line)


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    random_init = pop_flag(argv, "random_init", False)
    finetune_steps = pop_flag(argv, "finetune_steps", 0)
    cnn_steps = pop_flag(argv, "cnn_steps", 0)
    target = pop_flag(argv, "target", "motion")
    assert target in ("motion", "scene"), f"--target=motion|scene, not {target!r}"
    lr_given = any(a.startswith("--lr=") for a in argv)
    cfg = parse_config(aio.Config, argv, aio.PRESETS)
    lr = cfg.lr if lr_given else 3e-4  # (cfg.lr's default is the pre-training rate)
    if cnn_steps:
        print(f"CNN control (frames stacked as channels, from scratch): {cnn_steps} steps on the motion classes, "
              f"lr {lr}, seed {cfg.seed}, fp32", flush=True)
        report(cnn_control(cfg, cnn_steps, lr), "motion")
        return
    assert cfg.init or random_init, "--init=<ckpt.pt> (or --random_init)"
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
             f"roll_unimodal={cfg.roll_unimodal}")
    if finetune_steps:
        cfg.precision, why = choose_precision(cfg.precision, torch.device("cpu"))
        print(f"{which}; {why}): fine-tuning {finetune_steps} steps on the {target} classes, lr {lr}, "
              f"seed {cfg.seed}", flush=True)
        report(finetune(model, cfg, tok, finetune_steps, lr, target), target)
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
