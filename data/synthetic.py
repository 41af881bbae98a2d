"""The built-in synthetic video-language corpus: a tiny procedural world written in the real datasets' formats.

Why it exists
-------------
The three papers train on WebVid / EgoClip and evaluate on MSR-VTT, EgoMCQ, EPIC-KITCHENS-100 and Charades-Ego,
none of which fit on a laptop. This module renders a small world whose captions are *about* what the papers care
about, and writes it in the same on-disk formats as the real data, so the loaders that read it read the real
datasets too (see data/README.md for every file, column and key, and for the real files' names).

The world (all sizes below are for the default 64x64 frames and scale with `frame_size`)
---------------------------------------------------------------------------------------
* Scenes: 7 procedural backgrounds (beach, forest, city, snow, night, kitchen, desert), each with its own
  palette and texture, random per-clip variation, mild per-frame noise and, in half the clips, a 1-2 px camera
  jitter.
* Objects: 1-3 per clip, each with a colour (7), a shape (5) and a size: small ~8-11 px (about one 8-px patch,
  hard to notice for a global embedding) or big ~20-26 px. Every clip also carries 2-5 unmentioned clutter items
  (pebbles, sticks, leaves) and, with 3 objects, the third one is often left out of the captions.
* Motions come in time-reversed pairs: moves left/right, moves up/down, grows/shrinks, appears/disappears, plus
  stays still. Translations cover 24-34 px over the clip, so the first and last thirds of a clip differ clearly.
* Captions are templated English with paraphrases ("slides to the left", "drifts leftward", ...) naming the
  objects' attributes, their motions and the scene; every video gets several distinct paraphrases.
* Reversed twins: a share of the WebVid training clips (`twin_fraction`) get a twin whose frames are the same
  frames in reverse order, with the motions of its caption reversed, linked both ways by the `reverse_of`
  column. This is a departure from the papers' data, offered so a loader can put both in one batch as hard
  negatives (with random batches a small model never has to look across frames).
* Egocentric videos: a wide scene (kitchen, workshop, garden, office ...) seen through a slowly panning, shaking
  camera that turns towards the object being handled; 4-6 everyday objects (cup, box, bottle, ...) on it; a
  sequence of hand actions (take, put, move left/right, lift, lower, pull closer, push away), the hand visible
  while it acts. The same verb/noun pairs recur across videos (EgoNCE's action-aware positives) and
  neighbouring actions in a video share the scene but differ in action (scene-aware negatives).

Files written (root = data/synth by default; details and real-dataset equivalents in data/README.md)
-----------------------------------------------------------------------------------------------------
  vocab.txt                  BERT-format vocab over every text below (common.text.build_vocab)
  webvid/                    results_{train,val}.csv, videos/<page_dir>/<videoid>.mp4, BUTD-style detections
                             objects/<page_dir>/<videoid>/<k>.npz, objects_vocab.txt, attributes_vocab.txt
  msrvtt/                    annotation/MSR_VTT.json, splits/*.txt, videos/all/*.mp4, msrvtt_qa_*.jsonl,
                             msrvtt_mc_*.jsonl, action/classes.txt + {train,val,test}.list + videos/ (motion
                             classes: clips of one object, its motion the label)
  egoclip/                   videos/<uid>.mp4, egoclip.csv, {verb,noun}_classes.txt, egomcq.json,
                             epic_mir/ (EPIC-100 retrieval CSVs, relevancy .npy, videos/),
                             charades/ (Charades_v1_classes.txt, CharadesEgo CSVs, videos/)
  DONE                       JSON with the generation parameters and counts; written last

Determinism: every item is rendered from its own numpy Generator seeded with (seed, stream, index), specs and
annotations are built in one process in a fixed order, and videos are encoded with libx264 on one thread with
fixed options (macroblock-tree off, see write_video), so the same seed gives byte-identical files, annotations
and videos alike, whatever the number of worker processes or the order in which they take jobs.

Usage:
    python -m data.synthetic --out data/synth --seed 0 --size default     # ~1.5 min on 2 idle cores
    python -m data.synthetic --out /tmp/synth_tiny --size tiny             # a few seconds, used by the tests
    from data.synthetic import ensure_corpus; root = ensure_corpus("data/synth")
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
import zipfile
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from common.errors import user_errors

# ---------------------------------------------------------------------------------------------------------------
# Knobs

SIZES = {
    # tiny: for tests (a few seconds); default: what the paper files train on (~1.5 min on 2 cores); large: ~4x.
    "tiny": dict(webvid_train=24, webvid_val=8, msrvtt_train=24, msrvtt_val=8, msrvtt_test=16,
                 ego_train_videos=3, ego_mcq_videos=5, ego_duration=(36, 48),
                 epic_train_videos=2, epic_test_videos=2, epic_duration=(30, 40),
                 charades_train=6, charades_test=8, captions_per_video=3,
                 action_train=27, action_val=9, action_test=18),
    "default": dict(webvid_train=3000, webvid_val=200, msrvtt_train=1500, msrvtt_val=200, msrvtt_test=500,
                    ego_train_videos=180, ego_mcq_videos=16, ego_duration=(120, 180),
                    epic_train_videos=12, epic_test_videos=6, epic_duration=(100, 140),
                    charades_train=150, charades_test=100, captions_per_video=5,
                    action_train=4000, action_val=200, action_test=1000),
    "large": dict(webvid_train=12000, webvid_val=500, msrvtt_train=6000, msrvtt_val=500, msrvtt_test=1000,
                  ego_train_videos=240, ego_mcq_videos=40, ego_duration=(120, 180),
                  epic_train_videos=48, epic_test_videos=16, epic_duration=(100, 140),
                  charades_train=600, charades_test=300, captions_per_video=5,
                  action_train=16000, action_val=500, action_test=2000),
}
CLIP_FRAMES = 24          # WebVid / MSR-VTT clip length in frames: 2.4 s at 10 fps (3-4 or 16 frames sample well)
CLIP_FPS = 10
EGO_FPS = 8               # egocentric videos are long, so low fps (EgoVLP's loader reads the real fps)
TWIN_FRACTION = 0.25      # share of WebVid training clips that get a time-reversed twin (0 disables twins)
JITTER_PROB = 0.5         # share of WebVid / MSR-VTT clips with camera jitter
NUM_DETECTION_FRAMES = 8  # BUTD detections on the midpoints of 8 equal segments (OA-Trans, WebVid)
MIN_BOXES = 10            # BUTD's --min-max-boxes 10,100: every frame has at least 10 boxes
# Bumped whenever a change alters the files a seed produces; ensure_corpus regenerates an older corpus.
# 2: 180 EgoClip training videos (was 60); EgoMCQ's held-out videos drawn from their own random stream.
# 3: the motion classes (msrvtt/action) get clips of their own, one object each (was: the MSR-VTT videos, labelled
#    with the motion of the first of their 1-3 objects).
CORPUS_VERSION = 3

# ---------------------------------------------------------------------------------------------------------------
# The world's vocabulary

COLOURS = {"red": (225, 35, 35), "green": (40, 215, 60), "blue": (35, 75, 245), "yellow": (250, 225, 30),
           "purple": (160, 45, 215), "pink": (255, 120, 205), "orange": (255, 135, 0)}
SHAPES = ["square", "circle", "triangle", "diamond", "cross"]
SHAPE_WORDS = {"square": ["square", "block", "box"], "circle": ["circle", "ball", "disc"],
               "triangle": ["triangle", "triangle", "wedge"], "diamond": ["diamond", "rhombus", "diamond"],
               "cross": ["cross", "plus sign", "cross"]}
SIZE_WORDS = {"small": ["small", "tiny", "little"], "big": ["big", "large", "huge"]}
SCENES = ["beach", "forest", "city", "snow", "night", "kitchen", "desert"]
SCENE_WORDS = {"beach": ["on a beach", "by the sea", "on the sand near the water"],
               "forest": ["in a forest", "among the trees", "in the woods"],
               "city": ["in a city", "among tall buildings", "in front of a skyline"],
               "snow": ["in the snow", "on a snowy field", "in a winter landscape"],
               "night": ["at night", "under a starry sky", "in the dark night"],
               "kitchen": ["in a kitchen", "on a tiled floor", "on the kitchen tiles"],
               "desert": ["in a desert", "among sand dunes", "in the dry desert"]}
MOTIONS = ["left", "right", "up", "down", "grow", "shrink", "appear", "disappear", "still"]
REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow",
           "appear": "disappear", "disappear": "appear", "still": "still"}
MOTION_WORDS = {
    "left": ["moves left", "moves to the left", "slides to the left", "drifts leftward", "travels left"],
    "right": ["moves right", "moves to the right", "slides to the right", "drifts rightward", "travels right"],
    "up": ["moves up", "rises", "floats upward", "goes up", "climbs upward"],
    "down": ["moves down", "falls", "sinks downward", "goes down", "drops down"],
    "grow": ["grows", "gets bigger", "expands", "grows larger", "swells up"],
    "shrink": ["shrinks", "gets smaller", "contracts", "shrinks down", "becomes smaller"],
    "appear": ["appears", "pops into view", "shows up", "comes into view", "suddenly appears"],
    "disappear": ["disappears", "vanishes", "fades away", "goes out of view", "suddenly disappears"],
    "still": ["stays still", "does not move", "sits still", "rests in place", "stays where it is"]}
MOTION_CLASS_NAMES = ["moving left", "moving right", "moving up", "moving down", "growing", "shrinking",
                      "appearing", "disappearing", "staying still"]
QA_MOTION_ANSWER = {"left": "left", "right": "right", "up": "up", "down": "down", "grow": "grow",
                    "shrink": "shrink", "appear": "appear", "disappear": "disappear", "still": "stay"}
COUNT_WORDS = ["zero", "one", "two", "three"]
CLUTTER = {"pebble": [(120, 120, 120), (95, 90, 85), (150, 145, 140)], "stick": [(110, 75, 40), (80, 55, 30)],
           "leaf": [(80, 120, 50), (120, 100, 40)]}
OUTLINE = (25, 25, 25)

# Egocentric world: everyday objects (nouns), hand actions (verbs), time-reversed in pairs too.
EGO_NOUNS = ["cup", "box", "bottle", "plate", "bowl", "knife", "bag"]
NOUN_CLASSES = EGO_NOUNS + ["table"]          # "table" only appears as a second noun ("puts the cup on the table")
VERB_CLASSES = ["take_(pick,_grab,_get)", "put_(place,_leave,_drop)", "move_left_(slide,_drag)",
                "move_right_(slide,_drag)", "lift_(raise,_hold_up)", "lower_(bring_down)",
                "pull_(draw,_bring_closer)", "push_(shove,_move_away)"]
EGO_VERBS = ["take", "put", "move_left", "move_right", "lift", "lower", "pull", "push"]
EGO_REVERSE = {"take": "put", "put": "take", "move_left": "move_right", "move_right": "move_left",
               "lift": "lower", "lower": "lift", "pull": "push", "push": "pull"}
EGO_TEXT = {  # EgoClip narrations ("#C C ..."); {o} = "the red cup"; a trailing "|table" adds the noun table
    "take": ["#C C picks {o}", "#C C picks up {o}", "#C C takes {o}", "#C C grabs {o}"],
    "put": ["#C C puts {o} down", "#C C places {o} on the table|table", "#C C puts {o} on the table|table",
            "#C C drops {o}"],
    "move_left": ["#C C moves {o} left", "#C C slides {o} to the left", "#C C drags {o} to the left"],
    "move_right": ["#C C moves {o} right", "#C C slides {o} to the right", "#C C drags {o} to the right"],
    "lift": ["#C C lifts {o}", "#C C raises {o}", "#C C lifts {o} up"],
    "lower": ["#C C lowers {o}", "#C C moves {o} down", "#C C brings {o} down"],
    "pull": ["#C C pulls {o} closer", "#C C brings {o} closer", "#C C draws {o} towards him"],
    "push": ["#C C pushes {o} away", "#C C moves {o} away", "#C C shoves {o} away"]}
EPIC_TEXT = {  # EPIC-KITCHENS narrations are short imperatives
    "take": ["take {o}", "pick up {o}", "grab {o}"], "put": ["put down {o}", "put {o} on table|table", "place {o}"],
    "move_left": ["move {o} left", "slide {o} left"], "move_right": ["move {o} right", "slide {o} right"],
    "lift": ["lift {o}", "raise {o}"], "lower": ["lower {o}", "bring down {o}"],
    "pull": ["pull {o} closer", "bring {o} closer"], "push": ["push {o} away", "move {o} away"]}
CHARADES_VERB = {"take": "Taking {n}", "put": "Putting {n} somewhere", "move_left": "Moving {n} to the left",
                 "move_right": "Moving {n} to the right", "lift": "Lifting {n}", "lower": "Lowering {n}",
                 "pull": "Pulling {n} closer", "push": "Pushing {n} away"}
EGO_SCENES = ["kitchen", "workshop", "garden", "office", "living room"]
EGO_SCENE_TEXTURE = {"kitchen": "kitchen", "workshop": "wood", "garden": "grass", "office": "desk",
                     "living room": "carpet"}
SKIN = (225, 175, 135)

# BUTD-style detector vocabulary: foreground classes only, ids 0-based (OA-Trans reads vocab[objects_id]).
STUFF = ["sky", "water", "sand", "tree", "grass", "building", "window", "snow", "rock", "star", "moon", "floor",
         "tile", "dune", "cloud", "wall"]
OBJECTS_VOCAB = SHAPES + list(CLUTTER) + STUFF
ATTRIBUTES_VOCAB = list(COLOURS) + ["grey", "brown", "white", "dark", "light"]


def item_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """A Generator for one item, independent of generation order (streams are named, hashed stably)."""
    code = sum((i + 1) * ord(c) for i, c in enumerate(stream))
    return np.random.default_rng([seed, code, index])


# ---------------------------------------------------------------------------------------------------------------
# Drawing: backgrounds, sprites, compositing

def _noise_field(rng, h, w, cells, amp):
    """Smooth value noise: a coarse random grid upsampled bilinearly; (h, w) float in [-amp, amp]."""
    grid = rng.uniform(-amp, amp, (cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def scene_canvas(scene: str, rng: np.random.Generator, h: int, w: int):
    """Render a background of type `scene` at (h, w). Returns (uint8 (h,w,3), stuff boxes [(class, x1,y1,x2,y2)])."""
    img = np.zeros((h, w, 3), np.float32)
    stuff = []
    yy = np.arange(h, dtype=np.float32)[:, None] / h
    xx = np.arange(w, dtype=np.float32)[None, :] / w

    def fill(y0, y1, x0, x1, col):
        img[int(y0):int(y1), int(x0):int(x1)] = col

    def vgrad(top, bottom):
        return np.asarray(top, np.float32) * (1 - yy[..., None]) + np.asarray(bottom, np.float32) * yy[..., None]

    j = lambda c, a=12: np.clip(np.asarray(c, np.float32) + rng.uniform(-a, a, 3), 0, 255)
    if scene == "beach":
        h1, h2 = int(h * rng.uniform(0.25, 0.35)), int(h * rng.uniform(0.5, 0.6))
        img[:] = vgrad(j((150, 200, 235)), j((200, 225, 240)))
        sea = j((60, 120, 165))
        img[h1:h2] = sea + 18 * np.sin(xx * rng.uniform(25, 40) + yy[h1:h2] * 60)[..., None]
        img[h2:] = j((215, 195, 145)) + _noise_field(rng, h - h2, w, 12, 12)[..., None]
        stuff += [("sky", 0, 0, w, h1), ("water", 0, h1, w, h2), ("sand", 0, h2, w, h)]
    elif scene == "forest":
        img[:] = j((30, 75, 40)) + _noise_field(rng, h, w, 8, 18)[..., None]
        g = int(h * 0.75)
        img[g:] = j((70, 110, 45)) + _noise_field(rng, h - g, w, 16, 10)[..., None]
        stuff.append(("grass", 0, g, w, h))
        for _ in range(max(3, w // 20)):
            tw = rng.uniform(0.03, 0.06) * w
            x0 = rng.uniform(0, w - tw)
            fill(0, g + rng.uniform(0, h - g), x0, x0 + tw, j((85, 60, 35)))
            stuff.append(("tree", x0, 0, x0 + tw, g))
    elif scene == "city":
        img[:] = vgrad(j((175, 185, 200)), j((215, 215, 220)))
        x = 0.0
        while x < w:
            bw = rng.uniform(0.12, 0.25) * w
            top = rng.uniform(0.15, 0.55) * h
            shade = rng.uniform(60, 110)
            fill(top, h, x, x + bw, (shade, shade, shade + 8))
            stuff.append(("building", x, top, min(w, x + bw), h))
            for wy in np.arange(top + 3, h - 3, max(4, h * 0.08)):
                for wx in np.arange(x + 2, x + bw - 3, max(4, w * 0.07)):
                    fill(wy, wy + max(1, h * 0.03), wx, wx + max(1, w * 0.03), (200, 195, 140))
            x += bw + rng.uniform(0, 0.03) * w
        stuff.append(("sky", 0, 0, w, h * 0.2))
    elif scene == "snow":
        g = int(h * rng.uniform(0.3, 0.45))
        img[:] = vgrad(j((170, 185, 205)), j((200, 210, 225)))
        img[g:] = j((238, 240, 246)) + _noise_field(rng, h - g, w, 10, 8)[..., None]
        stuff += [("sky", 0, 0, w, g), ("snow", 0, g, w, h)]
        for _ in range(2):
            rw, rx, ry = rng.uniform(0.06, 0.1) * w, rng.uniform(0, w), rng.uniform(g, h)
            fill(ry, ry + rw * 0.6, rx, rx + rw, j((130, 130, 135)))
            stuff.append(("rock", rx, ry, rx + rw, ry + rw * 0.6))
    elif scene == "night":
        img[:] = vgrad(j((10, 15, 45), 5), j((25, 30, 70), 5))
        n = int(w * h / 60)
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        img[ys, xs] = 255 - rng.uniform(0, 60, (n, 1))
        for k in range(3):
            stuff.append(("star", xs[k] - 1, ys[k] - 1, xs[k] + 2, ys[k] + 2))
        stuff.append(("sky", 0, 0, w, h))
        mr, mx, my = 0.07 * h, rng.uniform(0.1, 0.9) * w, rng.uniform(0.08, 0.25) * h
        moon = (xx * w - mx) ** 2 + (yy * h - my) ** 2 < mr ** 2
        img[moon] = (235, 235, 210)
        stuff.append(("moon", mx - mr, my - mr, mx + mr, my + mr))
    elif scene == "kitchen":
        a, b = j((220, 215, 200)), j((150, 95, 70)) if rng.random() < 0.5 else j((90, 120, 150))
        t = max(4, int(h * rng.uniform(0.12, 0.18)))
        check = ((np.arange(h)[:, None] // t + np.arange(w)[None, :] // t) % 2).astype(np.float32)[..., None]
        img[:] = a * check + b * (1 - check)
        img[np.arange(h) % t == 0] = (60, 60, 60)
        img[:, np.arange(w) % t == 0] = (60, 60, 60)
        stuff += [("floor", 0, 0, w, h), ("tile", 0, 0, t, t), ("tile", t, t, 2 * t, 2 * t)]
    elif scene == "desert":
        g = int(h * rng.uniform(0.25, 0.35))
        img[:] = vgrad(j((235, 215, 170)), j((245, 235, 205)))
        dune = g + 0.08 * h * np.sin(xx * rng.uniform(5, 9) + rng.uniform(0, 6)) * np.ones_like(yy)
        ground = (yy * h) > dune
        img[ground] = (np.asarray(j((215, 170, 105)), np.float32) + _noise_field(rng, h, w, 10, 14)[..., None])[ground]
        stuff += [("sky", 0, 0, w, g), ("dune", 0, g, w, h), ("sand", 0, g + 0.2 * h, w, h)]
    elif scene in ("wood", "grass", "desk", "carpet"):  # egocentric table tops / floors
        base = {"wood": (150, 105, 60), "grass": (75, 130, 55), "desk": (175, 175, 180), "carpet": (130, 60, 65)}
        img[:] = j(base[scene]) + _noise_field(rng, h, w, 24, 14)[..., None]
        if scene == "wood":
            img += 14 * np.sin(yy * h * 0.6 + 3 * np.sin(xx * 9))[..., None]
        if scene == "carpet":
            img += 10 * ((np.arange(h)[:, None] + np.arange(w)[None, :]) % 6 < 3)[..., None]
        if scene == "desk":
            img[:, ::max(8, w // 10)] -= 35
        stuff.append(("wall" if scene == "desk" else "floor", 0, 0, w, h))
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return np.clip(img, 0, 255).astype(np.uint8), stuff


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, L: float, fill, m: float):
    """Draw `shape` filling the box [m, L-m]^2 on a supersampled canvas with a dark outline."""
    w = max(2, int(round(L / 14)))
    a, b, c = m, L - m, L / 2
    kw = dict(fill=fill, outline=OUTLINE, width=w)
    if shape in ("square", "box"):
        d.rectangle([a, a, b, b], **kw)
        if shape == "box":
            d.line([a, a + (b - a) * 0.3, b, a + (b - a) * 0.3], fill=OUTLINE, width=w)
    elif shape == "circle":
        d.ellipse([a, a, b, b], **kw)
    elif shape == "triangle":
        d.polygon([(c, a), (b, b), (a, b)], **kw)
    elif shape == "diamond":
        d.polygon([(c, a), (b, c), (c, b), (a, c)], **kw)
    elif shape == "cross":
        t = (b - a) / 3
        p = [(a + t, a), (a + 2 * t, a), (a + 2 * t, a + t), (b, a + t), (b, a + 2 * t), (a + 2 * t, a + 2 * t),
             (a + 2 * t, b), (a + t, b), (a + t, a + 2 * t), (a, a + 2 * t), (a, a + t), (a + t, a + t)]
        d.polygon(p, **kw)
    elif shape == "cup":
        s = b - a
        d.ellipse([a + 0.55 * s, a + 0.3 * s, b, a + 0.7 * s], outline=OUTLINE, width=2 * w)
        d.polygon([(a, a + 0.1 * s), (a + 0.75 * s, a + 0.1 * s), (a + 0.65 * s, b), (a + 0.1 * s, b)], **kw)
    elif shape == "bottle":
        s = b - a
        d.rectangle([c - 0.1 * s, a, c + 0.1 * s, a + 0.3 * s], **kw)
        d.rectangle([c - 0.25 * s, a + 0.28 * s, c + 0.25 * s, b], **kw)
    elif shape == "plate":
        s = b - a
        d.ellipse([a, c - 0.28 * s, b, c + 0.28 * s], **kw)
        d.ellipse([a + 0.25 * s, c - 0.13 * s, b - 0.25 * s, c + 0.13 * s], outline=OUTLINE, width=w)
    elif shape == "bowl":
        s = b - a
        d.pieslice([a, a - 0.1 * s, b, b - 0.1 * s], 0, 180, **kw)
    elif shape == "knife":
        s = b - a
        d.polygon([(a, c - 0.12 * s), (a + 0.65 * s, c - 0.12 * s), (b, c), (a + 0.65 * s, c + 0.12 * s),
                   (a, c + 0.12 * s)], **kw)
        d.line([a + 0.3 * s, c - 0.12 * s, a + 0.3 * s, c + 0.12 * s], fill=OUTLINE, width=w)  # handle / blade
    elif shape == "bag":
        s = b - a
        d.arc([a + 0.25 * s, a, b - 0.25 * s, a + 0.5 * s], 180, 360, fill=OUTLINE, width=2 * w)
        d.polygon([(a + 0.15 * s, a + 0.25 * s), (b - 0.15 * s, a + 0.25 * s), (b, b), (a, b)], **kw)
    elif shape == "pebble":
        d.ellipse([a, a + 0.2 * (b - a), b, b - 0.1 * (b - a)], fill=fill)
    elif shape == "stick":
        d.line([a, b, b, a], fill=fill, width=max(2, int(L / 6)))
    elif shape == "leaf":
        d.ellipse([a + 0.25 * (b - a), a, b - 0.25 * (b - a), b], fill=fill)
    elif shape == "hand":
        d.ellipse([a, a, b, b], fill=fill, outline=(150, 105, 80), width=w)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=4096)
def sprite(shape: str, colour: tuple, size: int):
    """(rgb float32 (s,s,3), alpha float32 (s,s,1)) of a shape `size` px wide, drawn 4x supersampled then
    box-downsampled (anti-aliased edges, deterministic)."""
    size = max(2, int(size))
    L = 4 * size
    img = Image.new("RGBA", (L, L), (0, 0, 0, 0))
    _draw_shape(ImageDraw.Draw(img), shape, L, tuple(colour) + (255,), m=2.0)
    arr = np.asarray(img.reduce(4), dtype=np.float32) / 255.0
    return arr[..., :3] * 255.0, arr[..., 3:]


def paste(frame: np.ndarray, shape: str, colour, size: float, cx: float, cy: float, opacity: float = 1.0):
    """Alpha-composite a sprite centred at (cx, cy) into a float32 frame in place, clipped at the borders."""
    s = max(2, int(round(size)))
    rgb, alpha = sprite(shape, tuple(colour), s)
    x0, y0 = int(round(cx - s / 2)), int(round(cy - s / 2))
    H, W = frame.shape[:2]
    fx0, fy0, fx1, fy1 = max(0, x0), max(0, y0), min(W, x0 + s), min(H, y0 + s)
    if fx0 >= fx1 or fy0 >= fy1:
        return
    sx0, sy0 = fx0 - x0, fy0 - y0
    a = alpha[sy0:sy0 + fy1 - fy0, sx0:sx0 + fx1 - fx0] * opacity
    region = frame[fy0:fy1, fx0:fx1]
    region *= 1 - a
    region += a * rgb[sy0:sy0 + fy1 - fy0, sx0:sx0 + fx1 - fx0]


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of standard-normal samples; slicing it at random offsets is much cheaper than drawing fresh
    normals for every pixel of every frame, and just as deterministic."""
    return np.random.default_rng(12345).standard_normal(1 << 22, dtype=np.float32)


