"""Drawing helpers for the pictures of what the models learned, with PIL only (no plotting library).

Each paper file has a short `draw_pictures(...)` that picks its own examples and scores and calls these: frame strips
of clips, text, boxes, a grid of coloured patches, line charts, and the training curves read from log.jsonl. Every
helper returns a PIL RGB image; `stack` puts images under (or beside) each other; `save` writes a PNG.

Frames arrive as the models see them: float tensors (T, 3, H, W) normalised with the ImageNet mean / std.
"""

import json
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.video import IMAGENET_MEAN, IMAGENET_STD

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
GREEN, RED, BLUE, ORANGE = (30, 160, 60), (210, 40, 40), (40, 90, 210), (235, 140, 20)
PALETTE = [BLUE, ORANGE, GREEN, RED, (140, 70, 170), (120, 80, 40), (220, 90, 170), (90, 90, 90)]


def font(size=12):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def text_size(s, size=12):
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), s, font=font(size))
    return x1 - x0, y1 - y0


def text_image(s, width=0, size=12, fill=BLACK, bg=WHITE, pad=3):
    """One or more lines of text on a white band (wrapped at `width` pixels when given)."""
    lines = []
    for para in str(s).split("\n"):
        line = ""
        for word in para.split(" "):
            trial = (line + " " + word).strip()
            if width and line and text_size(trial, size)[0] > width - 2 * pad:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    h = size + 3
    w = width or max(text_size(line, size)[0] for line in lines) + 2 * pad
    img = Image.new("RGB", (w, h * len(lines) + 2 * pad), bg)
    d = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        d.text((pad, pad + i * h), line, fill=fill, font=font(size))
    return img


def to_pil(frame, scale=1):
    """A normalised frame (3, H, W) -> PIL RGB, enlarged `scale` times (nearest: patches stay sharp)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (frame.detach().float().cpu() * std + mean).clamp(0, 1)
    img = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img


def frame_strip(video, scale=None, gap=2, border=None, width=3):
    """A clip (T, 3, H, W) as its frames side by side (enlarged to at least 64 px unless `scale` is given);
    `border` draws a coloured frame around the strip."""
    scale = scale or max(1, 64 // video.shape[-1])
    frames = [to_pil(f, scale) for f in video]
    w, h = frames[0].size
    pad = width if border else 0
    img = Image.new("RGB", (len(frames) * w + (len(frames) - 1) * gap + 2 * pad, h + 2 * pad), border or WHITE)
    for t, f in enumerate(frames):
        img.paste(f, (pad + t * (w + gap), pad))
    return img


def draw_boxes(img, boxes, labels=(), colours=PALETTE, width=2, size=11):
    """Boxes (K, 4) x1, y1, x2, y2 in the image's pixels, each with its label above its top-left corner."""
    img = img.copy()
    d = ImageDraw.Draw(img)
    for k, box in enumerate(boxes):
        c = colours[k % len(colours)]
        x1, y1, x2, y2 = (float(v) for v in box)
        d.rectangle([x1, y1, x2, y2], outline=c, width=width)
        if k < len(labels):
            d.text((x1 + 2, max(0, y1 - size - 1)), str(labels[k]), fill=c, font=font(size))
    return img


def patch_overlay(img, mask, grid, colour=RED, alpha=0.45, outline=True):
    """Tint the patches where mask (grid * grid,) is True (row-major) and outline the patch grid."""
    img = img.copy().convert("RGBA")
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cw, ch = img.width / grid, img.height / grid
    for i, on in enumerate(mask):
        r, c = divmod(i, grid)
        box = [c * cw, r * ch, (c + 1) * cw - 1, (r + 1) * ch - 1]
        if on:
            d.rectangle(box, fill=colour + (int(255 * alpha),))
        if outline:
            d.rectangle(box, outline=(255, 255, 255, 90))
    return Image.alpha_composite(img, layer).convert("RGB")


def bar(value, lo, hi, width=80, height=10, colour=BLUE):
    """A horizontal bar for a score in [lo, hi]."""
    img = Image.new("RGB", (width, height), (235, 235, 235))
    frac = 0.0 if hi <= lo else min(1.0, max(0.0, (value - lo) / (hi - lo)))
    ImageDraw.Draw(img).rectangle([0, 0, int(frac * (width - 1)), height - 1], fill=colour)
    return img


