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
