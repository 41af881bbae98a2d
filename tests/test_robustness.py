"""Planted faults, for each paper file: a corpus with broken videos, bad annotation rows and a 0-byte detection file;
a batch of unreadable videos only; bad flags; a batch larger than the dataset; a non-finite loss; SIGKILL and
--resume (losses equal to an uninterrupted run's), a kill inside a checkpoint write; a pickled payload as --init or
as out_dir/ckpt.pt; another paper's checkpoint; out_dir reuse; paths leaving the data root; the corpus generator
next to a folder it did not write; determinism.   Run: python -m pytest -q tests/test_robustness.py"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import all_in_one as aio
import egovlp
import oa_trans as oa
from common.annotations import read_json, set_strict, skipped_rows

ROOT = Path(__file__).resolve().parents[1]
MAIN = {"all_in_one": aio.main, "egovlp": egovlp.main, "oa_trans": oa.main}
# a few seconds per run on one CPU thread: small models, no workers (exact resume needs num_workers=0), fp32
FAST = {
    "all_in_one": ["--tiny", "--img_size=32", "--max_eval_items=8", "--precision=fp32", "--batch_size=5",
                   "--eval_every=100", "--ckpt_every=2", "--log_every=1"],
    "egovlp": ["--img_size=32", "--vit_width=32", "--vit_depth=1", "--vit_heads=2", "--text_width=32",
               "--text_layers=1", "--text_heads=2", "--text_ffn=64", "--embed_dim=16", "--batch_size=4",
               "--num_workers=0", "--log_every=1", "--ckpt_every=2", "--eval_batch_size=16", "--max_eval_items=4",
               "--precision=fp32"],
    "oa_trans": ["--img_size=32", "--patch_size=8", "--vit_width=32", "--vit_depth=1", "--vit_heads=2",
                 "--text_width=32", "--text_layers=1", "--text_heads=2", "--batch_size=5", "--num_frames=2",
                 "--eval_every=2", "--log_every=1", "--num_workers=0", "--precision=fp32", "--eval_batch_size=8",
                 "--curriculum=none"],
}
PAPERS = list(MAIN)


def run(paper, corpus, out, *extra):
    return MAIN[paper](FAST[paper] + [f"--data_root={corpus}", f"--out_dir={out}", *extra])


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "log.jsonl")) if "loss" in r}


@pytest.fixture(autouse=True)
def default_policy():
    set_strict(False)
    yield
    set_strict(False)


# --- a dirty corpus --------------------------------------------------------------------------------------------

WEBVID_BAD_ROWS = 5  # missing cells, empty caption, non-UTF-8 bytes, a path leaving the corpus, a repeated id
EGOCLIP_BAD_ROWS = 5  # malformed tag list, empty narration, window ending before it starts, non-UTF-8, escaping uid


@pytest.fixture(scope="module")
def dirty(tiny_corpus, tmp_path_factory):
    """The tiny corpus with planted faults; returns (root, planted unreadable WebVid paths, broken-detection path,
    unreadable EgoClip path)."""
    root = tmp_path_factory.mktemp("dirty") / "corpus"
    shutil.copytree(tiny_corpus, root)
    (root / "DONE").unlink()  # not the generator's any more
    csv_path = root / "webvid" / "results_train.csv"
    lines = csv_path.read_bytes().decode().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    video = lambda r: root / "webvid" / "videos" / r[3] / f"{r[0]}.mp4"
    broken = [video(r) for r in rows[:5]]
    data = broken[0].read_bytes()
    broken[0].write_bytes(data[:len(data) // 10])                # truncated
    broken[1].write_bytes(b"")                                   # empty
    broken[2].write_bytes(bytes(range(256)) * 16)                # random bytes
    broken[3].write_bytes(b"this is not a video\n")             # not a video
    broken[4].unlink()                                           # missing
    det_row = rows[5]
    det_dir = root / "webvid" / "objects" / det_row[3] / det_row[0]
    for npz in det_dir.glob("*.npz"):
        npz.write_bytes(b"")                                     # 0-byte detections
    extra = [b"2000001,u,PT00H00M02S,x_1",                                  # missing cells
             b"2000002,u,PT00H00M02S,%s,," % rows[0][3].encode(),          # empty caption
             b"2000003,u,PT00H00M02S,%s,a caf\xe9 scene," % rows[0][3].encode(),  # latin-1, not UTF-8
             b"2000004,u,PT00H00M02S,../../../..,an escaping path,",         # leaves the data root
             ",".join(rows[6]).encode()]                                     # repeated id
    csv_path.write_bytes("\n".join(lines).encode() + b"\n" + b"\n".join(extra) + b"\n")

    ego = root / "egoclip" / "egoclip.csv"
    ego_lines = ego.read_text().splitlines()
    cells = ego_lines[1].split("\t")
    ego_bad = video_uid = cells[1]
    (root / "egoclip" / "videos" / f"{video_uid}.mp4").write_bytes(b"")   # one of the 8 EgoClip videos unreadable

    def row(**kw):
        c = dict(zip(ego_lines[0].split("\t"), cells), **kw)
        return "\t".join(c.values()).encode()
    ego_extra = [row(tag_verb="[1, oops"), row(clip_text=""), row(clip_start="9", clip_end="3"),
                 row(clip_text="C cuts the cream").replace(b"cream", b"cr\xe8me"), row(video_uid="../../escape")]
    ego.write_bytes(ego.read_bytes() + b"\n".join(ego_extra) + b"\n")
    return root, sorted(map(str, broken)), str(video(det_row)), str(root / "egoclip" / "videos" / f"{ego_bad}.mp4")


def bad_video_names(out):
    return sorted(r["bad_video"] for r in map(json.loads, open(Path(out) / "log.jsonl")) if "bad_video" in r)


@pytest.mark.parametrize("paper", PAPERS)
def test_dirty_corpus_completes_and_counts(dirty, tmp_path, paper):
    """Every planted fault is skipped and counted; the run completes. All three decode every training video at
    start, and one epoch of batches of 5 over oa_trans's 30 clips reads every detection file: the counts are
    exact."""
    root, broken, det_broken, ego_broken = dirty
    m = run(paper, root, tmp_path, "--max_steps=6", "--max_bad_videos=0.5")
    if paper == "egovlp":
        assert m["train/bad_videos"] == 1 and m["data/bad_rows"] == EGOCLIP_BAD_ROWS
        uid = Path(ego_broken).stem
        assert bad_video_names(tmp_path) == [uid]
    elif paper == "oa_trans":
        assert bad_video_names(tmp_path) == sorted(broken + [det_broken])
        assert m["train/bad_videos"] == 6 and m["data/bad_rows"] == WEBVID_BAD_ROWS
        assert m["train/skipped_clips"] >= 1  # the broken detections' clip, each time it was drawn
    else:
        assert bad_video_names(tmp_path) == sorted(broken)
        assert m["pretrain/bad_videos"] == len(broken) and m["data/bad_rows"] == WEBVID_BAD_ROWS
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["data/bad_rows"] == m["data/bad_rows"]


@pytest.mark.parametrize("paper", PAPERS)
def test_too_many_bad_videos_stop_the_run_naming_them(dirty, tmp_path, paper):
    root, broken, _, ego_broken = dirty
    with pytest.raises(SystemExit, match="max_bad_videos") as e:
        run(paper, root, tmp_path, "--max_steps=6", "--max_bad_videos=0.05")
    assert (Path(ego_broken).stem if paper == "egovlp" else os.path.basename(broken[0])) in str(e.value)


@pytest.mark.parametrize("paper", PAPERS)
def test_strict_makes_a_bad_row_an_error(dirty, tmp_path, paper):
    root = dirty[0]
    csv_name = "egoclip.csv" if paper == "egovlp" else "results_train.csv"
    with pytest.raises(SystemExit, match=rf"{csv_name}, line \d+"):
        run(paper, root, tmp_path, "--max_steps=1", "--strict")


def test_a_batch_of_unreadable_videos_only_is_skipped_in_every_collate():
    aio_batch = aio.Collate(None, aio.Config(), "pretrain")([dict(bad_video="a.mp4", error="empty")] * 2)
    ego_batch = egovlp.collate_pairs([dict(bad_video="u", error="empty")])
    epic_batch = egovlp.collate_epic([dict(bad_video="u", error="empty")])
    oa_batch = oa.collate([dict(bad_video="a.mp4", error="empty")], None, oa.Config())
    for batch in (aio_batch, ego_batch, epic_batch, oa_batch):
        assert "video" not in batch and batch["skipped"] >= 1 and batch["bad_videos"][0][1] == "empty"


def test_every_training_video_unreadable_refuses_instead_of_spinning(tiny_corpus, tmp_path):
    """all_in_one decodes lazily: every batch is empty; with no limit on the share, the loop still gives up."""
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    for mp4 in (root / "webvid" / "videos").rglob("*.mp4"):
        mp4.write_bytes(b"")
    with pytest.raises(SystemExit, match="in a row held no readable video"):
        run("all_in_one", root, tmp_path / "out", "--max_steps=3", "--max_bad_videos=1")
    with pytest.raises(SystemExit, match="max_bad_videos"):  # the default limit names the files sooner
        run("all_in_one", root, tmp_path / "out2", "--max_steps=3")


# --- flags and start-up checks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("paper", PAPERS)
@pytest.mark.parametrize("flag", ["--max_steps=-1", "--max_steps=0", "--batch_size=0", "--lr=-1",
                                  "--precision=fp8", "--max_bad_videos=2"])
def test_bad_flags_are_one_line_errors(tiny_corpus, tmp_path, paper, flag):
    with pytest.raises(SystemExit, match=rf"--{flag[2:].split('=')[0]} must be"):
        run(paper, tiny_corpus, tmp_path, flag)
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize("paper,flag", [("oa_trans", "--objects=maybe"), ("all_in_one", "--temporal=rol"),
                                        ("egovlp", "--positives=verbs"), ("egovlp", "--hflip=yes")])
def test_a_choice_outside_its_values_names_them(tiny_corpus, tmp_path, paper, flag):
    with pytest.raises(SystemExit, match=r"must be one of"):
        run(paper, tiny_corpus, tmp_path, flag)


@pytest.mark.parametrize("paper", PAPERS)
def test_batch_larger_than_the_dataset_says_why(tiny_corpus, tmp_path, paper):
    with pytest.raises(SystemExit, match="batch_size"):
        run(paper, tiny_corpus, tmp_path, "--batch_size=500", "--max_steps=2")


def test_evaluation_files_are_checked_before_the_first_step(tiny_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    (root / "msrvtt" / "annotation" / "MSR_VTT.json").write_text('{"annotations": [\n  {"image_id": "video1",\n')
    with pytest.raises(SystemExit, match=r"MSR_VTT\.json, line 3"):
        run("all_in_one", root, tmp_path / "out", "--max_steps=4")
    assert not (tmp_path / "out" / "log.jsonl").exists()  # not one training step was taken
    (root / "msrvtt" / "annotation" / "MSR_VTT.json").write_text(
        (tiny_corpus / "msrvtt" / "annotation" / "MSR_VTT.json").read_text())
    (root / "msrvtt" / "splits" / "val_list.txt").unlink()
    with pytest.raises(SystemExit, match=r"val_list\.txt: no such file or directory; check the path"):
        run("all_in_one", root, tmp_path / "out2", "--max_steps=4")
    assert not (tmp_path / "out2" / "log.jsonl").exists()


def test_non_utf8_and_empty_captions_name_file_and_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"video_id": "video1", "question": "q", "answer": "a"}\n{"question": "caf\xe9"}\n')
    assert len(aio.read_jsonl(path)) == 1 and f"{path}, line 2: bytes that are not UTF-8" in skipped_rows()[0]
    (tmp_path / "bad.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(SystemExit, match=r"bad\.json, byte \d+: not UTF-8"):
        read_json(tmp_path / "bad.json")


def test_annotation_paths_leaving_the_data_root_are_refused(tmp_path):
    (tmp_path / "webvid").mkdir()
    (tmp_path / "webvid" / "results_train.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n1,u,2,../../..,a ball\n2,u,2,/etc,a box\n3,u,2,p,a cup\n")
    assert [r["id"] for r in aio.read_webvid(tmp_path, "train")] == ["3"]
    assert all("leaves the data root" in m for m in skipped_rows()) and len(skipped_rows()) == 2
    set_strict(True)
    with pytest.raises(SystemExit, match="leaves the data root"):
        aio.read_webvid(tmp_path, "train")


# --- non-finite loss -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("paper", PAPERS)
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_corpus, tmp_path, paper):
    run(paper, tiny_corpus, tmp_path, "--max_steps=2")  # a good checkpoint at step 2
    with pytest.raises(SystemExit, match="non-finite loss at step|not finite") as e:
        run(paper, tiny_corpus, tmp_path, "--max_steps=40", "--resume", "--lr=1e9", "--warmup_steps=0")
    print(e.value)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert ck["step"] >= 2


# --- interruption ----------------------------------------------------------------------------------------------

KILL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import {paper} as paper
import common.train
kill_step, kill_in_save = {kill_step}, {kill_in_save}
lr_at, save, saves = common.train.lr_at, common.train.torch.save, []
def lr_or_kill(step, *a, **k):  # SIGKILL at the start of step kill_step: no handler, no cleanup runs
    if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return lr_at(step, *a, **k)
def save_or_kill(obj, f, *a, **k):  # SIGKILL halfway through the kill_in_save-th checkpoint write (f: an open file)
    saves.append(f)
    if len(saves) == kill_in_save:
        f.write(b"half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *a, **k)
paper.lr_at = common.train.lr_at = lr_or_kill  # the paper file's name and common's
common.train.torch.save = save_or_kill
paper.main(sys.argv[1:])
"""