def stack(images, vertical=True, gap=4, bg=WHITE, align="start"):
    """Images under each other (vertical) or side by side; None entries are skipped."""
    images = [im for im in images if im is not None]
    if vertical:
        w, h = max(im.width for im in images), sum(im.height for im in images) + gap * (len(images) - 1)
    else:
        w, h = sum(im.width for im in images) + gap * (len(images) - 1), max(im.height for im in images)
    out = Image.new("RGB", (w, h), bg)
    pos = 0
    for im in images:
        off = 0 if align == "start" else ((w - im.width) if vertical else (h - im.height)) // 2
        out.paste(im, (off, pos) if vertical else (pos, off))
        pos += (im.height if vertical else im.width) + gap
    return out


def pad(img, margin=8, bg=WHITE):
    out = Image.new("RGB", (img.width + 2 * margin, img.height + 2 * margin), bg)
    out.paste(img, (margin, margin))
    return out


def save(img, path):
    """Write a PNG (folders created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pad(img).save(path, format="PNG")
    return path


# --- charts ------------------------------------------------------------------------------------------------------

def _nice(lo, hi):
    if not math.isfinite(lo) or not math.isfinite(hi):
        return 0.0, 1.0
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def line_chart(series, title="", xlabel="step", width=360, height=200, ylim=None):
    """series: {name: (xs, ys)} drawn as lines with dots, one colour each, min / max tick labels, and a legend under
    the plot (where it cannot hide a line)."""
    series = {k: (list(map(float, xs)), list(map(float, ys))) for k, (xs, ys) in series.items() if len(xs)}
    left, right, top, bottom = 44, 10, 20, 30
    legend, row, x = [], 0, left  # (name, x, row) of each legend entry, wrapped at the chart's width
    for name in series:
        w = text_size(name, 11)[0] + 14
        if x + w > width - right and x > left:
            row, x = row + 1, left
        legend.append((name, x, row))
        x += w
    img = Image.new("RGB", (width, height + 14 * (row + 1 if series else 0)), WHITE)
    d = ImageDraw.Draw(img)
    d.text((left, 3), title, fill=BLACK, font=font(12))
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    d.rectangle([x0, y0, x1, y1], outline=GREY)
    if not series:
        d.text((x0 + 8, y0 + 8), "(nothing logged)", fill=GREY, font=font(11))
        return img
    all_x = [x for xs, _ in series.values() for x in xs]
    all_y = [y for _, ys in series.values() for y in ys if math.isfinite(y)]
    xlo, xhi = _nice(min(all_x), max(all_x))
    ylo, yhi = ylim or _nice(min(all_y, default=0.0), max(all_y, default=1.0))
    px = lambda x: x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)
    py = lambda y: y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        c = PALETTE[k % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
    for k, (name, x, row) in enumerate(legend):
        c, y = PALETTE[k % len(PALETTE)], height + 14 * row
        d.line([(x, y + 6), (x + 8, y + 6)], fill=c, width=2)
        d.text((x + 11, y), name, fill=c, font=font(11))
    small = font(10)
    d.text((2, y0 - 4), f"{yhi:.3g}", fill=BLACK, font=small)
    d.text((2, y1 - 8), f"{ylo:.3g}", fill=BLACK, font=small)
    d.text((x0, y1 + 3), f"{xlo:.0f}", fill=BLACK, font=small)
    d.text((x1 - text_size(f"{xhi:.0f}", 10)[0], y1 + 3), f"{xhi:.0f}", fill=BLACK, font=small)
    d.text(((x0 + x1) // 2 - 12, y1 + 14), xlabel, fill=BLACK, font=small)
    return img


def read_log(path):
    """log.jsonl -> list of records (a missing file gives [])."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(records, key):
    """(steps, values) of the records that hold `key`."""
    pts = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(log_path, loss_keys, metric_keys, title=""):
    """Two charts side by side from a run's log.jsonl: the training losses and the validation metrics per step."""
    records = read_log(log_path)
    left = line_chart({k: curve(records, k) for k in loss_keys}, "training loss")
    right = line_chart({k: curve(records, k) for k in metric_keys}, "validation")
    return stack([text_image(title or f"training curves: {log_path}", size=12), stack([left, right], vertical=False)])


# --- a retrieval gallery -----------------------------------------------------------------------------------------