def finish(frame: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Add mild sensor noise (std `noise` in 0-255 units) to a contiguous float32 frame (or stack of frames) and
    convert it to uint8."""
    bank, flat = _noise_bank(), frame.reshape(-1)
    half = bank.size // 2
    for s in range(0, flat.size, half):
        m = min(half, flat.size - s)
        off = int(rng.integers(0, bank.size - m))
        flat[s:s + m] += noise * bank[off:off + m]
    return np.clip(frame, 0, 255, out=frame).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, fps: int, gop: int = 12):
    """Encode (T,H,W,3) uint8 RGB frames (H, W even) as H.264 mp4 (yuv420p). Single-threaded x264 with fixed
    options gives byte-identical files for identical frames. A short GOP keeps seeking cheap in the long
    egocentric videos."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.thread_count = 1
        time_base = Fraction(1, fps)
        stream.codec_context.time_base = time_base
        # mbtree off: with it, x264's lookahead made the bytes of some 64x64 clips depend on what the process
        # encoded before (checked by re-encoding the same frames in a different order).
        stream.options = {"preset": "veryfast", "crf": "17", "threads": "1", "sc_threshold": "0",
                          "bframes": "0", "x264-params": "mbtree=0"}
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts = i       # explicit timestamps (x264's rate control uses them)
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


# ---------------------------------------------------------------------------------------------------------------
# Short clips (WebVid / MSR-VTT): specs, rendering, captions

def _box_overlap(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def make_clip_spec(rng: np.random.Generator, S: float, num_objects: int | None = None) -> dict:
    """Sample one clip: a scene, 1-3 objects (distinct colours and shapes) with motions, clutter, camera jitter.
    Coordinates are in pixels of the S*64 frame."""
    W = 64 * S
    n = num_objects or int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    colours = rng.choice(list(COLOURS), n, replace=False)
    shapes = rng.choice(SHAPES, n, replace=False)
    objects, paths = [], []
    for i in range(n):
        size = "small" if rng.random() < 0.45 else "big"
        base = (rng.uniform(8, 11) if size == "small" else rng.uniform(20, 26)) * S
        motion = str(rng.choice(MOTIONS))
        s0 = s1 = base
        if motion == "grow":
            s0, s1 = base * 0.6, base * 1.4
        elif motion == "shrink":
            s0, s1 = base * 1.4, base * 0.6
        m = max(s0, s1) / 2 + 2 * S
        best = None
        for _ in range(40):
            dist = rng.uniform(24, 34) * S
            x0, y0 = rng.uniform(m, W - m), rng.uniform(m, W - m)
            x1, y1 = x0, y0
            if motion in ("left", "right"):
                lo = rng.uniform(m, W - m - dist)
                x0, x1 = (lo + dist, lo) if motion == "left" else (lo, lo + dist)
            if motion in ("up", "down"):
                lo = rng.uniform(m, W - m - dist)
                y0, y1 = (lo + dist, lo) if motion == "up" else (lo, lo + dist)
            r = max(s0, s1) / 2
            box = (min(x0, x1) - r, min(y0, y1) - r, max(x0, x1) + r, max(y0, y1) + r)
            cost = sum(_box_overlap(box, p) for p in paths)
            if best is None or cost < best[0]:
                best = (cost, x0, y0, x1, y1, box)
            if cost == 0:
                break
        _, x0, y0, x1, y1, box = best
        paths.append(box)
        objects.append(dict(colour=str(colours[i]), shape=str(shapes[i]), size=size, motion=motion,
                            x0=x0, y0=y0, x1=x1, y1=y1, s0=s0, s1=s1, switch=float(rng.uniform(0.35, 0.6))))
    clutter = []
    for _ in range(int(rng.integers(2, 6))):
        kind = str(rng.choice(list(CLUTTER)))
        col = CLUTTER[kind][int(rng.integers(len(CLUTTER[kind])))]
        clutter.append(dict(kind=kind, colour=col, size=float(rng.uniform(3, 6) * S),
                            x=float(rng.uniform(2, W - 2)), y=float(rng.uniform(2, W - 2))))
    jitter = float(rng.uniform(1, 2) * S) if rng.random() < JITTER_PROB else 0.0
    return dict(scene=str(rng.choice(SCENES)), objects=objects, clutter=clutter, jitter=jitter,
                render_seed=int(rng.integers(2 ** 31)))


def object_state(o: dict, u: float):
    """Centre, size and visibility of object `o` at clip time u in [0, 1]."""
    x = o["x0"] + (o["x1"] - o["x0"]) * u
    y = o["y0"] + (o["y1"] - o["y0"]) * u
    s = o["s0"] + (o["s1"] - o["s0"]) * u
    visible = {"appear": u >= o["switch"], "disappear": u < o["switch"]}.get(o["motion"], True)
    return x, y, s, visible


def render_clip(spec: dict, S: float, T: int = CLIP_FRAMES):
    """Render a clip. Returns (frames uint8 (T,H,W,3), per-frame ground truth [[(class, colour, x1,y1,x2,y2)]],
    stuff boxes in frame coordinates, camera offsets)."""
    H = W = int(64 * S)
    rng = np.random.default_rng(spec["render_seed"])
    pad = int(math.ceil(spec["jitter"])) + 1
    canvas, stuff = scene_canvas(spec["scene"], rng, H + 2 * pad, W + 2 * pad)
    canvas = canvas.astype(np.float32)
    # camera: a bounded random walk of the crop window (0 when this clip has no jitter)
    offs, ox, oy = [], 0.0, 0.0
    for _ in range(T):
        if spec["jitter"] > 0:
            ox = float(np.clip(ox + rng.normal(0, 0.7 * spec["jitter"]), -spec["jitter"], spec["jitter"]))
            oy = float(np.clip(oy + rng.normal(0, 0.7 * spec["jitter"]), -spec["jitter"], spec["jitter"]))
        offs.append((int(round(ox)), int(round(oy))))
    for c in spec["clutter"]:     # clutter is static in the world: paint it into the background once
        paste(canvas, c["kind"], c["colour"], c["size"], c["x"] + pad, c["y"] + pad)
    clutter_boxes = [(c["kind"], "brown" if c["kind"] == "stick" else "grey", c["x"] - c["size"] / 2,
                      c["y"] - c["size"] / 2, c["x"] + c["size"] / 2, c["y"] + c["size"] / 2)
                     for c in spec["clutter"]]
    frames, truth = np.empty((T, H, W, 3), np.float32), []
    order = sorted(range(len(spec["objects"])), key=lambda i: -spec["objects"][i]["s0"])  # big ones behind
    for t in range(T):
        u = t / (T - 1)
        dx, dy = offs[t]
        f = frames[t]
        f[:] = canvas[pad + dy:pad + dy + H, pad + dx:pad + dx + W]
        boxes = [(k, col, x1 - dx, y1 - dy, x2 - dx, y2 - dy) for k, col, x1, y1, x2, y2 in clutter_boxes]
        for i in order:
            o = spec["objects"][i]
            x, y, s, vis = object_state(o, u)
            if vis:
                paste(f, o["shape"], COLOURS[o["colour"]], s, x - dx, y - dy)
                boxes.append((o["shape"], o["colour"], x - dx - s / 2, y - dy - s / 2, x - dx + s / 2, y - dy + s / 2))
        truth.append(boxes)
    frames = finish(frames, rng, 3.0)
    stuff = [(c, x1 - pad, y1 - pad, x2 - pad, y2 - pad) for c, x1, y1, x2, y2 in stuff]
    return frames, truth, stuff


def _phrase(o: dict, rng, with_size: bool = True) -> str:
    words = ["a"]
    if with_size:
        words.append(str(rng.choice(SIZE_WORDS[o["size"]])))
    words += [o["colour"], str(rng.choice(SHAPE_WORDS[o["shape"]]))]
    return " ".join(words)


def caption(spec: dict, rng: np.random.Generator, template: int | None = None) -> tuple[str, bool]:
    """One templated caption for a clip spec. Returns (caption, names_a_small_object). The same rng state on a
    spec whose motions are reversed gives the same words except the motions (used for twins and MC options)."""
    objs = spec["objects"]
    m = objs[0]
    main = _phrase(m, rng, with_size=rng.random() < 0.8 or m["size"] == "small")
    mv = str(rng.choice(MOTION_WORDS[m["motion"]]))
    sc = str(rng.choice(SCENE_WORDS[spec["scene"]]))
    named = [m]
    k = int(rng.integers(7)) if template is None else template
    if len(objs) >= 2:
        o2 = objs[1]
        other = _phrase(o2, rng)
        mv2 = str(rng.choice(MOTION_WORDS[o2["motion"]]))
        named.append(o2)
        forms = [f"{main} {mv} while {other} {mv2} {sc}",
                 f"{sc}, {main} {mv} and {other} {mv2}",
                 f"{main} {mv} next to {other} {sc}",
                 f"{other} {mv2} while {main} {mv} {sc}",
                 f"there is {main} that {mv} and {other} that {mv2} {sc}",
                 f"a video of {main} that {mv} beside {other} {sc}",
                 f"{main} {mv} {sc} as {other} {mv2}"]
        if len(objs) == 3 and k in (0, 4):
            o3 = objs[2]
            named.append(o3)
            forms[k] += f" and {_phrase(o3, rng)} {rng.choice(MOTION_WORDS[o3['motion']])}"
    else:
        forms = [f"{main} {mv} {sc}", f"{sc}, {main} {mv}", f"there is {main} that {mv} {sc}",
                 f"a video of {main} that {mv} {sc}", f"{sc} {main} {mv}", f"{main} {sc} {mv}",
                 f"we see {main} that {mv} {sc}"]
    if "next to" in forms[k] or "beside" in forms[k]:
        named = named[:2]
    return forms[k], any(o["size"] == "small" for o in named)


def reversed_spec(spec: dict, which: str = "all") -> dict:
    """The same clip with motions reversed (all objects, or only the main one)."""
    objs = [dict(o) for o in spec["objects"]]
    for i, o in enumerate(objs):
        if which == "all" or i == 0:
            o["motion"] = REVERSE[o["motion"]]
    return dict(spec, objects=objs)


def paraphrases(spec: dict, rng: np.random.Generator, n: int) -> list[tuple[str, bool]]:
    """n distinct captions of one clip (different templates and word choices)."""
    out, seen = [], set()
    templates = rng.permutation(7)
    for attempt in range(50):
        c = caption(spec, rng, int(templates[attempt % 7]))
        if c[0] not in seen:
            seen.add(c[0])
            out.append(c)
        if len(out) == n:
            break
    return out


# ---------------------------------------------------------------------------------------------------------------
# BUTD-style detections (degraded ground truth)

def detect(truth, stuff, rng: np.random.Generator, H: int, W: int) -> dict:
    """Turn one frame's ground-truth boxes into a noisy detector output: box jitter, class confusions, misses,
    confidences, clutter and background stuff detected too, topped up with low-confidence false positives to
    MIN_BOXES (BUTD keeps at least 10 boxes per image)."""
    rows = []  # (class id, attr id, conf, x1, y1, x2, y2)
    for cls, col, x1, y1, x2, y2 in truth:
        is_shape = cls in SHAPES
        size = max(x2 - x1, y2 - y1)
        miss = (0.3 if size < 12 * W / 64 else 0.08) if is_shape else 0.35
        if rng.random() < miss:
            continue
        if is_shape and rng.random() < 0.1:
            cls = str(rng.choice([s for s in SHAPES if s != cls]))
        elif not is_shape and rng.random() < 0.2:
            cls = str(rng.choice(list(CLUTTER)))
        conf = rng.uniform(0.55, 0.99) if is_shape else rng.uniform(0.25, 0.7)
        j = 0.08 * max(2.0, size)
        box = np.array([x1, y1, x2, y2]) + rng.normal(0, j, 4)
        attr = col if rng.random() < 0.85 else str(rng.choice(ATTRIBUTES_VOCAB))
        rows.append((OBJECTS_VOCAB.index(cls), ATTRIBUTES_VOCAB.index(attr), conf, *box))
    for cls, x1, y1, x2, y2 in stuff:
        if rng.random() < 0.6:
            box = np.array([x1, y1, x2, y2]) + rng.normal(0, 2.0 * W / 64, 4)
            attr = {"sky": "light", "water": "blue", "snow": "white", "tree": "brown", "grass": "green",
                    "night": "dark"}.get(cls, "grey")
            rows.append((OBJECTS_VOCAB.index(cls), ATTRIBUTES_VOCAB.index(attr), rng.uniform(0.2, 0.6), *box))
    while len(rows) < MIN_BOXES or rng.random() < 0.3:
        w, h = rng.uniform(4, W / 2, 2)
        x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
        rows.append((int(rng.integers(len(OBJECTS_VOCAB))), int(rng.integers(len(ATTRIBUTES_VOCAB))),
                     rng.uniform(0.05, 0.3), x, y, x + w, y + h))
    rows.sort(key=lambda r: -r[2])
    arr = np.array([r[3:] for r in rows], np.float32)
    arr[:, [0, 2]] = np.clip(arr[:, [0, 2]], 0, W - 1)
    arr[:, [1, 3]] = np.clip(arr[:, [1, 3]], 0, H - 1)
    arr[:, 2] = np.maximum(arr[:, 2], arr[:, 0] + 1)
    arr[:, 3] = np.maximum(arr[:, 3], arr[:, 1] + 1)
    return dict(bbox=arr, objects_id=np.array([r[0] for r in rows], np.int64),
                objects_conf=np.array([r[2] for r in rows], np.float32),
                attrs_id=np.array([r[1] for r in rows], np.int64),
                attrs_conf=np.array([rng.uniform(0.2, 0.9) for _ in rows], np.float32),
                image_h=np.int64(H), image_w=np.int64(W), num_bbox=np.int64(len(rows)))


def detection_frames(T: int) -> list[int]:
    """Midpoints of 8 equal segments, `(a+b)//2` with a, b from linspace(0, T, 9) (OA-Trans' WebVid frames)."""
    bounds = np.linspace(0, T, NUM_DETECTION_FRAMES + 1).astype(int)
    return [int((a + b) // 2) for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------------------------------------------------------
# Egocentric videos: plan a sequence of hand actions, then render it

def plan_ego_video(rng: np.random.Generator, duration: float, S: float, scene: str | None = None,
                   min_gap=(0.3, 1.8), action_len=(1.2, 2.4)) -> dict:
    """Place 4-6 objects on a wide table top and plan hand actions until `duration` seconds.

    Each action: dict(verb, obj, start, end). Consecutive actions avoid repeating any (verb, object) of the
    previous 4, so neighbouring clips share the scene but differ in action; a taken object is put back within a
    few actions (one hand)."""
    W = 64 * S
    CW, CH = 2.0 * W, 1.5 * W     # canvas (the "room"); the camera sees a W x W window of it
    scene = scene or str(rng.choice(EGO_SCENES))
    pace = float(rng.uniform(0.75, 1.35))    # per-video pace, so beta (mean narration gap) differs by video
    n = int(rng.integers(4, 7))
    pairs = [(c, nn) for c in COLOURS for nn in EGO_NOUNS]
    picks = rng.choice(len(pairs), n, replace=False)
    objects = []
    for k in picks:
        c, nn = pairs[int(k)]
        for _ in range(30):   # keep objects apart so that they rarely occlude each other at the start
            x, y = float(rng.uniform(0.15, 0.85) * CW), float(rng.uniform(0.25, 0.8) * CH)
            if all(abs(x - o["x"]) > 20 * S or abs(y - o["y"]) > 20 * S for o in objects):
                break
        objects.append(dict(colour=c, noun=nn, x=x, y=y, s=float(rng.uniform(12, 16) * S), scale=1.0,
                            visible=True))
    init = [dict(o) for o in objects]
    state = [dict(o) for o in objects]
    actions, recent, held, since_take = [], [], None, 0
    t = float(rng.uniform(0.5, 1.5))
    m = 10 * S
    while True:
        d = float(rng.uniform(*action_len) * pace)
        if t + d > duration - 0.3:
            break
        options = []
        for i, o in enumerate(state):
            if not o["visible"]:
                continue
            if held is None:
                options.append(("take", i))
            if o["x"] - 26 * S > m: options.append(("move_left", i))
            if o["x"] + 26 * S < CW - m: options.append(("move_right", i))
            if o["y"] - 16 * S > m: options.append(("lift", i))
            if o["y"] + 16 * S < CH - m: options.append(("lower", i))
            if o["scale"] < 1.3: options.append(("pull", i))
            if o["scale"] > 0.8: options.append(("push", i))
        fresh = [a for a in options if a not in recent[-4:]] or options
        if held is not None and (since_take >= 2 or rng.random() < 0.5 or not fresh):
            fresh = [("put", held)]     # one hand: a taken object is put back within a few actions
        verb, i = fresh[int(rng.integers(len(fresh)))]
        o = state[i]
        before = dict(o)
        since_take += 1
        if verb == "take":
            o["visible"], held, since_take = False, i, 0
        elif verb == "put":
            o["visible"], held = True, None
        elif verb == "move_left":
            o["x"] -= rng.uniform(20, 26) * S
        elif verb == "move_right":
            o["x"] += rng.uniform(20, 26) * S
        elif verb == "lift":
            o["y"] -= rng.uniform(12, 16) * S
        elif verb == "lower":
            o["y"] += rng.uniform(12, 16) * S
        elif verb == "pull":
            o["scale"] *= 1.5
        elif verb == "push":
            o["scale"] /= 1.5
        actions.append(dict(verb=verb, obj=i, start=round(t, 3), end=round(t + d, 3),
                            before=before, after=dict(o)))
        recent.append((verb, i))
        t += d + float(rng.uniform(*min_gap) * pace)
    clutter = [dict(kind=str(k), colour=CLUTTER[str(k)][0], size=float(rng.uniform(3, 6) * S),
                    x=float(rng.uniform(0, CW)), y=float(rng.uniform(0, CH)))
               for k in rng.choice(list(CLUTTER), int(rng.integers(6, 12)))]
    return dict(scene=scene, duration=float(duration), objects=init, actions=actions, clutter=clutter,
                canvas=(CH, CW), render_seed=int(rng.integers(2 ** 31)))


def _ego_states(plan: dict, t: float):
    """Object states (x, y, size, visible) at time t, and the action in progress (or None)."""
    states = [(o["x"], o["y"], o["s"] * o["scale"], o["visible"]) for o in plan["objects"]]
    current = None
    for a in plan["actions"]:
        if a["start"] > t:
            break
        b, e = a["before"], a["after"]
        if t >= a["end"]:
            states[a["obj"]] = (e["x"], e["y"], e["s"] * e["scale"], e["visible"])
            continue
        u = (t - a["start"]) / (a["end"] - a["start"])
        current = (a, u)
        x = b["x"] + (e["x"] - b["x"]) * u
        y = b["y"] + (e["y"] - b["y"]) * u
        s = b["s"] * (b["scale"] + (e["scale"] - b["scale"]) * u)
        vis = b["visible"] if u < 0.5 else e["visible"]   # take / put switch at the action's midpoint
        states[a["obj"]] = (x, y, s, vis)
    return states, current


def render_ego(plan: dict, S: float, fps: int = EGO_FPS) -> np.ndarray:
    """Render an egocentric video: the camera pans towards the object being handled (a slow first-order
    follow) and shakes slightly; the hand and forearm enter from the bottom edge while an action runs."""
    H = W = int(64 * S)
    rng = np.random.default_rng(plan["render_seed"])
    CH, CW = int(plan["canvas"][0]), int(plan["canvas"][1])
    pad = int(4 * S)
    canvas, _ = scene_canvas(EGO_SCENE_TEXTURE[plan["scene"]], rng, CH + 2 * pad, CW + 2 * pad)
    canvas = canvas.astype(np.float32)
    for c in plan["clutter"]:
        paste(canvas, c["kind"], c["colour"], c["size"], c["x"] + pad, c["y"] + pad)
    T = int(round(plan["duration"] * fps))
    frames = np.zeros((T, H, W, 3), np.uint8)
    cam = np.array([CW / 2, CH / 2], np.float64)
    shake = np.zeros(2)
    next_i = 0
    for f in range(T):
        t = f / fps
        states, current = _ego_states(plan, t)
        while next_i < len(plan["actions"]) and plan["actions"][next_i]["end"] < t:
            next_i += 1
        if next_i < len(plan["actions"]):    # look at the object of the current / next action
            b = plan["actions"][next_i]["before"]
            target = np.array([b["x"], b["y"]])
        else:
            target = cam
        cam += (target - cam) * (1 - math.exp(-1.0 / (0.9 * fps)))
        shake = np.clip(shake + rng.normal(0, 0.6 * S, 2), -2 * S, 2 * S)
        cx = float(np.clip(cam[0] + shake[0], W / 2 - pad, CW - W / 2 + pad))
        cy = float(np.clip(cam[1] + shake[1], H / 2 - pad, CH - H / 2 + pad))
        x0, y0 = int(round(cx - W / 2)) + pad, int(round(cy - H / 2)) + pad
        frame = canvas[y0:y0 + H, x0:x0 + W].copy()
        ox, oy = x0 - pad, y0 - pad
        if current is not None:   # hand + forearm under the handled object
            a, u = current
            x, y, s, _ = states[a["obj"]]
            hx, hy = x - ox, y - oy + 0.35 * s
            armw = 7 * S
            xs = np.arange(W)
            for yy in range(max(0, int(hy)), H):
                cxx = hx + (yy - hy) * 0.25
                sel = np.abs(xs - cxx) < armw / 2
                frame[yy, sel] = (np.asarray(SKIN, np.float32) * 0.92)
            paste(frame, "hand", SKIN, 9 * S, hx, hy)
        for i, o in enumerate(plan["objects"]):
            x, y, s, vis = states[i]
            if vis:
                paste(frame, o["noun"], COLOURS[o["colour"]], s, x - ox, y - oy)
        frames[f] = finish(frame, rng, 3.0)
    return frames


def ego_text(plan: dict, a: dict, rng: np.random.Generator, table=EGO_TEXT) -> tuple[str, int, list[int]]:
    """(narration, verb class, noun classes) for one action."""
    o = plan["objects"][a["obj"]]
    form = str(rng.choice(table[a["verb"]]))
    nouns = [NOUN_CLASSES.index(o["noun"])]
    if form.endswith("|table"):
        form = form[:-len("|table")]
        nouns.append(NOUN_CLASSES.index("table"))
    return form.format(o=f"the {o['colour']} {o['noun']}"), EGO_VERBS.index(a["verb"]), nouns


# ---------------------------------------------------------------------------------------------------------------
# Worker jobs (run in a process pool; each writes its own files)

def _job(job):
    kind = job[0]
    if kind == "clip":       # (kind, spec, S, path, twin_path | None, objects_dir | None, twin_objects_dir, seed)
        _, spec, S, path, twin_path, obj_dir, twin_obj_dir, det_seed = job
        frames, truth, stuff = render_clip(spec, S)
        write_video(Path(path), frames, CLIP_FPS)
        H, W = frames.shape[1:3]
        T = len(frames)
        rng = np.random.default_rng(det_seed)
        if obj_dir:
            for k, fi in enumerate(detection_frames(T)):
                _save_npz(Path(obj_dir) / f"{k}.npz", detect(truth[fi], stuff, rng, H, W))
        if twin_path:
            write_video(Path(twin_path), frames[::-1].copy(), CLIP_FPS)
            for k, fi in enumerate(detection_frames(T)):
                _save_npz(Path(twin_obj_dir) / f"{k}.npz", detect(truth[T - 1 - fi], stuff, rng, H, W))
    elif kind == "ego":      # (kind, plan, S, path)
        _, plan, S, path = job
        write_video(Path(path), render_ego(plan, S), EGO_FPS, gop=EGO_FPS * 2)
    return kind


def _save_npz(path: Path, arrays: dict):
    """np.savez_compressed equivalent with a fixed timestamp in the zip entries, so the bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# Dataset writers (annotations only; videos are rendered by the jobs they return)

def _write_csv(path: Path, header: list[str], rows, delimiter=","):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _write_lines(path: Path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


def build_webvid(root: Path, cfg: dict, seed: int, S: float, texts: list, jobs: list) -> dict:
    """WebVid-style pre-training set with reversed twins and BUTD-style detections."""
    out = root / "webvid"
    counts = {}
    next_id = 1000000
    for split, n in (("train", cfg["webvid_train"]), ("val", cfg["webvid_val"])):
        rng = item_rng(seed, f"webvid_{split}", 0)
        rows = []
        for i in range(n):
            spec = make_clip_spec(rng, S)
            vid, next_id = next_id, next_id + 1
            twin = split == "train" and rng.random() < cfg.get("twin_fraction", TWIN_FRACTION) and \
                any(o["motion"] != "still" for o in spec["objects"])
            page = f"{(vid // 50) * 50 + 1:06d}_{(vid // 50) * 50 + 50:06d}"
            det_seed = int(rng.integers(2 ** 31))
            cap_seed = int(rng.integers(2 ** 31))
            cap, _ = caption(spec, np.random.default_rng(cap_seed))
            dur = f"PT00H00M{CLIP_FRAMES / CLIP_FPS:04.1f}S"
            if twin:
                tid, next_id = next_id, next_id + 1
                tpage = f"{(tid // 50) * 50 + 1:06d}_{(tid // 50) * 50 + 50:06d}"
                tcap, _ = caption(reversed_spec(spec), np.random.default_rng(cap_seed))
                rows.append([vid, f"synth://webvid/{page}/{vid}.mp4", dur, page, cap, tid])
                rows.append([tid, f"synth://webvid/{tpage}/{tid}.mp4", dur, tpage, tcap, vid])
                texts += [cap, tcap]
                jobs.append(("clip", spec, S, str(out / "videos" / page / f"{vid}.mp4"),
                             str(out / "videos" / tpage / f"{tid}.mp4"), str(out / "objects" / page / str(vid)),
                             str(out / "objects" / tpage / str(tid)), det_seed))
            else:
                rows.append([vid, f"synth://webvid/{page}/{vid}.mp4", dur, page, cap, ""])
                texts.append(cap)
                jobs.append(("clip", spec, S, str(out / "videos" / page / f"{vid}.mp4"), None,
                             str(out / "objects" / page / str(vid)), None, det_seed))
        _write_csv(out / f"results_{split}.csv", ["videoid", "contentUrl", "duration", "page_dir", "name",
                                                  "reverse_of"], rows)
        counts[f"webvid_{split}"] = len(rows)
        counts[f"webvid_{split}_twins"] = sum(1 for r in rows if r[5] != "") // 2
    _write_lines(out / "objects_vocab.txt", OBJECTS_VOCAB)
    _write_lines(out / "attributes_vocab.txt", ATTRIBUTES_VOCAB)
    texts += OBJECTS_VOCAB + ATTRIBUTES_VOCAB
    return counts


def _qa_for(spec: dict, rng) -> list[tuple[str, str, str]]:
    """(type, question, answer) triples about one clip; answers come from a small vocabulary."""
    objs = spec["objects"]
    m = objs[0]
    qs = [("motion", f"what does the {m['colour']} {m['shape']} do?", QA_MOTION_ANSWER[m["motion"]])]
    o = objs[int(rng.integers(len(objs)))]
    pool = [("color", f"what color is the {o['shape']}?", o["colour"]),
            ("shape", f"what shape is the {o['colour']} object?", o["shape"]),
            ("size", f"is the {o['colour']} {o['shape']} big or small?", o["size"]),
            ("count", "how many shapes are there?", COUNT_WORDS[len(objs)]),
            ("scene", "where is this happening?", spec["scene"])]
    if len(objs) > 1:
        o2 = objs[1]
        pool.append(("motion", f"what does the {o2['colour']} {o2['shape']} do?", QA_MOTION_ANSWER[o2["motion"]]))
    for k in rng.choice(len(pool), 3, replace=False):
        qs.append(pool[int(k)])
    return qs


def _change_attribute(spec: dict, rng) -> dict:
    """The same clip with one attribute of the main object (colour, shape or size) or the scene changed."""
    objs = [dict(o) for o in spec["objects"]]
    m = objs[0]
    what = str(rng.choice(["colour", "shape", "size", "scene"]))
    if what == "scene":
        return dict(spec, objects=objs, scene=str(rng.choice([s for s in SCENES if s != spec["scene"]])))
    if what == "colour":
        m["colour"] = str(rng.choice([c for c in COLOURS if all(c != o["colour"] for o in objs)]))
    elif what == "shape":
        m["shape"] = str(rng.choice([s for s in SHAPES if all(s != o["shape"] for o in objs)]))
    else:
        m["size"] = "big" if m["size"] == "small" else "small"
    return dict(spec, objects=objs)


def build_msrvtt(root: Path, cfg: dict, seed: int, S: float, texts: list, jobs: list) -> dict:
    """MSR-VTT-style retrieval (several paraphrases per video), MSRVTT-QA, MSRVTT-MC and motion classification."""
    out = root / "msrvtt"
    rng = item_rng(seed, "msrvtt", 0)
    splits = [("train", cfg["msrvtt_train"]), ("validate", cfg["msrvtt_val"]), ("test", cfg["msrvtt_test"])]
    annotations, videos, specs = [], [], {}
    split_ids = {"train": [], "validate": [], "test": []}
    vid_n = 0
    for split, n in splits:
        for _ in range(n):
            vid = f"video{vid_n}"
            vid_n += 1
            spec = make_clip_spec(rng, S)
            specs[vid] = spec
            split_ids[split].append(vid)
            videos.append({"video_id": vid, "split": split, "id": len(videos)})
            for cap, small in paraphrases(spec, np.random.default_rng(rng.integers(2 ** 31)),
                                          cfg["captions_per_video"]):
                annotations.append({"image_id": vid, "caption": cap, "id": len(annotations),
                                    "small_object": bool(small)})
            jobs.append(("clip", spec, S, str(out / "videos" / "all" / f"{vid}.mp4"), None, None, None, 0))
    (out / "annotation").mkdir(parents=True, exist_ok=True)
    (out / "annotation" / "MSR_VTT.json").write_text(json.dumps({"annotations": annotations, "videos": videos}),
                                                      encoding="utf-8")
    texts += [a["caption"] for a in annotations]
    short = {"train": "train", "validate": "val", "test": "test"}
    for split, ids in split_ids.items():
        _write_lines(out / "splits" / f"{short[split]}_list.txt", ids)
    # QA
    for split, ids in split_ids.items():
        rows = []
        for vid in ids:
            for qtype, q, a in _qa_for(specs[vid], rng):
                rows.append({"video_id": vid, "question": q, "answer": a, "id": len(rows), "type": qtype})
                texts += [q, a]
        _write_jsonl(out / f"msrvtt_qa_{short[split]}.jsonl", rows)
    # MC: truth, its reversed-motion twin (when the main object moves), one changed attribute, random others
    first_caps = {}
    for a in annotations:
        first_caps.setdefault(a["image_id"], a["caption"])
    for split, ids in split_ids.items():
        rows = []
        for vid in ids:
            spec = specs[vid]
            cs = int(rng.integers(2 ** 31))
            truth, _ = caption(spec, np.random.default_rng(cs))
            hard = []
            if spec["objects"][0]["motion"] != "still":
                hard.append(("rev", caption(reversed_spec(spec, "main"), np.random.default_rng(cs))[0]))
            hard.append(("attr", caption(_change_attribute(spec, rng), np.random.default_rng(cs))[0]))
            opts = [("truth", truth)] + [h for h in hard if h[1] != truth]
            while len(opts) < 5:
                other = ids[int(rng.integers(len(ids)))] if len(ids) > 5 else f"video{int(rng.integers(vid_n))}"
                c = first_caps[other]
                if other != vid and all(c != x[1] for x in opts):
                    opts.append(("rand", c))
            order = rng.permutation(5)
            options = [opts[int(k)][1] for k in order]
            kinds = [opts[int(k)][0] for k in order]
            rows.append({"clip_name": vid, "options": options, "answer": kinds.index("truth"),
                         "reversed_option": kinds.index("rev") if "rev" in kinds else None, "id": len(rows)})
            texts += options
        _write_jsonl(out / f"msrvtt_mc_{short[split]}.jsonl", rows)
    counts = build_motion_classes(out, cfg, seed, S, jobs)
    texts += MOTION_CLASS_NAMES
    test_caps = [a["caption"] for a in annotations if a["image_id"] in set(split_ids["test"])]
    return {"msrvtt_train": len(split_ids["train"]), "msrvtt_val": len(split_ids["validate"]),
            "msrvtt_test": len(split_ids["test"]), "msrvtt_captions": len(annotations),
            "msrvtt_test_duplicate_caption_fraction": round(1 - len(set(test_caps)) / max(1, len(test_caps)), 4),
            **counts}


def build_motion_classes(out: Path, cfg: dict, seed: int, S: float, jobs: list) -> dict:
    """Motion classification (K400-style lists, MOTION_CLASS_NAMES): clips of their own with exactly one object,
    whose motion is the label -- so the label is what the pixels show, and a perfect motion reader scores 100%.
    (In the MSR-VTT videos 70% of the clips hold 2-3 objects, each with its own motion, and nothing marks the one
    a label would name.) The motion is drawn uniformly over the 9 classes; scene, clutter, camera jitter and the
    object's look as in every other clip. Their own random stream: the other files do not change with their
    number."""
    rng = item_rng(seed, "action", 0)
    _write_lines(out / "action" / "classes.txt", MOTION_CLASS_NAMES)
    counts, k = {}, 0
    for split in ("train", "val", "test"):
        lines = []
        for _ in range(cfg[f"action_{split}"]):
            spec = make_clip_spec(rng, S, num_objects=1)
            rel = f"action/videos/motion{k}.mp4"
            k += 1
            lines.append(f"{rel}\t{MOTIONS.index(spec['objects'][0]['motion'])}")
            jobs.append(("clip", spec, S, str(out / rel), None, None, None, 0))
        _write_lines(out / "action" / f"{split}.list", lines)
        counts[f"action_{split}"] = len(lines)
    return counts


def _fake_uid(rng) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _clip(uid, dur, start, end, text, verb, nouns) -> dict:
    return {"video_uid": uid, "video_dur": round(dur, 3), "clip_start": round(start, 3), "clip_end": round(end, 3),
            "clip_text": text, "tag_verb": str([verb]), "tag_noun": str(nouns)}


def build_egoclip(root: Path, cfg: dict, seed: int, S: float, texts: list, jobs: list) -> dict:
    """EgoClip (train videos, contextual windows t +- beta/(2 alpha)) and EgoMCQ (held-out videos)."""
    out = root / "egoclip"
    lo, hi = cfg["ego_duration"]

    def videos(n, rng):
        vids = []
        for _ in range(n):
            uid = _fake_uid(rng)
            plan = plan_ego_video(rng, float(round(rng.uniform(lo, hi), 1)), S)
            narr = []   # (source, index, time, text, verb, nouns) for two annotators
            for p, (source, keep) in enumerate((("narration_pass_1", 1.0), ("narration_pass_2", 0.85))):
                r = np.random.default_rng(rng.integers(2 ** 31))
                k = 0
                for a in plan["actions"]:
                    if r.random() > keep:
                        continue
                    t = (a["start"] + a["end"]) / 2 + r.normal(0, 0.1 if p == 0 else 0.25)
                    text, verb, nouns = ego_text(plan, a, r)
                    narr.append((source, k, round(float(np.clip(t, 0, plan["duration"])), 3), text, verb, nouns))
                    k += 1
            t1 = [x[2] for x in narr if x[0] == "narration_pass_1"]
            beta = float(np.mean(np.diff(t1))) if len(t1) > 1 else 4.0
            vids.append((uid, plan, narr, beta))
            jobs.append(("ego", plan, S, str(out / "videos" / f"{uid}.mp4")))
        return vids

    # Two random streams, so that the held-out EgoMCQ videos do not change with the number of training videos
    train = videos(cfg["ego_train_videos"], item_rng(seed, "egoclip", 0))
    rng = item_rng(seed, "egomcq", 0)
    held = videos(cfg["ego_mcq_videos"], rng)
    alpha = float(np.mean([b for *_, b in train]))   # mean beta over the (training) videos, as in Eq. 1
    rows = []
    for uid, plan, narr, beta in train:
        half = beta / (2 * alpha)
        for source, k, t, text, verb, nouns in narr:
            rows.append([len(rows), uid, plan["duration"], source, k, t, round(t - half, 3), round(t + half, 3),
                         text, str([verb]), str(nouns)])
            texts.append(text)
    _write_csv(out / "egoclip.csv", ["clip_idx", "video_uid", "video_dur", "narration_source", "narration_ind",
                                     "narration_time", "clip_start", "clip_end", "clip_text", "tag_verb",
                                     "tag_noun"], rows, delimiter="\t")
    _write_lines(out / "verb_classes.txt", VERB_CLASSES)
    _write_lines(out / "noun_classes.txt", NOUN_CLASSES)
    texts += VERB_CLASSES + NOUN_CLASSES
    # EgoMCQ from the held-out videos: one annotator picked at random per video
    per_video = []
    for uid, plan, narr, beta in held:
        source = "narration_pass_1" if rng.random() < 0.5 else "narration_pass_2"
        ns = [x for x in narr if x[0] == source]
        half = beta / (2 * alpha)
        per_video.append([_clip(uid, plan["duration"], t - half, t + half, text, verb, nouns)
                          for _, _, t, text, verb, nouns in ns])
        texts += [x[3] for x in ns]
    mcq = {}
    inter = intra = 0
    for vi, clips in enumerate(per_video):          # inter-video: the true clip + 4 clips from 4 other videos
        others = [j for j in range(len(per_video)) if j != vi]
        if len(others) < 4:
            break
        for c in clips:
            for _ in range(20):
                picks = rng.choice(others, 4, replace=False)
                choices = [c] + [per_video[j][int(rng.integers(len(per_video[j])))] for j in picks]
                if len({x["clip_text"] for x in choices}) == 5:
                    break
            else:
                continue
            order = rng.permutation(5)
            mcq[str(len(mcq))] = {"query": c, "choices": {str(k): choices[int(order[k])] for k in range(5)},
                                  "answer": int(np.argmin(order)), "types": 1}
            inter += 1
    for clips in per_video:                          # intra-video: 5 contiguous clips of one video
        for s in range(0, len(clips) - 4):
            choices = clips[s:s + 5]
            if len({x["clip_text"] for x in choices}) < 5:
                continue
            q = int(rng.integers(5))
            order = rng.permutation(5)
            mcq[str(len(mcq))] = {"query": choices[q],
                                  "choices": {str(k): choices[int(order[k])] for k in range(5)},
                                  "answer": int(np.where(order == q)[0][0]), "types": 2}
            intra += 1
    (out / "egomcq.json").write_text(json.dumps(mcq), encoding="utf-8")
    return {"egoclip_train_videos": len(train), "egoclip_clips": len(rows), "egoclip_alpha_s": round(alpha, 3),
            "egomcq_videos": len(held), "egomcq_inter": inter, "egomcq_intra": intra}


def _ts(sec: float) -> str:
    h, rem = divmod(sec, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h):02d}:{int(m):02d}:{s:06.3f}"


def relevancy_matrix(rows: list, cols: list) -> np.ndarray:
    """JPoSE-style graded relevance between (verb_class, [noun_classes]) keys, float32 (len(rows), len(cols)):
    0.5 * [same verb] + 0.5 * IoU of the noun sets, so 1 only when the verb and all nouns match and 0 when
    nothing matches (EPIC-100 MIR builds its relevancy from verb/noun class overlap in the same spirit)."""
    def multi_hot(keys):
        m = np.zeros((len(keys), len(NOUN_CLASSES)), np.float32)
        for i, (_, nouns) in enumerate(keys):
            m[i, list(nouns)] = 1
        return m

    va, vb = np.array([k[0] for k in rows]), np.array([k[0] for k in cols])
    na, nb = multi_hot(rows), multi_hot(cols)
    inter = na @ nb.T
    union = na.sum(1, keepdims=True) + nb.sum(1)[None, :] - inter
    return (0.5 * (va[:, None] == vb[None, :]) + 0.5 * inter / union).astype(np.float32)


def build_epic(root: Path, cfg: dict, seed: int, S: float, texts: list, jobs: list) -> dict:
    """EPIC-KITCHENS-100 multi-instance retrieval style: action segments in long kitchen videos, a sentence
    list, and graded relevancy matrices (clips x unique sentences)."""
    out = root / "egoclip" / "epic_mir"
    rng = item_rng(seed, "epic", 0)
    lo, hi = cfg["epic_duration"]
    header = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
              "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
              "noun_class", "all_nouns", "all_noun_classes"]
    counts = {}
    pid = 1
    for split, n in (("train", cfg["epic_train_videos"]), ("test", cfg["epic_test_videos"])):
        rows, keys = [], []
        for _ in range(n):
            participant = f"P{pid:02d}"
            pid += 1
            video_id = f"{participant}_01"
            plan = plan_ego_video(rng, float(round(rng.uniform(lo, hi), 1)), S, scene="kitchen")
            jobs.append(("ego", plan, S, str(out / "videos" / f"{video_id}.mp4")))
            for k, a in enumerate(plan["actions"]):
                text, verb, nouns = ego_text(plan, a, rng, EPIC_TEXT)
                noun_names = [NOUN_CLASSES[x] for x in nouns]
                rows.append([f"{video_id}_{k}", participant, video_id, _ts((a["start"] + a["end"]) / 2),
                             _ts(a["start"]), _ts(a["end"]), int(round(a["start"] * EGO_FPS)),
                             int(round(a["end"] * EGO_FPS)), text, EGO_VERBS[verb], verb, noun_names[0], nouns[0],
                             str(noun_names), str(nouns)])
                keys.append((verb, tuple(nouns)))
                texts.append(text)
        _write_csv(out / f"EPIC_100_retrieval_{split}.csv", header, rows)
        # unique sentences, each represented by the first clip that has it (its narration_id)
        sentences, sent_keys = {}, []
        for r, key in zip(rows, keys):
            if r[8] not in sentences:
                sentences[r[8]] = r[0]
                sent_keys.append(key)
        _write_csv(out / f"EPIC_100_retrieval_{split}_sentence.csv", ["narration_id", "narration"],
                   [[nid, s] for s, nid in sentences.items()])
        rel = relevancy_matrix(keys, sent_keys)
        np.save(out / f"caption_relevancy_EPIC_100_retrieval_{split}.npy", rel)
        counts[f"epic_{split}_clips"] = len(rows)
        counts[f"epic_{split}_sentences"] = len(sentences)
    return counts


def build_charades(root: Path, cfg: dict, seed: int, S: float, texts: list, jobs: list) -> dict:
    """Charades-Ego style: short first-person videos with several (verb, noun) action classes, labelled with
    time intervals, for zero-shot (class names as text) and fine-tuned action recognition."""
    out = root / "egoclip" / "charades"
    rng = item_rng(seed, "charades", 0)
    classes = [CHARADES_VERB[v].format(n=f"a {n}") for v in EGO_VERBS for n in EGO_NOUNS]
    _write_lines(out / "Charades_v1_classes.txt", [f"c{i:03d} {c}" for i, c in enumerate(classes)])
    texts += classes
    header = ["id", "subject", "scene", "quality", "relevance", "verified", "script", "objects", "descriptions",
              "actions", "length"]
    counts = {}
    k = 0
    for split, n in (("train", cfg["charades_train"]), ("test", cfg["charades_test"])):
        rows = []
        for _ in range(n):
            vid = f"{''.join(rng.choice(list('ABCDEFGHIJKLMNOPQRSTUVWXYZ'), 1))}{k:04d}EGO"
            k += 1
            plan = plan_ego_video(rng, float(round(rng.uniform(9, 13), 1)), S, min_gap=(0.2, 1.0))
            jobs.append(("ego", plan, S, str(out / "videos" / f"{vid}.mp4")))
            acts = []
            for a in plan["actions"]:
                c = EGO_VERBS.index(a["verb"]) * len(EGO_NOUNS) + EGO_NOUNS.index(plan["objects"][a["obj"]]["noun"])
                acts.append(f"c{c:03d} {a['start']:.2f} {a['end']:.2f}")
            script = ". ".join(ego_text(plan, a, rng)[0].replace("#C C", "The person") for a in plan["actions"])
            objs = ";".join(sorted({o["noun"] for o in plan["objects"]}))
            rows.append([vid, f"S{int(rng.integers(1, 40)):02d}", plan["scene"].title(), 7, 7, "Yes", script, objs,
                         script, ";".join(acts), plan["duration"]])
            texts.append(script)
        _write_csv(out / f"CharadesEgo_v1_{split}_only1st.csv", header, rows)
        counts[f"charades_{split}"] = len(rows)
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Entry points

def generate(root: Path, size: str = "default", seed: int = 0, frame_size: int = 64, workers: int = 2,
             twin_fraction: float = TWIN_FRACTION, verbose: bool = True) -> dict:
    """Write the whole corpus into `root` (which must not exist or be empty). Returns the counts."""
    from common.text import build_vocab

    t0 = time.time()
    cfg = dict(SIZES[size], twin_fraction=twin_fraction)
    S = frame_size / 64
    root.mkdir(parents=True, exist_ok=True)
    texts, jobs = [], []
    counts = {}
    counts.update(build_egoclip(root, cfg, seed, S, texts, jobs))   # long videos first: better load balance
    counts.update(build_epic(root, cfg, seed, S, texts, jobs))
    counts.update(build_charades(root, cfg, seed, S, texts, jobs))
    counts.update(build_webvid(root, cfg, seed, S, texts, jobs))
    counts.update(build_msrvtt(root, cfg, seed, S, texts, jobs))
    build_vocab(texts, root / "vocab.txt")
    t_ann = time.time() - t0
    if workers > 1:
        with mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_job, jobs, chunksize=4):
                pass
    else:
        for job in jobs:
            _job(job)
    counts["videos_written"] = sum(1 + (j[0] == "clip" and j[4] is not None) for j in jobs)
    counts["seconds"] = round(time.time() - t0, 1)
    counts["seconds_annotations"] = round(t_ann, 1)
    info = dict(version=CORPUS_VERSION, size=size, seed=seed, frame_size=frame_size, twin_fraction=twin_fraction,
                counts=counts)
    (root / "DONE").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if verbose:
        print(summary(info))
    return counts


def summary(info: dict) -> str:
    c = info["counts"]
    return "\n".join([
        f"synthetic corpus: size={info['size']} seed={info['seed']} frame_size={info['frame_size']}",
        f"  webvid   train {c['webvid_train']} clips ({c['webvid_train_twins']} reversed twin pairs), "
        f"val {c['webvid_val']}",
        f"  msrvtt   train/val/test {c['msrvtt_train']}/{c['msrvtt_val']}/{c['msrvtt_test']} videos, "
        f"{c['msrvtt_captions']} captions, test duplicate-caption fraction "
        f"{c['msrvtt_test_duplicate_caption_fraction']:.4f}",
        f"  egoclip  {c['egoclip_train_videos']} videos, {c['egoclip_clips']} clips (alpha={c['egoclip_alpha_s']} s); "
        f"egomcq {c['egomcq_videos']} held-out videos, {c['egomcq_inter']} inter / {c['egomcq_intra']} intra",
        f"  epic_mir train {c['epic_train_clips']} clips / {c['epic_train_sentences']} sentences, "
        f"test {c['epic_test_clips']} / {c['epic_test_sentences']}",
        f"  charades train {c['charades_train']} / test {c['charades_test']} videos",
        f"  action   train/val/test {c['action_train']}/{c['action_val']}/{c['action_test']} one-object motion clips",
        f"  {c['videos_written']} videos written in {c['seconds']} s (annotations {c['seconds_annotations']} s)"])


def done_info(root: Path) -> dict | None:
    """root/DONE's record, None while there is no complete corpus; a corpus from before versions were recorded
    reads as version 1."""
    done = Path(root) / "DONE"
    return {"version": 1, **json.loads(done.read_text(encoding="utf-8"))} if done.exists() else None


def ensure_corpus(root="data/synth", size: str = "default", seed: int = 0, frame_size: int = 64,
                  workers: int = 2, twin_fraction: float = TWIN_FRACTION) -> Path:
    """Generate the corpus into `root` unless root/DONE exists and records this CORPUS_VERSION; return root.

    A corpus of an older version is regenerated with the parameters its DONE records: it is derived data, and the
    paper files' numbers are measured on the current version. Generation writes into a temporary sibling directory
    that is renamed into place at the end, so an interrupted run never leaves a half corpus and readers of an
    existing corpus see either the old or the new one. Processes started together (e.g. `common.ablate --jobs 2` on
    a fresh clone) generate it once: the others wait on a lock file beside it, then find it done."""
    root = Path(root)
    if (done_info(root) or {}).get("version") == CORPUS_VERSION:
        return root
    with _generation_lock(root):
        info = done_info(root)  # re-read: the process that held the lock before us may have written it
        if info and info["version"] == CORPUS_VERSION:
            return root
        if info:
            print(f"{root} holds synthetic corpus version {info['version']}; regenerating it as version "
                  f"{CORPUS_VERSION}", flush=True)
            size, seed, frame_size = info["size"], info["seed"], info["frame_size"]
            twin_fraction = info.get("twin_fraction", twin_fraction)
        _generate_and_swap(root, size=size, seed=seed, frame_size=frame_size, workers=workers,
                           twin_fraction=twin_fraction)
    return root


@contextlib.contextmanager
def _generation_lock(root: Path):
    """Hold an exclusive lock on <root's parent>/.<root name>.lock for the block (fcntl.flock: the OS releases it
    when the process dies, so a killed generator never blocks the next). Without fcntl (Windows) there is no lock:
    runs started together then each generate, and _generate_and_swap keeps the first corpus renamed into place.
    A folder this generator did not write is refused first, so nothing (not even the lock file) is written
    beside it."""
    _refuse_foreign_folder(root)
    try:
        import fcntl
    except ImportError:
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is generating {root} ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # (closing the file releases the lock)


def _refuse_foreign_folder(root: Path):
    if root.exists() and not (root / "DONE").exists() and any(root.iterdir()):
        raise SystemExit(f"error: {root} exists without the DONE file that the synthetic corpus generator writes: it "
                         f"is not a corpus this code wrote, so it is left alone. Use it with --data_root=<its path>, "
                         f"or move it away to have the synthetic corpus generated there")


def _generate_and_swap(root: Path, keep_existing: bool = True, **kwargs):
    """Generate into a temporary sibling of `root`, then rename it into place. With keep_existing, a complete
    current corpus that appeared meanwhile (another process won the race) is kept and ours is discarded. Called
    inside _generation_lock, which has refused a folder this generator did not write."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate(tmp, **kwargs)
        if keep_existing and (done_info(root) or {}).get("version") == CORPUS_VERSION:
            return
        if root.exists():       # an old or partial corpus: move it away first, so the swap is two renames
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old)
        else:
            os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@user_errors  # a path it cannot write, a full disk: one `error:` line (common/errors.py)
def main(argv=None):
    p = argparse.ArgumentParser(description="Generate the synthetic video-language corpus (see data/README.md).")
    p.add_argument("--out", default="data/synth", help="output directory (replaced atomically if --force)")
    p.add_argument("--seed", type=int, default=0, help="same seed -> identical annotation files and frames")
    p.add_argument("--size", default="default", choices=list(SIZES), help="tiny (tests) | default | large (~4x)")
    p.add_argument("--frame_size", type=int, default=64, help="frame side in pixels: 64 (default), 112 or 224")
    p.add_argument("--workers", type=int, default=2, help="render processes")
    p.add_argument("--twin_fraction", type=float, default=TWIN_FRACTION,
                   help="share of WebVid training clips that get a time-reversed twin (0 = none)")
    p.add_argument("--force", action="store_true", help="regenerate even if OUT/DONE exists (atomic swap)")
    a = p.parse_args(argv)
    root = Path(a.out)
    with _generation_lock(root):
        if (done_info(root) or {}).get("version") == CORPUS_VERSION and not a.force:
            print(f"{root}/DONE exists; nothing to do (use --force to regenerate)")
            return
        _generate_and_swap(root, keep_existing=False, size=a.size, seed=a.seed, frame_size=a.frame_size,
                           workers=a.workers, twin_fraction=a.twin_fraction)
    print(f"written to {root}")


if __name__ == "__main__":
    main()