def run_process(paper, corpus, out, *extra, kill_step=-1, kill_in_save=0):
    """The paper file in a fresh process on one thread (equal losses need equal thread counts)."""
    code = KILL_AT.format(root=str(ROOT), paper=paper, kill_step=kill_step, kill_in_save=kill_in_save)
    args = FAST[paper] + [f"--data_root={corpus}", f"--out_dir={out}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("paper", PAPERS)
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tiny_corpus, tmp_path, paper):
    """Checkpoints every 2 steps, SIGKILL at step 5 (after the step-4 checkpoint), --resume: steps 1-6 have the same
    losses as a run that was never stopped, each logged once. Exact with num_workers=0 (FAST)."""
    full = run_process(paper, tiny_corpus, tmp_path / "full", "--max_steps=6")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run_process(paper, tiny_corpus, tmp_path / "killed", "--max_steps=6", kill_step=5)
    assert killed.returncode == -9
    assert sorted(losses(tmp_path / "killed")) == [1, 2, 3, 4, 5]  # step 5 was logged, then the kill
    resumed = run_process(paper, tiny_corpus, tmp_path / "killed", "--max_steps=6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [r["step"] for r in map(json.loads, open(tmp_path / "killed" / "log.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 5 is not duplicated
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")


def test_a_kill_inside_a_checkpoint_write_keeps_the_last_checkpoint(tiny_corpus, tmp_path):
    killed = run_process("all_in_one", tiny_corpus, tmp_path, "--max_steps=6", kill_in_save=2)  # the step-4 write
    assert killed.returncode == -9
    partial = list(tmp_path.glob(".partial-*.tmp"))
    assert len(partial) == 1
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2  # whole, and the previous one
    resumed = run_process("all_in_one", tiny_corpus, tmp_path, "--max_steps=6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(tmp_path.glob(".partial-*.tmp"))  # the next start removed it
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 6


# --- untrusted files and outputs -------------------------------------------------------------------------------

class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs code
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("paper", PAPERS)
def test_a_pickled_payload_is_never_run(tiny_corpus, tmp_path, paper):
    """The payload's class becomes an inert placeholder (common/weights.py): its code never runs, and the file is
    refused for what it lacks (no model tensors for --init, no optimizer for --resume)."""
    marker = tmp_path / "pwned"
    torch.save({"model": {"x": Payload(str(marker))}, "step": 1}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="cannot load"):  # (one error, no traceback: common/errors.py)
        run(paper, tiny_corpus, tmp_path / "a", f"--init={tmp_path / 'evil.pt'}", "--max_steps=1")
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "evil.pt", tmp_path / "b" / "ckpt.pt")
    with pytest.raises(SystemExit, match="not a checkpoint this code wrote"):
        run(paper, tiny_corpus, tmp_path / "b", "--resume", "--max_steps=2")
    assert not marker.exists()


@pytest.mark.parametrize("paper", PAPERS)
def test_another_papers_checkpoint_is_refused(tiny_corpus, tmp_path, paper):
    other = "egovlp" if paper != "egovlp" else "oa_trans"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "paper": other}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=f"checkpoint of {other}.py, not of {paper}.py"):
        run(paper, tiny_corpus, tmp_path / "out", f"--init={tmp_path / 'other.pt'}", "--max_steps=1")