def retrieval_gallery(queries, title=""):
    """queries: list of dict(text, ranked=[(video (T, 3, H, W), score, is_correct)], rank_of_correct).

    One block per query: the caption and the rank of its own video, then the top results as frame strips with their
    cosine, the correct clip framed in green (the others in grey)."""
    blocks = [text_image(title, size=13)] if title else []
    for q in queries:
        strips = []
        for i, (video, score, correct) in enumerate(q["ranked"]):
            strip = frame_strip(video, border=GREEN if correct else (210, 210, 210))
            label = text_image(f"#{i + 1}  cos {score:.2f}" + ("  correct" if correct else ""), size=11,
                               fill=GREEN if correct else BLACK)
            strips.append(stack([label, strip], gap=0))
        head = text_image(f'"{q["text"]}"  (its video ranks #{q["rank_of_correct"]})', width=0, size=12)
        blocks.append(stack([head, stack(strips, vertical=False, gap=8)], gap=2))
    return stack(blocks, gap=10)


def ranked_queries(sim, texts, own, clip, top=5):
    """retrieval_gallery's queries from a similarity matrix sim (queries, videos): query q is texts[q], whose own
    video is own[q]; clip(j) gives video j's frames (T, 3, H, W) for the top `top` it ranks."""
    queries = []
    for q, text in enumerate(texts):
        order = sim[q].argsort(descending=True).tolist()
        queries.append(dict(text=text, rank_of_correct=order.index(own[q]) + 1,
                            ranked=[(clip(j), sim[q, j].item(), j == own[q]) for j in order[:top]]))
    return queries


def run_log(init, out_dir):
    """The log.jsonl behind a model's training curves: the run of the checkpoint --init names, else out_dir's."""
    return os.path.join(os.path.dirname(init), "log.jsonl") if init else os.path.join(out_dir, "log.jsonl")


# --- which tokens a temporal layer moves -------------------------------------------------------------------------

def token_slots_picture(video, before, after, patch, title="", scale=3):
    """What each frame's token sequence holds after a layer that moves tokens between frames.

    video (T, 3, H, W) normalised; before / after: int arrays (T, S, 2) giving, for every slot of every frame, the
    (source frame, source patch) of its token: patch -1 is the CLS token, source frame -1 a zero token (padding).
    One row per frame: the frame, its patches tinted by the frame their token was sent to (grey: dropped), then the
    sequence after the layer, slot by slot, each cell showing its token's pixels framed in its source frame's colour.
    """
    T, S = before.shape[:2]
    grid = video.shape[-1] // patch
    colours = [PALETTE[t % len(PALETTE)] for t in range(T)]
    frames = [to_pil(f) for f in video]
    sent = {}  # (frame, patch) -> the frame its token went to
    for t in range(T):
        for s in range(S):
            src_t, src_p = (int(v) for v in after[t, s])
            if src_t >= 0 and src_t != t:
                sent[src_t, src_p] = t
    kept = {(int(a), int(b)) for row in after for a, b in row}

    def cell(src_t, src_p, size):
        img = Image.new("RGB", (size + 4, size + 4), colours[src_t] if src_t >= 0 else BLACK)
        if src_t < 0:
            ImageDraw.Draw(img).text((5, size // 2 - 4), "0", fill=WHITE, font=font(10))
        elif src_p < 0:
            img.paste(Image.new("RGB", (size, size), (245, 245, 245)), (2, 2))
            ImageDraw.Draw(img).text((4, size // 2 - 5), "CLS", fill=BLACK, font=font(10))
        else:
            r, c = divmod(src_p, grid)
            crop = frames[src_t].crop((c * patch, r * patch, (c + 1) * patch, (r + 1) * patch))
            img.paste(crop.resize((size, size), Image.NEAREST), (2, 2))
        return img

    rows = [text_image(title, size=13)] if title else []
    legend = [text_image("frame colours:", size=11)] + [text_image(f"t={t}", size=11, fill=colours[t])
                                                        for t in range(T)]
    rows.append(stack(legend, vertical=False, gap=6))
    for t in range(T):
        img = frames[t].resize((frames[t].width * scale, frames[t].height * scale), Image.NEAREST)
        for dest in range(T):
            mask = [sent.get((t, p)) == dest for p in range(grid * grid)]
            if any(mask):
                img = patch_overlay(img, mask, grid, colour=colours[dest], alpha=0.45, outline=False)
        lost = [(t, p) not in kept for p in range(grid * grid)]
        img = patch_overlay(img, lost, grid, colour=GREY, alpha=0.8, outline=True)
        cells = [cell(int(a), int(b), patch * 2) for a, b in after[t]]
        seq = stack([text_image(f"frame {t}'s tokens after the layer (slot order)", size=11),
                     stack(cells, vertical=False, gap=1)], gap=1)
        rows.append(stack([stack([text_image(f"frame {t}: tinted = sent to that frame", size=11), img], gap=1),
                           seq], vertical=False, gap=12))
    return stack(rows, gap=8)
