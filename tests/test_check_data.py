"""data/check.py finds every problem planted in a copy of the tiny corpus, and nothing on the clean one.

    python -m pytest -q tests/test_check_data.py
"""
import csv
import shutil

import av
import numpy as np
import pytest

from data.check import check, main


def write_video(path, frames):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for _ in range(frames):
            for packet in s.encode(av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def append_lines(path, lines):
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def n_lines(path):
    return sum(1 for _ in open(path))


@pytest.mark.parametrize("fmt,split", [("webvid", "train"), ("msrvtt", "test"), ("egoclip", "train"),
                                       ("epic_mir", "test"), ("charades", "test")])
def test_clean_corpus_has_no_findings(tiny_corpus, fmt, split):
    problems, findings = check(str(tiny_corpus), fmt, split, all_videos=True, progress=False)
    assert findings.opened == findings.total > 0
    assert not any(problems.values()), problems


def test_webvid_planted_problems_are_all_found(tiny_corpus, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(tiny_corpus / "webvid", root / "webvid")
    csv_path = root / "webvid" / "results_train.csv"
    rows = list(csv.DictReader(open(csv_path)))
    video = lambda r: root / "webvid" / "videos" / r["page_dir"] / f"{r['videoid']}.mp4"
    video(rows[0]).unlink()                                    # missing_file
    video(rows[1]).write_bytes(b"not a video at all")          # undecodable
    write_video(video(rows[2]), frames=2)                      # too_short (2 < 4 frames)
    first = n_lines(csv_path) + 1
    r = rows[3]
    append_lines(csv_path, [f"{r['videoid']},u,PT2S,{r['page_dir']},the same video again,",   # duplicate
                            f"12ab,u,PT2S,{r['page_dir']},a caption,",                      # bad_row: videoid
                            f"1000999,u,PT2S,{r['page_dir']},,"])                           # bad_row: empty name
    problems, _ = check(str(root), "webvid", "train", all_videos=True, progress=False)
    assert [p.split(": ")[0] for p in problems["duplicate"]] == [f"{csv_path}:{first}"]
    assert [p.split(": ")[0] for p in problems["bad_row"]] == [f"{csv_path}:{first + 1}", f"{csv_path}:{first + 2}"]
    assert [p.split(": ")[0] for p in problems["missing_file"]] == [str(video(rows[0]))]
    assert [p.split(": ")[0] for p in problems["undecodable"]] == [str(video(rows[1]))]
    assert [p.split(": ")[0] for p in problems["too_short"]] == [str(video(rows[2]))]
    assert problems["window_outside"] == []
    assert main(["--root", str(root), "--format", "webvid", "--sample", "3"]) == 1


def test_egoclip_planted_problems_are_all_found(tiny_corpus, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(tiny_corpus / "egoclip", root / "egoclip", ignore=shutil.ignore_patterns("epic_mir", "charades"))
    csv_path = root / "egoclip" / "egoclip.csv"
    rows = list(csv.DictReader(open(csv_path), delimiter="\t"))
    r = rows[0]
    first = n_lines(csv_path) + 1
    line = lambda start, end, dur, text, tags="[1]": "\t".join(
        ["9", r["video_uid"], str(dur), "narration_pass_1", "0", "1.0", str(start), str(end), text, tags, "[0]"])
    append_lines(csv_path, [
        "\t".join(r[k] for k in r),                                   # duplicate of row 1
        line(1000.0, 1001.0, r["video_dur"], "#C C waits"),           # window_outside (by the row's video_dur)
        line(2.0, 3.0, r["video_dur"], "#C C waits", tags="[1"),      # bad_row: tag list
        line(5.0, 4.0, r["video_dur"], "#C C waits"),                 # bad_row: end <= start
        line(900.0, 901.0, 1000.0, "#C C waits"),                     # window_outside (by the decoded video)
        line(2.0, 2.2, r["video_dur"], "#C C blinks"),                # too_short: 0.2 s at 8 fps < 4 frames
    ])
    problems, _ = check(str(root), "egoclip", all_videos=True, progress=False)
    where = lambda kind: sorted(p.split(": ")[0] for p in problems[kind])
    assert where("duplicate") == [f"{csv_path}:{first}"]
    assert where("bad_row") == [f"{csv_path}:{first + 2}", f"{csv_path}:{first + 3}"]
    assert where("window_outside") == [f"{csv_path}:{first + 1}", f"{csv_path}:{first + 4}"]
    assert where("too_short") == [f"{csv_path}:{first + 5}"]
    assert problems["missing_file"] == problems["undecodable"] == []
