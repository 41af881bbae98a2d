"""Check a dataset before spending GPU hours on it: annotations parsed row by row, videos opened and decoded.

    python -m data.check --root /data --format webvid --split train          # a sample of 200 videos
    python -m data.check --root /data --format egoclip --all                 # every video
    python -m data.check --root data/synth --format msrvtt --split test

--root is the same directory the paper files take as --data_root (layouts in data/README.md). Formats:
  webvid    webvid/results_<split>.csv -> webvid/videos/<page_dir>/<videoid>.mp4
  msrvtt    msrvtt/annotation/MSR_VTT.json + msrvtt/splits/<split>_list.txt (+ msrvtt_qa / msrvtt_mc .jsonl)
            -> msrvtt/videos/all/<video_id>.mp4
  egoclip   egoclip/egoclip.csv (tab-separated) + egoclip/egomcq.json -> egoclip/videos/<video_uid>.mp4
            (one file per video; the release's 600-s chunk layout is not checked)
  epic_mir  egoclip/epic_mir/EPIC_100_retrieval_<split>.csv (+ _sentence.csv, relevancy .npy)
            -> egoclip/epic_mir/videos/<video_id>.mp4
  charades  egoclip/charades/CharadesEgo_v1_<split>_only1st.csv -> egoclip/charades/videos/<id>.mp4

What it reports, each with the file and line (or entry) it comes from:
  bad_row         a row that does not parse (missing field, number, timestamp, tag list, empty text, end <= start)
  duplicate       a row whose key (video id, clip, narration id) an earlier row already had
  missing_file    a video the annotations name that is not on disk (checked for every video, even without --all)
  undecodable     a video that does not open, or whose first / middle / last frame does not decode
  too_short       a video with fewer than --min_frames frames, or a clip window covering fewer (in the videos
                  opened; the loaders then repeat frames)
  window_outside  a clip window that lies outside its video (by the annotation's own duration column, and by the
                  decoded video's duration for the videos opened)
Videos are opened for a random sample of --sample videos (seeded), or all of them with --all. The exit status is
1 when anything was found, so the check can gate a job script.
"""

import argparse
import ast
import csv
import json
import os
import random
import sys
from collections import defaultdict

from tqdm import tqdm

from common.errors import user_errors

KINDS = ("bad_row", "duplicate", "missing_file", "undecodable", "too_short", "window_outside")


class Findings:
    """Problems by kind, plus the clip windows to check against each video's real duration."""

    def __init__(self):
        self.problems = defaultdict(list)  # kind -> ["where: what"]
        self.videos = {}                   # video path -> where it was first named
        self.windows = defaultdict(list)   # video path -> [(start s, end s, where)]
        self.seen = {}                     # duplicate key -> where
        self.outside = set()               # rows already reported outside by the annotation's own duration

    def add(self, kind, where, what):
        self.problems[kind].append(f"{where}: {what}")

    def video(self, path, where, window=None):
        self.videos.setdefault(path, where)
        if window is not None:
            self.windows[path].append((*window, where))

    def unique(self, key, where):
        """False (and a duplicate reported) when `key` was seen before."""
        if key in self.seen:
            self.add("duplicate", where, f"same as {self.seen[key]} ({key})")
            return False
        self.seen[key] = where
        return True


