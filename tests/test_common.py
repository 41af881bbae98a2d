"""Tests of common/config.py, common/video.py and common/train.py.   Run: python -m pytest -q tests/test_common.py"""

import dataclasses
import os
import random

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import config_to_dict, format_help, parse_config
from common.train import JsonlLogger, load_checkpoint, lr_at, param_groups, save_checkpoint, write_metrics
from common.video import (VideoReadError, VideoTransform, load_clip, read_frames, sample_frame_indices,
                          transform_boxes, video_meta, window_to_frames)


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass
class Cfg:
    lr: float = 1e-4  # learning rate / paper 1e-4
    steps: int = 10  # number of optimizer steps
    name: str = "roll"  # "roll" | "mean"
    resume: bool = False  # continue from out_dir/ckpt.pt
    sizes: tuple[int, ...] = (1, 2)  # a comma list


PRESETS = {"pretrain": {"steps": 100, "name": "mean"}, "big": {"lr": 1e-3}}


def test_config_overrides_and_types():
    cfg = parse_config(Cfg, ["--lr=0.5", "--steps=3", "--name=mean", "--resume", "--sizes=4,5,6"])
    assert (cfg.lr, cfg.steps, cfg.name, cfg.resume, cfg.sizes) == (0.5, 3, "mean", True, (4, 5, 6))
    assert config_to_dict(cfg)["steps"] == 3
    assert parse_config(Cfg, ["--resume=false"]).resume is False


def test_config_presets_apply_first_and_explicit_wins():
    cfg = parse_config(Cfg, ["--steps=7", "--pretrain"], PRESETS)
    assert cfg.steps == 7 and cfg.name == "mean"  # explicit beats preset even when written before it
    assert parse_config(Cfg, ["--pretrain", "--big"], PRESETS).lr == 1e-3


@pytest.mark.parametrize("argv", [["--stpes=3"], ["--steps=three"], ["--lr=x"], ["--resume=maybe"], ["--steps"],
                                  ["steps=3"]])
def test_config_rejects_bad_input(argv):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, argv, PRESETS)
    assert e.value.code != 0