def test_out_dir_of_another_run_is_kept_unless_resume_or_overwrite(tiny_corpus, tmp_path):
    run("all_in_one", tiny_corpus, tmp_path, "--max_steps=1")
    before = (tmp_path / "metrics.json").read_bytes(), (tmp_path / "log.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="--overwrite"):
        run("all_in_one", tiny_corpus, tmp_path, "--max_steps=1")
    assert ((tmp_path / "metrics.json").read_bytes(), (tmp_path / "log.jsonl").read_bytes()) == before
    run("all_in_one", tiny_corpus, tmp_path, "--max_steps=1", "--overwrite")
    assert sorted(losses(tmp_path)) == [1]  # one run's records, not two runs' mixed
    with pytest.raises(SystemExit, match="does not exist"):
        run("all_in_one", tiny_corpus, tmp_path / "empty", "--max_steps=1", "--resume")


def test_the_corpus_generator_never_replaces_a_folder_it_did_not_write(tmp_path):
    from data.synthetic import ensure_corpus
    mine = tmp_path / "synth"
    mine.mkdir()
    (mine / "my_video.mp4").write_bytes(b"precious")
    with pytest.raises(SystemExit, match="without the DONE file"):
        ensure_corpus(mine, size="tiny")
    assert (mine / "my_video.mp4").read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["synth"]


# --- determinism -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("paper", PAPERS)
def test_the_same_seed_gives_the_same_losses(tiny_corpus, tmp_path, paper):
    run(paper, tiny_corpus, tmp_path / "a", "--max_steps=3")
    run(paper, tiny_corpus, tmp_path / "b", "--max_steps=3")
    run(paper, tiny_corpus, tmp_path / "c", "--max_steps=3", "--seed=1")
    assert len(losses(tmp_path / "a")) == 3 and losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