def read_rows(path, delimiter, findings, required):
    """(line number, row dict) of a CSV with a header; rows missing a required field are reported, not returned."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            findings.add("bad_row", f"{path}:1", f"header lacks column(s) {missing}")
            return
        for row in reader:
            where = f"{path}:{reader.line_num}"
            empty = [c for c in required if not (row.get(c) or "").strip()]
            if empty or None in row:
                findings.add("bad_row", where, f"empty {empty}" if empty else "more fields than the header")
                continue
            yield where, row


def check_window(findings, where, start, end, duration=None):
    """False (reported) for end <= start; a window outside [0, duration] when the duration is known."""
    if end <= start:
        findings.add("bad_row", where, f"window end {end} <= start {start}")
        return False
    if duration is not None and (start >= duration or end <= 0):
        findings.add("window_outside", where, f"[{start:.2f}, {end:.2f}] s outside the video's {duration:.2f} s")
        findings.outside.add(where)
    return True


def hms(text):
    """'HH:MM:SS.mmm' -> seconds."""
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


# ---------------------------------------------------------------------------------------------- the formats

def scan_webvid(root, split, findings):
    base = os.path.join(root, "webvid")
    path = os.path.join(base, f"results_{split}.csv")
    for where, r in read_rows(path, ",", findings, ("videoid", "page_dir", "name")):
        if not r["videoid"].strip().isdigit():
            findings.add("bad_row", where, f"videoid {r['videoid']!r} is not an integer")
        elif findings.unique(("webvid", r["videoid"]), where):
            findings.video(os.path.join(base, "videos", r["page_dir"], f"{r['videoid']}.mp4"), where)


def scan_msrvtt(root, split, findings):
    base = os.path.join(root, "msrvtt")
    ann_path = os.path.join(base, "annotation", "MSR_VTT.json")
    captions = defaultdict(int)
    for i, a in enumerate(json.load(open(ann_path, encoding="utf-8-sig"))["annotations"]):
        where = f"{ann_path}:annotations[{i}]"
        if not isinstance(a, dict) or not a.get("image_id") or not str(a.get("caption") or "").strip():
            findings.add("bad_row", where, f"needs image_id and a caption: {a}")
        elif findings.unique(("caption", a["image_id"], a["caption"]), where):
            captions[a["image_id"]] += 1
    split_path = os.path.join(base, "splits", f"{split}_list.txt")
    for line, vid in enumerate(open(split_path, encoding="utf-8-sig").read().split("\n"), start=1):
        vid, where = vid.strip(), f"{split_path}:{line}"
        if not vid or not findings.unique(("split", vid), where):
            continue
        if not captions[vid]:
            findings.add("bad_row", where, f"{vid} has no caption in MSR_VTT.json")
        findings.video(os.path.join(base, "videos", "all", f"{vid}.mp4"), where)
    for name, keys in ((f"msrvtt_qa_{split}.jsonl", ("video_id", "question", "answer")),
                       (f"msrvtt_mc_{split}.jsonl", ("clip_name", "options", "answer"))):
        path = os.path.join(base, name)
        if not os.path.exists(path):
            continue
        for line, text in enumerate(open(path, encoding="utf-8-sig"), start=1):
            where = f"{path}:{line}"
            if not text.strip():
                continue
            try:
                item = json.loads(text)
                assert all(k in item for k in keys), f"needs {keys}"
                if "options" in item:
                    assert 0 <= int(item["answer"]) < len(item["options"]), "answer is not an option index"
            except (ValueError, AssertionError, TypeError) as e:
                findings.add("bad_row", where, str(e))
                continue
            vid = item[keys[0]]
            findings.video(os.path.join(base, "videos", "all", f"{vid}.mp4"), where)


def scan_egoclip(root, split, findings):
    base = os.path.join(root, "egoclip")
    required = ("video_uid", "video_dur", "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun")
    for where, r in read_rows(os.path.join(base, "egoclip.csv"), "\t", findings, required):
        try:
            start, end, dur = float(r["clip_start"]), float(r["clip_end"]), float(r["video_dur"])
            tags = [ast.literal_eval(r["tag_verb"]), ast.literal_eval(r["tag_noun"])]
            assert all(isinstance(t, list) for t in tags), "tags are not lists"
        except (ValueError, SyntaxError, AssertionError) as e:
            findings.add("bad_row", where, f"{type(e).__name__}: {e}")
            continue
        key = ("egoclip", r["video_uid"], start, end, r["clip_text"])
        if findings.unique(key, where) and check_window(findings, where, start, end, dur):
            findings.video(os.path.join(base, "videos", f"{r['video_uid']}.mp4"), where, (start, end))
    mcq_path = os.path.join(base, "egomcq.json")
    if not os.path.exists(mcq_path):
        return
    for qid, q in json.load(open(mcq_path, encoding="utf-8-sig")).items():
        try:
            clips = [("query", q["query"])] + [(f"choices.{k}", c) for k, c in q["choices"].items()]
            assert str(q["answer"]) in q["choices"], f"answer {q['answer']} is not a choice"
        except (KeyError, TypeError, AttributeError, AssertionError) as e:
            findings.add("bad_row", f"{mcq_path}:{qid}", f"{type(e).__name__}: {e}")
            continue
        for name, c in clips:
            where = f"{mcq_path}:{qid}.{name}"
            try:
                start, end, dur = float(c["clip_start"]), float(c["clip_end"]), float(c["video_dur"])
            except (KeyError, TypeError, ValueError) as e:
                findings.add("bad_row", where, f"{type(e).__name__}: {e}")
                continue
            if check_window(findings, where, start, end, dur):
                findings.video(os.path.join(base, "videos", f"{c['video_uid']}.mp4"), where, (start, end))


def scan_epic_mir(root, split, findings):
    base = os.path.join(root, "egoclip", "epic_mir")
    path = os.path.join(base, f"EPIC_100_retrieval_{split}.csv")
    n_rows = 0
    for where, r in read_rows(path, ",", findings, ("narration_id", "video_id", "start_timestamp",
                                                    "stop_timestamp", "narration")):
        n_rows += 1
        try:
            start, end = hms(r["start_timestamp"]), hms(r["stop_timestamp"])
        except ValueError as e:
            findings.add("bad_row", where, f"timestamp: {e}")
            continue
        if findings.unique(("epic", r["narration_id"]), where) and check_window(findings, where, start, end):
            findings.video(os.path.join(base, "videos", f"{r['video_id']}.mp4"), where, (start, end))
    sentences = os.path.join(base, f"EPIC_100_retrieval_{split}_sentence.csv")
    relevancy = os.path.join(base, f"caption_relevancy_EPIC_100_retrieval_{split}.npy")
    if os.path.exists(sentences) and os.path.exists(relevancy):
        import numpy as np
        n_sent = sum(1 for _ in read_rows(sentences, ",", findings, ("narration_id", "narration")))
        shape = np.load(relevancy, mmap_mode="r").shape
        if shape != (n_rows, n_sent):
            findings.add("bad_row", relevancy, f"shape {shape}, expected (clips {n_rows}, sentences {n_sent})")


def scan_charades(root, split, findings):
    base = os.path.join(root, "egoclip", "charades")
    classes_path = os.path.join(base, "Charades_v1_classes.txt")
    classes = {line.split()[0] for line in open(classes_path, encoding="utf-8-sig") if line.strip()}
    for where, r in read_rows(os.path.join(base, f"CharadesEgo_v1_{split}_only1st.csv"), ",", findings,
                              ("id", "length")):
        if not findings.unique(("charades", r["id"]), where):
            continue
        path = os.path.join(base, "videos", f"{r['id']}.mp4")
        try:
            length = float(r["length"])
            actions = [a.split() for a in (r.get("actions") or "").split(";") if a.strip()]
            actions = [(c, float(s), float(e)) for c, s, e in actions]
        except ValueError as e:
            findings.add("bad_row", where, f"{type(e).__name__}: {e}")
            continue
        for c, s, e in actions:
            if c not in classes:
                findings.add("bad_row", where, f"class {c} is not in Charades_v1_classes.txt")
            elif check_window(findings, where, s, e, length):
                findings.windows[path].append((s, e, where))
        findings.video(path, where)


SCANNERS = {"webvid": scan_webvid, "msrvtt": scan_msrvtt, "egoclip": scan_egoclip, "epic_mir": scan_epic_mir,
            "charades": scan_charades}


# --------------------------------------------------------------------------------------------- the videos

def check_video(path, findings, min_frames):
    from common.video import VideoReadError, read_frames, video_meta
    where = findings.videos[path]
    try:
        meta = video_meta(path)
        if meta.num_frames < min_frames:
            findings.add("too_short", path, f"{meta.num_frames} frames < {min_frames} (named at {where})")
        read_frames(path, sorted({0, meta.num_frames // 2, max(0, meta.num_frames - 1)}))
    except VideoReadError as e:
        findings.add("undecodable", path, f"{e} (named at {where})")
        return
    for start, end, row in findings.windows.get(path, []):
        if row in findings.outside:
            continue
        if start >= meta.duration or end <= 0:
            findings.add("window_outside", row, f"[{start:.2f}, {end:.2f}] s outside {path} ({meta.duration:.2f} s)")
            continue
        frames = (min(end, meta.duration) - max(start, 0.0)) * meta.fps  # frames the window covers
        if frames < min_frames:
            findings.add("too_short", row, f"[{start:.2f}, {end:.2f}] s holds {frames:.1f} frames at {meta.fps:g} "
                                           f"fps < {min_frames}: frames will repeat")


def check(root, fmt, split="train", all_videos=False, sample=200, min_frames=4, seed=0, progress=True):
    """Scan the annotations of `fmt` under `root`, then the videos -> ({kind: ["where: what", ...]}, Findings)."""
    findings = Findings()
    SCANNERS[fmt](root, split, findings)
    present = [p for p in findings.videos if os.path.isfile(p)]
    for p in findings.videos:
        if not os.path.isfile(p):
            findings.add("missing_file", p, f"named at {findings.videos[p]}")
    opened = present if all_videos or len(present) <= sample else random.Random(seed).sample(present, sample)
    for path in tqdm(opened, desc=f"decoding {len(opened)} of {len(present)} videos", disable=not progress):
        check_video(path, findings, min_frames)
    findings.opened, findings.total = len(opened), len(findings.videos)
    return {k: findings.problems[k] for k in KINDS}, findings


@user_errors  # an unreadable path or folder is one `error:` line (common/errors.py)
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="the --data_root of the paper files")
    ap.add_argument("--format", required=True, choices=sorted(SCANNERS))
    ap.add_argument("--split", default="train", help="train | val | test (egoclip has one file: ignored)")
    ap.add_argument("--all", action="store_true", help="open every video (default: a sample)")
    ap.add_argument("--sample", type=int, default=200, help="videos opened without --all")
    ap.add_argument("--min_frames", type=int, default=4, help="a video or window with fewer frames is too short "
                    "(the papers sample 4 per clip at pre-training, 16 at EPIC fine-tuning)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=20, help="problems printed per kind (all are counted)")
    args = ap.parse_args(argv)
    try:
        problems, findings = check(args.root, args.format, args.split, args.all, args.sample, args.min_frames,
                                   args.seed)
    except FileNotFoundError as e:  # an annotation file itself is absent: nothing else can be checked
        print(f"error: {e.filename}: not found; check --root (layouts: data/README.md)", file=sys.stderr)
        return 2
    print(f"{args.format} ({args.split}) under {args.root}: {findings.total} videos named, {findings.opened} opened")
    for kind in KINDS:
        print(f"{kind:15s} {len(problems[kind])}")
        for line in problems[kind][:args.show]:
            print(f"    {line}")
        if len(problems[kind]) > args.show:
            print(f"    ... {len(problems[kind]) - args.show} more")
    return 1 if any(problems.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