def test_config_unknown_key_suggests_close_match(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--stepz=3"])
    assert "--steps" in str(e.value.code)


def test_config_help_lists_fields_with_comments(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--help"], PRESETS)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "learning rate / paper 1e-4" in out and "--pretrain" in out and '"roll" | "mean"' in out
    assert sum(line.startswith("  --") for line in format_help(Cfg).splitlines()) == len(dataclasses.fields(Cfg))


# ----------------------------------------------------------------------------- frame sampling

def test_uniform_sampling_is_bin_midpoints():
    assert sample_frame_indices(30, 3, "uniform") == [5, 15, 25]
    assert sample_frame_indices(100, 4, "uniform", start=20, end=60) == [25, 35, 45, 55]


def test_rand_sampling_stays_in_its_bin():
    rng = random.Random(0)
    for _ in range(200):
        idx = sample_frame_indices(30, 3, "rand", rng=rng)
        assert 0 <= idx[0] < 10 <= idx[1] < 20 <= idx[2] < 30


@pytest.mark.parametrize("mode", ["rand", "uniform"])
def test_clip_shorter_than_n_frames(mode):
    idx = sample_frame_indices(2, 8, mode, rng=random.Random(0))
    assert len(idx) == 8 and all(0 <= i <= 1 for i in idx) and idx == sorted(idx)


@pytest.mark.parametrize("mode", ["rand", "uniform"])
def test_zero_length_window_gives_copies_of_one_frame(mode):
    assert sample_frame_indices(50, 4, mode, start=10, end=10) == [10] * 4


def test_window_past_the_end_is_clamped():
    start, end = window_to_frames(12.0, 15.0, fps=10, num_frames=100)  # video is 10 s long
    assert (start, end) == (99, 100)
    assert sample_frame_indices(100, 4, "uniform", start, end) == [99] * 4
    assert window_to_frames(-1.0, 0.5, fps=10, num_frames=100) == (0, 5)  # EgoClip windows may start below 0
    assert window_to_frames(3.0, 3.0, fps=10, num_frames=100) == (30, 31)


# ----------------------------------------------------------------------------- decoding

def write_video(path, num_frames, codec, fps=10, size=32):
    """Frame i is a flat grey of value 16 + 3*i (so the decoded frame index is readable from its pixels)."""
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=fps)
    s.width = s.height = size
    s.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
    if codec == "libx264":
        s.options = {"g": "10"}  # a keyframe every second, so seeking lands mid-video
    for i in range(num_frames):
        frame = np.full((size, size, 3), 16 + 3 * i, np.uint8)
        for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


def frame_value(frame):
    return int(round((frame.mean() - 16) / 3))


@pytest.mark.parametrize("ext,codec", [("mp4", "libx264"), ("webm", "libvpx"), ("avi", "mpeg4"), ("gif", "gif")])
def test_read_frames_formats(tmp_path, ext, codec):
    path = tmp_path / f"v.{ext}"
    write_video(path, 40, codec)
    meta = video_meta(path)
    assert meta.num_frames == 40 and abs(meta.fps - 10) < 1e-6 and (meta.height, meta.width) == (32, 32)
    frames = read_frames(path, [3, 0, 39, 3])
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    if codec != "gif":  # gif's 256-colour palette quantises the greys; lossy codecs may be off by one level
        assert np.abs(np.array([frame_value(f) for f in frames]) - [3, 0, 39, 3]).max() <= 1


def test_read_frames_seeks_in_a_long_video(tmp_path):
    path = tmp_path / "long.mp4"
    write_video(path, 60, "libx264", fps=10)  # 6 s; frames past 2 s are reached by seeking
    frames = read_frames(path, [45, 50, 59])
    assert [frame_value(f) for f in frames] == [45, 50, 59]
    frames, idx = load_clip(path, 3, "uniform", start_sec=4.0, end_sec=5.5)
    assert idx == [42, 47, 52] and [frame_value(f) for f in frames] == idx


def test_missing_and_corrupt_files_raise_named_errors(tmp_path):
    with pytest.raises(VideoReadError, match="not found.*nope.mp4"):
        read_frames(tmp_path / "nope.mp4", [0])
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        load_clip(bad, 4, "uniform")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty.mp4"):
        video_meta(empty)


# ----------------------------------------------------------------------------- transforms

def test_transform_same_geometry_for_all_frames_and_boxes():
    rng = random.Random(3)
    frames = np.zeros((3, 40, 60, 3), np.uint8)
    frames[:, 10:20, 30:45] = 255  # a white box, same place in every frame
    box = np.array([[30, 10, 45, 20]], np.float32)
    t = VideoTransform(32, train=True, scale=(0.6, 1.0), mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(20):
        video, boxes = t(frames, box, rng=rng)
        assert video.shape == (3, 3, 32, 32)
        assert torch.equal(video[0], video[1]) and torch.equal(video[1], video[2])
        x1, y1, x2, y2 = boxes[0]
        if x2 - x1 >= 4 and y2 - y1 >= 4:  # inside the transformed box it is white, well outside it is black
            inside = video[0, :, int(np.ceil(y1)) + 1:int(y2) - 1, int(np.ceil(x1)) + 1:int(x2) - 1]
            assert inside.numel() == 0 or inside.min() > 0.9
        mask = torch.ones(32, 32, dtype=torch.bool)
        mask[max(int(y1) - 2, 0):int(np.ceil(y2)) + 2, max(int(x1) - 2, 0):int(np.ceil(x2)) + 2] = False
        assert video[0, :, mask].max() < 0.1


def test_transform_resizes_in_uint8_within_rounding_of_a_float_resize():
    """The crop is resized in uint8 (fast); the result is the float resize rounded to 8 bits, up or down."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    for size in (24, 64):  # down- and up-sampling
        video, _ = VideoTransform(size, train=False, mean=(0, 0, 0), std=(1, 1, 1))(frames)
        x = torch.from_numpy(frames[:, :, 10:50]).permute(0, 3, 1, 2).float()  # the centre 40x40 crop
        ref = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False) / 255
        assert (video - ref).abs().max() <= 1 / 255 + 1e-6


def test_eval_transform_is_centre_crop_and_boxes_follow():
    frames = np.zeros((1, 40, 80, 3), np.uint8)
    video, boxes = VideoTransform(20, train=False)(frames, np.array([[20, 0, 40, 20]], np.float32))
    assert video.shape == (1, 3, 20, 20)
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10]])  # crop starts at x=20, scale 20/40
    np.testing.assert_allclose(transform_boxes([[0, 0, 10, 10]], (0, 0, 20, 20), 20, flip=True), [[10, 0, 20, 10]])


def test_color_jitter_ops_match_naive_references():
    """Each ColorJitter op against a per-pixel restatement (colorsys for the hue, ITU-R 601 luma for gray)."""
    import colorsys
    from common.video import _gray, color_jitter
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    same = color_jitter(x, 1.0, 1.0, 1.0, 0.0, [0, 1, 2, 3])
    assert torch.allclose(same, x)  # factors 1 and hue 0 leave the clip alone
    hue = color_jitter(x, 1.0, 1.0, 1.0, 0.13, [3])
    gray = _gray(x)
    for n, i, j in [(0, 0, 0), (1, 3, 4), (0, 2, 1)]:
        r, g, b = x[n, :, i, j].tolist()
        h, s_, v = colorsys.rgb_to_hsv(r, g, b)
        assert hue[n, :, i, j].tolist() == pytest.approx(list(colorsys.hsv_to_rgb((h + 0.13) % 1, s_, v)), abs=1e-5)
        assert gray[n, 0, i, j].item() == pytest.approx(0.299 * r + 0.587 * g + 0.114 * b, abs=1e-6)
    bright = color_jitter(x, 1.5, 1.0, 1.0, 0.0, [0])
    assert torch.allclose(bright, (1.5 * x).clamp(0, 1))
    desat = color_jitter(x, 1.0, 1.0, 0.0, 0.0, [2])  # saturation 0 = grayscale
    assert torch.allclose(desat, gray.expand(-1, 3, -1, -1), atol=1e-6)
    flat = color_jitter(x, 1.0, 0.0, 1.0, 0.0, [1])  # contrast 0 = each frame's mean luma
    assert torch.allclose(flat, gray.mean(dim=(1, 2, 3), keepdim=True).expand_as(x), atol=1e-6)


def test_release_style_resize_then_random_crop_and_grayscale():
    from common.video import resize_crop_params
    rng = random.Random(0)
    for _ in range(20):  # Resize(short side 242) -> RandomCrop(224) on a 48 x 80 source: a 44 x 44 source square
        top, left, h, w = resize_crop_params(48, 80, 224, 242, rng)
        assert (h, w) == (round(48 * 224 / 242), round(48 * 224 / 242)) == (44, 44)
        assert 0 <= top <= 48 - 44 and 0 <= left <= 80 - 44
    frames = np.random.default_rng(0).integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)
    t = VideoTransform(24, train=True, flip=False, crop="resize_random", grayscale_p=1.0, mean=(0, 0, 0),
                       std=(1, 1, 1))
    video, _ = t(frames, rng=rng)
    assert video.shape == (2, 3, 24, 24)
    assert torch.equal(video[:, 0], video[:, 1]) and torch.equal(video[:, 1], video[:, 2])  # gray: equal channels
    # jitter is drawn once per clip: two frames with the same content stay equal after it
    same = np.repeat(frames[:1], 2, axis=0)
    t = VideoTransform(24, train=True, jitter=(0.5, 0.5, 0.5, 0.1), jitter_p=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    video, _ = t(same, rng=rng)
    assert torch.equal(video[0], video[1])


# ----------------------------------------------------------------------------- training helpers

def test_lr_schedule():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0)
    assert lr_at(55, 100, 1.0, 10, "linear") == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_param_groups_exclude_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and len(no_decay["params"]) == 3
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_checkpoint_roundtrip_and_logs(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 7}
    save_checkpoint(state, tmp_path / "ckpt.pt")
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 7
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    log = JsonlLogger(tmp_path / "log.jsonl")
    log.log({"step": 1}), log.log({"step": 2})
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 2
    write_metrics(tmp_path, {"b/x": 1, "a/y": 2.5})
    assert (tmp_path / "metrics.json").read_text().index("a/y") < (tmp_path / "metrics.json").read_text().index("b/x")


def test_precision_probe_leaves_the_seeded_draws_alone():
    """precision=auto times matmuls on random matrices; a run's seeded draws (model init, data order) must be the
    same whether or not it probed (--precision=fp32 skips the probe)."""
    from common.train import matmul_rates
    torch.manual_seed(1)
    without = torch.rand(4)
    torch.manual_seed(1)
    matmul_rates(torch.device("cpu"), n=32, budget_seconds=0.001, max_rounds=1)
    assert torch.equal(torch.rand(4), without)


def test_clip_cache_reads_once_keeps_unreadable_and_respects_its_limit():
    from common.video import ClipCache, VideoReadError
    calls = []

    def read(value):
        def f():
            calls.append(value)
            if value is None:
                raise VideoReadError("cannot open x.mp4")
            return np.zeros(value, dtype=np.uint8)
        return f
    cache = ClipCache(limit_bytes=10)
    assert cache.get("a", read(6)).shape == (6,) and cache.get("a", read(6)).shape == (6,)
    assert calls == [6]                                         # read once, then from RAM
    assert cache.get("bad", read(None)) is None and cache.get("bad", read(None)) is None
    assert calls == [6, None] and "x.mp4" in cache.unreadable["bad"]
    assert cache.get("b", read(6)).shape == (6,) and "b" not in cache   # over the limit: returned, not kept
    cache.get("b", read(6))
    assert calls == [6, None, 6, 6] and len(cache) == 2


def test_ranked_queries_rank_the_own_video_and_keep_the_top():
    from common.pictures import ranked_queries
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    q = ranked_queries(sim, ["a", "b"], own=[2, 0], clip=lambda j: f"clip{j}", top=2)
    assert q[0]["rank_of_correct"] == 2 and [r[0] for r in q[0]["ranked"]] == ["clip1", "clip2"]
    assert q[0]["ranked"][1][2] and not q[0]["ranked"][0][2]
    assert q[1]["rank_of_correct"] == 1 and q[1]["ranked"][0] == ("clip0", pytest.approx(0.8), True)
