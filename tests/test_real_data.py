"""Real data at its real size (issue 26): the decode planner, the columnar annotation index, data.prepare.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_real_data.py

Videos are generated here with PyAV (a few dozen small frames each), so the whole file runs in seconds.
"""

import fractions

import av
import numpy as np
import pytest

from common.video import frame_index, plan_reads, read_frames, load_clip


def write_video(path, num_frames, gop, bframes=0, start=0, vfr=False, size=(48, 32), container=None):
    """A video whose frames are all different (a moving noise texture), so a frame read at the wrong index differs
    in its pixels. start: the first timestamp (ticks of 1/1000 s); vfr: irregular gaps between frames."""
    rng = np.random.default_rng(num_frames + gop)
    w, h = size
    texture = rng.integers(0, 256, (h, 3 * w, 3), dtype=np.uint8)
    c = av.open(str(path), "w", format=container)
    s = c.add_stream("libx264", rate=25)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.time_base = fractions.Fraction(1, 1000)
    s.codec_context.time_base = fractions.Fraction(1, 1000)
    s.options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": str(bframes), "threads": "1",
                 "preset": "ultrafast" if not bframes else "veryfast"}
    t = start
    for i in range(num_frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(texture[:, 2 * i:2 * i + w]), format="rgb24")
        frame.pts, frame.time_base = t, fractions.Fraction(1, 1000)
        t += int(rng.integers(20, 90)) if vfr else 40
        for p in s.encode(frame):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def sequential(path):
    """Every frame, decoded from the start in one pass: the reference numbering."""
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


