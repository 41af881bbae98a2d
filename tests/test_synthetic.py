"""Tests of the synthetic corpus (data/synthetic.py) on its tiny size.

Run: cd /work/main && python -m pytest -q tests/test_synthetic.py
The `tiny_corpus` fixture (tests/conftest.py) generates the corpus once per session; one test generates it a
second time (single process) to check determinism.
"""
import ast
import csv
import hashlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from data import synthetic
from data.synthetic import CORPUS_VERSION, EGO_FPS, SIZES, build_egoclip, build_msrvtt, done_info, ensure_corpus

ANNOTATION_SUFFIXES = {".csv", ".json", ".jsonl", ".txt", ".list", ".npy", ".npz"}


def read_all_frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def read_csv(path, delimiter=","):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def file_hashes(root):
    """sha256 of every file under root except DONE (which records the generation time) and the annotation indexes
    that the loaders cache beside the files they read (`<file>.index/`, common/annotations.py)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "DONE" and not p.parent.name.endswith(".index")}


# ---------------------------------------------------------------------------------------------------------------
# Determinism

def test_same_seed_gives_identical_files_and_frames(tiny_corpus, tmp_path):
    # second generation with a single process: the output must not depend on the worker count or job order
    again = ensure_corpus(tmp_path / "again", size="tiny", seed=0, workers=1)
    h1, h2 = file_hashes(tiny_corpus), file_hashes(again)
    annotations = [k for k in h1 if Path(k).suffix in ANNOTATION_SUFFIXES]
    videos = [k for k in h1 if k.endswith(".mp4")]
    assert len(annotations) > 100 and len(videos) > 100
    assert h1 == h2                                    # annotations and encoded videos, byte for byte
    for rel in ["msrvtt/videos/all/video0.mp4", "msrvtt/videos/all/video3.mp4"]:
        assert np.array_equal(read_all_frames(tiny_corpus / rel), read_all_frames(again / rel))


def test_other_seed_differs(tmp_path):
    # annotations only (the video jobs are collected, not rendered): cheap
    def msrvtt_json(seed):
        build_msrvtt(tmp_path / str(seed), dict(SIZES["tiny"]), seed, 1.0, texts=[], jobs=[])
        return (tmp_path / str(seed) / "msrvtt/annotation/MSR_VTT.json").read_bytes()

    assert msrvtt_json(1) != msrvtt_json(2)
    assert msrvtt_json(1) == msrvtt_json(1)


def test_ensure_corpus_is_idempotent(tiny_corpus):
    done = (tiny_corpus / "DONE").read_text()
    assert ensure_corpus(tiny_corpus, size="tiny", seed=0) == tiny_corpus
    assert (tiny_corpus / "DONE").read_text() == done
    assert not list(tiny_corpus.parent.glob(".*tmp*"))      # no temporary directory left behind


def test_runs_started_together_generate_the_corpus_once(tmp_path, monkeypatch, capsys):
    # Two callers at once on a missing corpus (`common.ablate --jobs 2` on a fresh clone): one generates, the other
    # waits on the lock and then finds it done. The generator is replaced by a slow stand-in that counts its calls.
    calls = []

    def slow_generate(root, **kwargs):
        calls.append(root)
        root.mkdir(parents=True)
        (root / "DONE").write_text(json.dumps({"version": CORPUS_VERSION, "size": "tiny", "seed": 0}))
        time.sleep(1.0)

    monkeypatch.setattr(synthetic, "generate", slow_generate)
    root = tmp_path / "synth"
    threads = [threading.Thread(target=ensure_corpus, args=(root,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and done_info(root)["version"] == CORPUS_VERSION
    assert "waiting for another process" in capsys.readouterr().out


def test_outdated_corpus_is_regenerated_with_its_recorded_parameters(tiny_corpus, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(tiny_corpus, root)
    info = json.loads((root / "DONE").read_text())
    del info["version"]                                      # as written before versions were recorded
    (root / "DONE").write_text(json.dumps(info))
    (root / "egoclip" / "egomcq.json").write_text("{}")      # an older version's file
    assert done_info(root)["version"] == 1
    ensure_corpus(root, size="default", workers=1)           # DONE's size (tiny) wins over the argument
    assert done_info(root)["version"] == CORPUS_VERSION and done_info(root)["size"] == "tiny"
    assert file_hashes(root) == file_hashes(tiny_corpus)


def test_egomcq_videos_do_not_depend_on_the_number_of_training_videos(tmp_path):
    def egomcq(n_train):    # annotations only (the video jobs are collected, not rendered)
        build_egoclip(tmp_path / str(n_train), dict(SIZES["tiny"], ego_train_videos=n_train), 0, 1.0, [], [])
        mcq = json.loads((tmp_path / str(n_train) / "egoclip/egomcq.json").read_text())
        return [(q["query"]["video_uid"], q["query"]["clip_text"], q["types"], q["answer"]) for q in mcq.values()]

    assert len(egomcq(3)) > 10
    assert egomcq(3) == egomcq(6)
    rows = lambda n: (tmp_path / str(n) / "egoclip/egoclip.csv").read_text().splitlines()
    assert len(rows(6)) > len(rows(3))


# ---------------------------------------------------------------------------------------------------------------
# WebVid

def test_webvid_csv_videos_and_detections(tiny_corpus):
    root = tiny_corpus / "webvid"
    vocab = (root / "objects_vocab.txt").read_text().splitlines()
    ids = {}
    for split in ("train", "val"):
        rows = read_csv(root / f"results_{split}.csv")
        assert rows and list(rows[0]) == ["videoid", "contentUrl", "duration", "page_dir", "name", "reverse_of"]
        ids[split] = {r["videoid"] for r in rows}
        for r in rows:
            assert r["name"].strip()
            video = root / "videos" / r["page_dir"] / f"{r['videoid']}.mp4"
            assert len(read_all_frames(video)) == 24
            for k in range(8):
                d = np.load(root / "objects" / r["page_dir"] / r["videoid"] / f"{k}.npz", allow_pickle=False)
                K = int(d["num_bbox"])
                assert K >= 10
                assert d["bbox"].shape == (K, 4) and d["bbox"].dtype == np.float32
                assert d["objects_id"].shape == (K,) and d["objects_conf"].shape == (K,)
                assert int(d["image_h"]) == 64 and int(d["image_w"]) == 64
                assert d["objects_id"].min() >= 0 and d["objects_id"].max() < len(vocab)
                b = d["bbox"]
                assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
                assert b.min() >= 0 and b[:, [0, 2]].max() <= 64 and b[:, [1, 3]].max() <= 64
                assert (np.diff(d["objects_conf"]) <= 0).all()   # sorted by confidence, like BUTD
    assert not ids["train"] & ids["val"]


def test_detections_follow_the_rendered_objects(tiny_corpus):
    # degraded, but still a detector of this world: most frames have a confident shape box, clutter and
    # background stuff are detected too, and low-confidence fillers exist (BUTD's minimum of 10 boxes)
    root = tiny_corpus / "webvid"
    vocab = (root / "objects_vocab.txt").read_text().splitlines()
    shapes = {"square", "circle", "triangle", "diamond", "cross"}
    confident_shape, clutter, stuff, low = [], [], [], []
    for r in read_csv(root / "results_train.csv"):
        for k in range(8):
            d = np.load(root / "objects" / r["page_dir"] / r["videoid"] / f"{k}.npz")
            names = [vocab[i] for i in d["objects_id"]]
            conf = d["objects_conf"]
            confident_shape.append(any(n in shapes and c >= 0.5 for n, c in zip(names, conf)))
            clutter.append(any(n in ("pebble", "stick", "leaf") for n in names))
            stuff.append(any(n in ("sky", "water", "sand", "tree", "building", "floor", "snow") for n in names))
            low.append(conf.min() < 0.3)
    assert np.mean(confident_shape) > 0.7
    assert np.mean(clutter) > 0.3 and np.mean(stuff) > 0.3 and np.mean(low) > 0.9


def test_reversed_twins_are_time_reversed(tiny_corpus):
    rows = read_csv(tiny_corpus / "webvid/results_train.csv")
    by_id = {r["videoid"]: r for r in rows}
    twins = [(r, by_id[r["reverse_of"]]) for r in rows if r["reverse_of"]]
    assert twins, "tiny corpus should contain reversed twins"
    for a, b in twins:
        assert b["reverse_of"] == a["videoid"]            # linked both ways
        assert a["name"] != b["name"]                      # caption motions are reversed
        fa = read_all_frames(tiny_corpus / "webvid/videos" / a["page_dir"] / f"{a['videoid']}.mp4").astype(float)
        fb = read_all_frames(tiny_corpus / "webvid/videos" / b["page_dir"] / f"{b['videoid']}.mp4").astype(float)
        reversed_err = np.abs(fa - fb[::-1]).mean()
        forward_err = np.abs(fa - fb).mean()
        assert reversed_err < 6.0                          # lossy codec only (it smooths the pixel noise)
        assert forward_err > reversed_err


def test_clips_show_motion_between_first_and_last_third(tiny_corpus):
    # a clip whose main object moves must change visibly between the first and last third of the clip
    rows = read_jsonl(tiny_corpus / "msrvtt/msrvtt_qa_train.jsonl")
    moving = [r["video_id"] for r in rows if r["type"] == "motion" and r["answer"] in ("left", "right", "up", "down")
              and r["question"].startswith("what does")]
    assert moving
    for vid in moving[:5]:
        f = read_all_frames(tiny_corpus / f"msrvtt/videos/all/{vid}.mp4").astype(float)
        assert np.abs(f[:8].mean(0) - f[-8:].mean(0)).max() > 60


# ---------------------------------------------------------------------------------------------------------------
# MSR-VTT, QA, MC, action lists

def test_msrvtt_annotations_splits_and_captions(tiny_corpus):
    root = tiny_corpus / "msrvtt"
    ann = json.loads((root / "annotation/MSR_VTT.json").read_text())
    assert set(ann) >= {"annotations", "videos"}
    splits = {s: (root / f"splits/{s}_list.txt").read_text().split() for s in ("train", "val", "test")}
    all_ids = [v for ids in splits.values() for v in ids]
    assert len(all_ids) == len(set(all_ids))                 # disjoint by video
    assert {v["video_id"] for v in ann["videos"]} == set(all_ids)
    caps = {}
    for a in ann["annotations"]:
        assert set(a) >= {"image_id", "caption", "id", "small_object"}
        assert isinstance(a["small_object"], bool)
        caps.setdefault(a["image_id"], []).append(a["caption"])
    assert set(caps) == set(all_ids)
    assert all(len(c) >= 2 and len(set(c)) == len(c) for c in caps.values())   # distinct paraphrases
    test_caps = [c for v in splits["test"] for c in caps[v]]
    assert len(set(test_caps)) >= 0.95 * len(test_caps)
    small = [a for a in ann["annotations"] if a["small_object"]]
    assert 0 < len(small) < len(ann["annotations"])
    for v in all_ids:
        assert len(read_all_frames(root / f"videos/all/{v}.mp4")) == 24


def test_msrvtt_qa_and_mc(tiny_corpus):
    root = tiny_corpus / "msrvtt"
    splits = {s: set((root / f"splits/{s}_list.txt").read_text().split()) for s in ("train", "val", "test")}
    answers = set()
    for s in ("train", "val", "test"):
        qa = read_jsonl(root / f"msrvtt_qa_{s}.jsonl")
        assert qa and all(set(r) >= {"video_id", "question", "answer", "id"} for r in qa)
        assert {r["video_id"] for r in qa} <= splits[s]
        answers |= {r["answer"] for r in qa}
        mc = read_jsonl(root / f"msrvtt_mc_{s}.jsonl")
        assert len(mc) == len(splits[s])
        for r in mc:
            assert r["clip_name"] in splits[s]
            assert len(r["options"]) == 5 and len(set(r["options"])) == 5
            assert 0 <= r["answer"] < 5
            ro = r["reversed_option"]
            assert ro is None or (0 <= ro < 5 and ro != r["answer"])
    assert len(answers) < 40                                  # a small answer vocabulary
    assert any(r["reversed_option"] is not None for r in read_jsonl(root / "msrvtt_mc_test.jsonl"))
    classes = (root / "action/classes.txt").read_text().splitlines()
    for s in ("train", "val", "test"):
        for line in (root / f"action/{s}.list").read_text().splitlines():
            path, label = line.split("\t")
            assert (root / path).exists() and 0 <= int(label) < len(classes)


def test_every_motion_clip_holds_one_object_whose_rendered_motion_is_its_label(tmp_path):
    # issue 24: the motion classes' label is what the pixels show -- one object, and its drawn boxes move (or grow,
    # or appear) the way the label says
    jobs = []
    counts = synthetic.build_motion_classes(tmp_path, SIZES["tiny"], 0, 1.0, jobs)
    lines = [l for s in ("train", "val", "test") for l in (tmp_path / f"action/{s}.list").read_text().splitlines()]
    assert len(lines) == len(jobs) == sum(counts.values()) and counts["action_train"] == SIZES["tiny"]["action_train"]
    shapes = set(synthetic.SHAPES)
    seen = set()
    for line, job in zip(lines, jobs):
        rel, label = line.split("\t")
        spec = job[1]
        assert job[3] == str(tmp_path / rel) and len(spec["objects"]) == 1
        frames, truth, _ = synthetic.render_clip(spec, 1.0)
        boxes = [[b for b in frame if b[0] in shapes] for frame in truth]   # the object's box, when visible
        first, last = boxes[0], boxes[-1]
        if not first or not last:
            shown = "appear" if not first else "disappear"
        else:
            (_, _, ax1, ay1, ax2, ay2), (_, _, bx1, by1, bx2, by2) = first[0], last[0]
            dx, dy, grow = (bx1 + bx2 - ax1 - ax2) / 2, (by1 + by2 - ay1 - ay2) / 2, (bx2 - bx1) - (ax2 - ax1)
            if abs(dx) > 10:
                shown = "left" if dx < 0 else "right"
            elif abs(dy) > 10:
                shown = "up" if dy < 0 else "down"
            elif abs(grow) > 4:
                shown = "grow" if grow > 0 else "shrink"
            else:
                shown = "still"
        assert synthetic.MOTIONS[int(label)] == shown, (line, spec["objects"][0])
        seen.add(shown)
    assert len(seen) >= 7       # the 9 classes are drawn uniformly


def test_reversed_mc_option_differs_only_by_motion_words(tiny_corpus):
    mc = read_jsonl(tiny_corpus / "msrvtt/msrvtt_mc_test.jsonl")
    rows = [r for r in mc if r["reversed_option"] is not None]
    assert rows
    for r in rows:
        truth, rev = r["options"][r["answer"]].split(), r["options"][r["reversed_option"]].split()
        # the reversed option keeps the objects' attributes and the scene: most words are shared
        common = len(set(truth) & set(rev))
        assert common >= len(set(truth)) - 4


# ---------------------------------------------------------------------------------------------------------------
# EgoClip / EgoMCQ

EGOCLIP_COLUMNS = ["clip_idx", "video_uid", "video_dur", "narration_source", "narration_ind", "narration_time",
                   "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun"]


def test_egoclip_csv_windows_and_tags(tiny_corpus):
    root = tiny_corpus / "egoclip"
    rows = read_csv(root / "egoclip.csv", "\t")
    assert rows and list(rows[0]) == EGOCLIP_COLUMNS
    verbs = (root / "verb_classes.txt").read_text().splitlines()
    nouns = (root / "noun_classes.txt").read_text().splitlines()
    by_video = {}
    for r in rows:
        assert r["clip_text"].startswith("#C C ")
        tv, tn = ast.literal_eval(r["tag_verb"]), ast.literal_eval(r["tag_noun"])
        assert tv and all(0 <= v < len(verbs) for v in tv)
        assert tn and all(0 <= n < len(nouns) for n in tn)
        assert r["narration_source"] in ("narration_pass_1", "narration_pass_2")
        by_video.setdefault(r["video_uid"], []).append(r)
    half_widths = []
    betas = []
    for uid, rs in by_video.items():
        t = sorted(float(r["narration_time"]) for r in rs if r["narration_source"] == "narration_pass_1")
        betas.append(np.mean(np.diff(t)))
        widths = {round(float(r["clip_end"]) - float(r["clip_start"]), 2) for r in rs}
        assert len(widths) <= 2                                # one window width per video (rounding aside)
        half_widths.append((float(rs[0]["clip_end"]) - float(rs[0]["clip_start"])) / 2)
        for r in rs:
            mid = (float(r["clip_end"]) + float(r["clip_start"])) / 2
            assert abs(mid - float(r["narration_time"])) < 0.01
        frames = read_all_frames(root / f"videos/{uid}.mp4")
        assert len(frames) == round(float(rs[0]["video_dur"]) * EGO_FPS)
    # Eq. 1: half-width = beta_i / (2 alpha), alpha = mean beta over videos
    alpha = np.mean(betas)
    for hw, b in zip(half_widths, betas):
        assert abs(hw - b / (2 * alpha)) < 0.01
    # action-aware positives: some (verb, noun) pairs recur in different videos
    pairs = {}
    for r in rows:
        pairs.setdefault((r["tag_verb"], r["tag_noun"]), set()).add(r["video_uid"])
    assert any(len(v) > 1 for v in pairs.values())
    # scene-aware negatives: consecutive narrations of one annotator differ in action
    for rs in by_video.values():
        p1 = [r for r in rs if r["narration_source"] == "narration_pass_1"]
        for a, b in zip(p1, p1[1:]):
            assert a["clip_text"] != b["clip_text"]


def test_egomcq(tiny_corpus):
    root = tiny_corpus / "egoclip"
    mcq = json.loads((root / "egomcq.json").read_text())
    train_videos = {r["video_uid"] for r in read_csv(root / "egoclip.csv", "\t")}
    keys = {"video_uid", "clip_start", "clip_end", "clip_text", "tag_verb", "tag_noun"}
    types = {1: 0, 2: 0}
    assert sorted(mcq, key=int) == [str(i) for i in range(len(mcq))]
    for q in mcq.values():
        assert set(q["query"]) >= keys
        choices = [q["choices"][str(k)] for k in range(5)]
        assert all(set(c) >= keys for c in choices)
        assert choices[q["answer"]] == q["query"]
        assert len({c["clip_text"] for c in choices}) == 5      # deduplicated options
        uids = [c["video_uid"] for c in choices]
        assert not set(uids) & train_videos                      # held-out videos
        types[q["types"]] += 1
        if q["types"] == 1:
            assert len(set(uids)) == 5
        else:
            assert len(set(uids)) == 1
            starts = sorted(c["clip_start"] for c in choices)
            assert starts[-1] - starts[0] < 60                   # contiguous clips of one video
    assert types[1] > 0 and types[2] > 0
    durations = {c["video_uid"]: c["video_dur"] for q in mcq.values() for c in q["choices"].values()}
    for uid, dur in durations.items():
        assert len(read_all_frames(root / f"videos/{uid}.mp4")) == round(dur * EGO_FPS)


# ---------------------------------------------------------------------------------------------------------------
# EPIC-MIR and Charades-Ego

EPIC_COLUMNS = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
                "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
                "noun_class", "all_nouns", "all_noun_classes"]


def test_epic_mir(tiny_corpus):
    root = tiny_corpus / "egoclip/epic_mir"
    videos = {}
    for split in ("train", "test"):
        rows = read_csv(root / f"EPIC_100_retrieval_{split}.csv")
        assert rows and list(rows[0]) == EPIC_COLUMNS
        sents = read_csv(root / f"EPIC_100_retrieval_{split}_sentence.csv")
        assert list(sents[0]) == ["narration_id", "narration"]
        rel = np.load(root / f"caption_relevancy_EPIC_100_retrieval_{split}.npy")
        assert rel.shape == (len(rows), len(sents))
        assert rel.min() >= 0 and rel.max() <= 1
        by_nid = {r["narration_id"]: r for r in rows}
        for i, r in enumerate(rows):
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d\d\d", r["start_timestamp"])
            assert int(r["stop_frame"]) > int(r["start_frame"])
            for j, s in enumerate(sents):
                o = by_nid[s["narration_id"]]
                same_verb = r["verb_class"] == o["verb_class"]
                na, nb = set(ast.literal_eval(r["all_noun_classes"])), set(ast.literal_eval(o["all_noun_classes"]))
                if same_verb and na == nb:
                    assert rel[i, j] == 1
                elif not same_verb and not na & nb:
                    assert rel[i, j] == 0
                else:
                    assert 0 < rel[i, j] < 1
        videos[split] = {r["video_id"] for r in rows}
        for v in videos[split]:
            n = len(read_all_frames(root / f"videos/{v}.mp4"))
            assert n >= max(int(r["stop_frame"]) for r in rows if r["video_id"] == v)
    assert not videos["train"] & videos["test"]


def test_charades(tiny_corpus):
    root = tiny_corpus / "egoclip/charades"
    classes = (root / "Charades_v1_classes.txt").read_text().splitlines()
    assert all(re.fullmatch(r"c\d{3} \S.*", c) for c in classes)
    ids = {}
    for split in ("train", "test"):
        rows = read_csv(root / f"CharadesEgo_v1_{split}_only1st.csv")
        assert rows and {"id", "actions", "length", "script"} <= set(rows[0])
        for r in rows:
            acts = [a.split() for a in r["actions"].split(";")]
            assert acts
            for c, s, e in acts:
                assert 0 <= int(c[1:]) < len(classes)
                assert 0 <= float(s) < float(e) <= float(r["length"]) + 1e-6
            assert len(read_all_frames(root / f"videos/{r['id']}.mp4")) == round(float(r["length"]) * EGO_FPS)
        ids[split] = {r["id"] for r in rows}
    assert not ids["train"] & ids["test"]


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary

def test_vocab_covers_every_corpus_text(tiny_corpus):
    from common.text import Tokenizer

    tok = Tokenizer(str(tiny_corpus / "vocab.txt"))
    texts = [a["caption"] for a in json.loads((tiny_corpus / "msrvtt/annotation/MSR_VTT.json").read_text())
             ["annotations"]]
    texts += [r["name"] for r in read_csv(tiny_corpus / "webvid/results_train.csv")]
    texts += [r["clip_text"] for r in read_csv(tiny_corpus / "egoclip/egoclip.csv", "\t")]
    texts += [r["question"] for r in read_jsonl(tiny_corpus / "msrvtt/msrvtt_qa_test.jsonl")]
    texts += [r["narration"] for r in read_csv(tiny_corpus / "egoclip/epic_mir/EPIC_100_retrieval_test.csv")]
    for t in texts:
        ids = tok.encode(t, max_len=64)
        assert tok.unk_id not in ids, t
        assert all(not p.startswith("##") for p in tok.tokenize(t)), t   # every corpus word is one token