CASES = {  # name -> write_video arguments
    "long_gop": dict(num_frames=60, gop=250),
    "short_gop": dict(num_frames=60, gop=6),
    "bframes": dict(num_frames=60, gop=12, bframes=3),
    "start_time": dict(num_frames=50, gop=8, bframes=2, start=1500),
    "vfr": dict(num_frames=50, gop=10, vfr=True),
    "vfr_mkv": dict(num_frames=50, gop=7, bframes=2, vfr=True, start=700, container="matroska"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planned_decode_equals_sequential_decode(tmp_path, case):
    path = tmp_path / f"{case}.{'mkv' if CASES[case].get('container') else 'mp4'}"
    write_video(path, **CASES[case])
    ref = sequential(path)
    n = len(ref)
    assert n == CASES[case]["num_frames"]
    rng = np.random.default_rng(0)
    picks = [[0], [n - 1], [n - 1, 0, n // 2, n // 2], list(range(n)), [3, 4, 5, 40], [1, n - 2]]
    picks += [sorted(rng.choice(n, 4, replace=False).tolist()) for _ in range(6)]
    for idx in picks:
        frames = read_frames(path, idx)
        assert frames.shape == (len(idx),) + ref.shape[1:]
        for k, i in enumerate(idx):
            assert np.array_equal(frames[k], ref[i]), (case, idx, i)


def test_plan_seeks_on_short_gops_and_decodes_on_long_ones():
    long_gop, short_gop = np.array([0, 250]), np.arange(0, 375, 15)
    wanted = [40, 130, 220, 310]
    assert plan_reads(long_gop, wanted) == [(None, [40, 130, 220]), (250, [310])]
    assert plan_reads(short_gop, wanted) == [(30, [40]), (120, [130]), (210, [220]), (300, [310])]
    assert plan_reads(short_gop, [31, 33]) == [(30, [31, 33])]  # one GOP: one seek, then decode on
    assert plan_reads(short_gop, [2, 3]) == [(None, [2, 3])]  # near the start: no seek at all


def test_frame_index_reads_keyframes_without_decoding(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, 30, gop=10)
    with av.open(str(path)) as c:
        index = frame_index(c, c.streams.video[0], path)
    assert len(index.pts) == 30 and index.keyframes.tolist() == [0, 10, 20]


def test_short_side_scales_only_larger_frames(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, 20, gop=5, size=(96, 64))
    assert read_frames(path, [3, 17], short_side=32).shape == (2, 32, 48, 3)
    assert read_frames(path, [3], short_side=100).shape == (1, 64, 96, 3)  # never scaled up
    frames, idx = load_clip(path, 4, "uniform", short_side=32)
    with av.open(str(path)) as c:  # the same scaling, done by hand on the sequential decode
        ref = [f.reformat(width=48, height=32, format="rgb24", interpolation="AREA").to_ndarray()
               for f in c.decode(video=0)]
    assert all(np.array_equal(frames[k], ref[i]) for k, i in enumerate(idx))


# ----------------------------------------------------------------------------- columnar annotation index

import os  # noqa: E402

import common.annotations as A  # noqa: E402

DIRTY_WEBVID = (  # header, then good and bad rows; a quoted caption spans two lines (line numbers must follow)
    b"videoid,contentUrl,duration,page_dir,name\n"
    b"1,u,PT1S,0_49,a red ball\n"
    b'2,u,PT1S,0_49,"a caption, with a comma\nand a second line"\n'
    b"3,u,PT1S,0_49\n"                                 # a missing column
    b"4,u,PT1S,0_49,fine,extra\n"                      # one column too many
    b"5,u,PT1S,0_49,caf\xe9 latin-1\n"                 # not UTF-8
    b"6,u,PT1S,0_49,  \n"                              # empty caption
    b"1,u,PT1S,0_49,a repeated id\n"
    b"7,u,PT1S,../..,leaves the root\n"
    b"8,u,PT1S,50_99,\xc3\xa9t\xc3\xa9 is UTF-8\n"
    b",u,PT1S,50_99,no id\n"
    b"9,u,PT1S,50_99,last\n")


def webvid_parse(root):
    seen = set()

    def parse(r):
        vid = A.text_field(r, "videoid")
        if vid in seen:
            raise A.BadRow(f"duplicate videoid {vid!r}")
        seen.add(vid)
        A.inside(str(root / "videos"), A.text_field(r, "page_dir"), vid + ".mp4")
        return dict(id=vid, page_dir=r["page_dir"], text=A.text_field(r, "name"), n=int(vid), t=float(vid) / 2,
                    tags=[int(vid)] * (int(vid) % 3), even=int(vid) % 2 == 0)
    return parse


def read_both(path, parse_factory, fmt="csv"):
    """(rows, messages) by read_rows, then by read_table (building), then by read_table (from the cache)."""
    out = []
    for reader in ("rows", "build", "cache"):
        A.set_strict(False)
        if reader == "rows":
            rows = A.read_rows(path, parse_factory(), fmt)
        else:
            rows = list(A.read_table(path, parse_factory(), fmt, version="test/1"))
        out.append((rows, A.skipped_rows()))
    return out


def test_index_gives_the_rows_and_bad_row_messages_of_the_csv_reader(tmp_path, capsys):
    path = tmp_path / "results_train.csv"
    path.write_bytes(DIRTY_WEBVID)
    (ref, ref_bad), (built, built_bad), (cached, cached_bad) = read_both(path, lambda: webvid_parse(tmp_path))
    assert [r["id"] for r in ref] == ["1", "2", "8", "9"] and len(ref_bad) == 7
    assert built == ref and cached == ref
    assert built_bad == ref_bad and cached_bad == ref_bad  # named again at every start, from the cache
    assert os.path.isfile(A.index_dir(path) + "/meta.json")
    printed = capsys.readouterr().out
    assert printed.count("line 5: 4 columns, the header has 5") == 3  # line 5: the quoted caption took two lines
    # --strict stops on a bad row stored in the cache too
    A.set_strict(True)
    with pytest.raises(SystemExit, match="line 5"):
        A.read_table(path, webvid_parse(tmp_path), version="test/1")
    A.set_strict(False)


def test_index_is_rebuilt_when_the_file_or_the_reader_changes(tmp_path):
    path = tmp_path / "results_train.csv"
    path.write_bytes(b"videoid,contentUrl,duration,page_dir,name\n1,u,PT1S,0_49,one\n")
    parse = lambda: webvid_parse(tmp_path)  # noqa: E731
    assert [r["text"] for r in A.read_table(path, parse(), version="test/1")] == ["one"]
    with open(path, "ab") as f:
        f.write(b"2,u,PT1S,0_49,two\n")
    assert [r["text"] for r in A.read_table(path, parse(), version="test/1")] == ["one", "two"]
    path.write_bytes(path.read_bytes().replace(b"two", b"TWO"))  # same size, at once (same clock tick, maybe)
    assert [r["text"] for r in A.read_table(path, parse(), version="test/1")] == ["one", "TWO"]
    calls = []
    A.read_table(path, lambda r: calls.append(1) or dict(x=1), version="test/1")
    assert calls == []  # cached: parse is not called
    A.read_table(path, lambda r: calls.append(1) or dict(x=1), version="test/2")
    assert calls == [1, 1]  # another reader version: rebuilt


def test_index_is_columnar(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("uid,text\n" + "".join(f"v{i % 3},caption number {i}\n" for i in range(40)))
    table = A.read_table(path, lambda r: dict(uid=r["uid"], text=r["text"]))
    assert isinstance(table.columns["uid"], A.CodedColumn)  # 3 distinct values: codes
    assert isinstance(table.columns["text"], A.StringColumn)
    assert isinstance(table.columns["text"].buffer, np.memmap)  # later loads map the file, shared by workers
    assert table.distinct("uid") == {"v0", "v1", "v2"} and table[-1] == dict(uid="v0", text="caption number 39")


class ListRows(list):
    """read_rows' list, with the one Table method read_webvid calls."""

    def distinct(self, name):
        return {r[name] for r in self}


def test_paper_loaders_read_the_same_rows_through_the_index(tmp_path, monkeypatch):
    """all_in_one.read_webvid, oa_trans.WebVidObjects and egovlp.read_egoclip: the rows of the index equal those of
    read_rows on the same dirty files."""
    import all_in_one
    import egovlp
    (tmp_path / "webvid").mkdir()
    (tmp_path / "webvid" / "results_train.csv").write_bytes(DIRTY_WEBVID)
    ego = tmp_path / "egoclip.csv"
    ego.write_text("clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\t"
                   "clip_end\tclip_text\ttag_verb\ttag_noun\n"
                   "0\tvid_a\t100\tnarration_pass_1\t0\t5.0\t4.5\t5.5\t#C C takes the cup\t[0]\t[1, 2]\n"
                   "1\tvid_a\t100\tnarration_pass_1\t1\t7.0\t6.5\t6.0\t#C C ends early\t[0]\t[1]\n"
                   "2\tvid_b\t100\tnarration_pass_1\t0\t9.0\t8.5\t9.5\t#C C lifts\t[not a list\t[1]\n"
                   "3\tvid_b\t100\tnarration_pass_1\t1\t12.0\t11.5\t12.5\t#C C puts it down\t[]\t[3]\n")
    got = {}
    for mode in ("table", "rows"):
        if mode == "rows":  # the reference: the plain CSV reader with the loaders' own parse functions
            for mod in (all_in_one, egovlp):
                monkeypatch.setattr(mod, "read_table", lambda p, parse, fmt="csv", columns=(), version="":
                                    ListRows(A.read_rows(p, parse, fmt, columns)))
        A.set_strict(False)
        webvid = all_in_one.read_webvid(tmp_path, "train")
        rows = [webvid[i] for i in range(len(webvid))]
        if mode == "rows":  # what the old loader added itself
            rows = [dict(r, path=os.path.join(tmp_path, "webvid", "videos", r["page_dir"], r["id"] + ".mp4"),
                         twin=-1) for r in rows]
        got[mode] = (rows, list(egovlp.read_egoclip(ego)), A.skipped_rows())
    assert got["table"] == got["rows"]
    assert [r["id"] for r in got["table"][0]] == ["1", "2", "8", "9"]
    assert [r["clip_text"] for r in got["table"][1]] == ["#C C takes the cup", "#C C puts it down"]


# ----------------------------------------------------------------------------- data.prepare

def test_prepared_corpus_loads_through_every_loader_and_a_rerun_skips(tiny_corpus, tmp_path):
    import all_in_one
    import egovlp
    import oa_trans
    from common.config import parse_config
    from common.text import Tokenizer
    from common.video import video_meta
    from data.prepare import prepare
    out = tmp_path / "prep"
    done = {fmt: prepare(str(tiny_corpus), str(out), fmt, short_side=32, workers=2, progress=False)
            for fmt in ("webvid", "msrvtt", "egoclip", "epic_mir", "charades")}
    assert all(r["done"] > 0 and not r["failed"] and r["skipped"] == 0 for r in done.values())
    videos = sorted(p.relative_to(tiny_corpus) for p in tiny_corpus.rglob("*.mp4"))
    assert videos == sorted(p.relative_to(out) for p in out.rglob("*.mp4"))  # every video, same place
    for rel in videos[::7]:  # scaled to short side 32 (from 64), same frames count, a keyframe every second
        a, b = video_meta(tiny_corpus / rel), video_meta(out / rel)
        assert (b.height, b.width, b.num_frames) == (32, 32, a.num_frames) and abs(b.fps - a.fps) < 1e-6
        with av.open(str(out / rel)) as c:
            index = frame_index(c, c.streams.video[0], out / rel)
        assert np.diff(index.keyframes).max() <= round(a.fps)
    # the loaders: the same rows from --root and from --out, and items decode from --out
    A.set_strict(True)  # a row the prepared copy could not parse would stop here
    tok = Tokenizer(str(out / "vocab.txt"))
    for root in (tiny_corpus, out):
        flags = [f"--data_root={root}", "--img_size=32"]
        cfg = parse_config(all_in_one.Config, ["--tiny"] + flags, all_in_one.PRESETS)
        rows = all_in_one.read_webvid(root, "train")
        items = {t: all_in_one.build_task_items(cfg, t, "test") for t in ("retrieval", "qa", "mc")}
        ego = egovlp.read_egoclip(root / "egoclip" / "egoclip.csv")
        if root == tiny_corpus:
            ref = ([r["id"] for r in rows], {t: len(v) for t, v in items.items()}, list(ego))
            continue
        assert ref == ([r["id"] for r in rows], {t: len(v) for t, v in items.items()}, list(ego))
        item = all_in_one.ClipTextDataset(rows, cfg, train=True)[0]
        assert item["video"].shape == (cfg.num_frames, 3, 32, 32)
        for t in items:
            assert "bad_video" not in all_in_one.ClipTextDataset(items[t], cfg, train=False)[0]
        ocfg = parse_config(oa_trans.Config, flags + ["--patch_size=8"], oa_trans.PRESETS)
        assert "bad_video" not in oa_trans.WebVidObjects(str(root), "train", ocfg, tok)[0]
        ecfg = parse_config(egovlp.Config, flags + ["--patch_size=8"], egovlp.PRESETS)
        anchor, negative = egovlp.EgoClipDataset(root / "egoclip", ecfg, ego, ["take"] * 8, 8)[0]
        assert anchor["video"].shape[-1] == 32
        assert "video" in egovlp.EpicMIRTrain(root / "egoclip" / "epic_mir", ecfg)[0]
        assert set(egovlp.build_evaluators(["egomcq", "epic_mir", "charades"], root, ecfg)) == {
            "egomcq", "epic_mir", "charades"}
    A.set_strict(False)
    # a re-run skips every finished video, and redoes one that is gone
    (out / videos[0]).unlink()
    again = prepare(str(tiny_corpus), str(out), "webvid", short_side=32, workers=1, progress=False)
    assert again["done"] == (1 if videos[0].parts[0] == "webvid" else 0)
    assert again["skipped"] == sum(1 for v in videos if v.parts[0] == "webvid") - again["done"]


def test_prepare_names_unreadable_videos_and_retries_them(tmp_path, capsys):
    from data.prepare import main
    src = tmp_path / "raw"
    (src / "webvid" / "videos" / "0_49").mkdir(parents=True)
    write_video(src / "webvid" / "videos" / "0_49" / "1.mp4", 30, gop=250, size=(96, 64))
    (src / "webvid" / "videos" / "0_49" / "2.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (src / "webvid" / "results_train.csv").write_text("videoid,contentUrl,duration,page_dir,name\n"
                                                      "1,u,PT1S,0_49,one\n2,u,PT1S,0_49,two\n")
    argv = ["--root", str(src), "--out", str(tmp_path / "prep"), "--format", "webvid", "--workers", "1"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "1 videos prepared" in printed and "1 unreadable" in printed and "2.mp4" in printed
    assert "2.mp4" in (tmp_path / "prep" / "prepare_failed.txt").read_text()
    assert (tmp_path / "prep" / "webvid" / "results_train.csv").read_text().endswith("2,u,PT1S,0_49,two\n")
    assert main(argv) == 1 and "0 videos prepared, 1 already done (skipped), 1 unreadable" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not found"):
        main(["--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p2"), "--format", "msrvtt"])


# ----------------------------------------------------------------------------- DataLoader settings

def test_loader_settings_clamp_workers_to_the_cores_and_pin_on_cuda(monkeypatch):
    import torch

    from common.train import data_bound, loader_settings
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    said = []
    cpu = loader_settings(16, torch.device("cpu"), said.append)
    assert cpu == dict(num_workers=2, pin_memory=False, persistent_workers=True, prefetch_factor=2)
    assert "num_workers=16" in said[0] and "2 core(s)" in said[0]
    assert loader_settings(1, torch.device("cuda"), said.append) == dict(num_workers=1, pin_memory=True,
                                                                        persistent_workers=True, prefetch_factor=4)
    assert loader_settings(0, torch.device("cpu")) == dict(num_workers=0, pin_memory=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine: one core each
    assert loader_settings(8, torch.device("cpu"), said.append)["num_workers"] == 1
    assert "bottleneck" in data_bound(35.0, 2) and data_bound(4.0, 2) == ""


def test_frames_past_the_end_take_the_last_frame(tmp_path):
    path = tmp_path / "v.mp4"
    write_video(path, 20, gop=5)
    ref = sequential(path)
    frames = read_frames(path, [19, 21, 25])  # a header that overstates the frame count asks for these
    assert all(np.array_equal(f, ref[19]) for f in frames)


def test_unwanted_frames_nothing_refers_to_are_not_decoded(tmp_path, monkeypatch):
    from common import video
    path = tmp_path / "v.mp4"
    write_video(path, 60, gop=250, bframes=3)  # one GOP: frame 59 is reached by decoding on from the start
    ref = sequential(path)
    decoded = []
    original = video._decode_skipping
    monkeypatch.setattr(video, "_decode_skipping", lambda *a: (decoded.append(1) or f for f in original(*a)))
    frames = read_frames(path, [58, 59, 30])
    assert all(np.array_equal(frames[k], ref[i]) for k, i in enumerate([58, 59, 30]))
    assert 30 < len(decoded) < 55  # the B-frames nobody refers to, except the wanted ones, were skipped


def test_prepare_stops_with_one_line_when_the_destination_is_full(tmp_path, monkeypatch):
    import errno

    from data import prepare
    src = tmp_path / "raw"
    (src / "webvid" / "videos" / "0_49").mkdir(parents=True)
    write_video(src / "webvid" / "videos" / "0_49" / "1.mp4", 10, gop=5)

    def full(a, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(prepare.os, "replace", full)
    with pytest.raises(SystemExit, match=r"error: .*1\.mp4: cannot be written \(No space left on device\)"):
        prepare.main(["--root", str(src), "--out", str(tmp_path / "prep"), "--format", "webvid", "--workers", "1"])
    assert not list((tmp_path / "prep").rglob("*.mp4")) and not list((tmp_path / "prep").rglob(".*tmp*"))
