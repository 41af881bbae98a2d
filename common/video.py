"""Video decoding with PyAV, frame sampling, and clip-level augmentation.

Three steps turn a file into a model input:

1. `sample_frame_indices` picks n frame indices: the frame range (a whole clip, or a `[start_sec, end_sec]`
   window mapped by `window_to_frames`) is cut into n equal bins, and one frame is taken per bin — a random frame
   in training (`rand`), the bin midpoint in evaluation (`uniform`). This is the sparse sampling of Frozen,
   All-in-one and EgoVLP, made robust where theirs crashes: a bin narrower than one frame still yields a frame
   (indices may repeat), a zero-length window yields n copies of one frame, a window past the end is clamped.
2. `read_frames` decodes only the frames it needs, planned from the file's own structure: one demux pass (no
   decoding) lists every frame's timestamp and the keyframes, and `plan_reads` decides for each wanted frame
   whether to decode on or to seek to the keyframe before it, whichever decodes fewer frames (a long GOP decodes
   on, a short GOP seeks); on the way, frames nothing refers to (most B-frames) are skipped unless wanted. Only the
   wanted frames are converted to RGB, scaled in swscale to `short_side` when they are larger. Frame i is the i-th frame a plain decode from the start outputs, whatever the GOP, B-frames,
   start time or frame rate (tests/test_real_data.py compares the pixels).
3. `VideoTransform` applies one random crop, flip and colour jitter to every frame of a clip (and, with the same
   geometry, to detector boxes), then normalises.

A missing, empty or undecodable file raises `VideoReadError`, whose message names the path. Datasets catch it,
skip the item and count it; nothing here substitutes a black clip.
"""

import math
import os
import random
from dataclasses import dataclass

import av
import av.video.reformatter
import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoReadError(RuntimeError):
    """A video could not be opened or decoded; the message names the path and the reason."""


@dataclass
class VideoMeta:
    num_frames: int
    fps: float
    duration: float  # seconds
    height: int
    width: int


# -----------------------------------------------------------------------------
# frame sampling

def sample_frame_indices(num_frames, n, mode, start=0, end=None, rng=None):
    """n frame indices in [start, end) (end exclusive, default num_frames): one per equal bin.

    mode "rand": a uniformly random frame in each bin (training); "uniform": each bin's midpoint (evaluation).
    Bins are real-valued, so a clip shorter than n frames still gives n valid (repeated) indices.
    """
    assert mode in ("rand", "uniform"), mode
    assert num_frames > 0 and n > 0
    rng = rng or random
    end = num_frames if end is None else end
    start = min(max(int(start), 0), num_frames - 1)
    end = min(max(int(end), start + 1), num_frames)  # at least one frame: a zero-length window is one frame
    edges = np.linspace(start, end, n + 1)
    if mode == "rand":
        points = [edges[k] + rng.random() * (edges[k + 1] - edges[k]) for k in range(n)]
    else:
        points = [(edges[k] + edges[k + 1]) / 2 for k in range(n)]
    return [min(max(int(math.floor(p)), start), end - 1) for p in points]


def window_to_frames(start_sec, end_sec, fps, num_frames):
    """Map a [start_sec, end_sec] window to a frame range [start_idx, end_idx), clamped to the video.

    Negative starts (EgoClip windows near a video's beginning) clamp to 0, windows past the end clamp to the
    last frame, and the range always holds at least one frame.
    """
    start_idx = min(max(int(math.floor(start_sec * fps)), 0), num_frames - 1)
    end_idx = min(max(int(math.ceil(end_sec * fps)), start_idx + 1), num_frames)
    return start_idx, end_idx


# -----------------------------------------------------------------------------
# decoding

def _open(path):
    if not os.path.isfile(path):
        raise VideoReadError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except Exception as e:  # PyAV raises several error types (InvalidDataError, OSError, ...)
        raise VideoReadError(f"cannot open video {path}: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"no video stream in {path}")
    return container, container.streams.video[0]


def _meta(container, stream, path):
    fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    num_frames = stream.frames or int(round(duration * fps))
    if num_frames <= 0:  # some containers (gif, webm) carry no count: count by demuxing, which is cheap
        num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        container.seek(0)
    if num_frames <= 0:
        raise VideoReadError(f"video has no frames: {path}")
    duration = duration or num_frames / fps
    return VideoMeta(num_frames, fps, duration, stream.codec_context.height, stream.codec_context.width)


def video_meta(path):
    """Frame count, fps, duration and size of a video, read from its header (decodes nothing for mp4)."""
    container, stream = _open(path)
    try:
        return _meta(container, stream, path)
    except av.FFmpegError as e:
        raise VideoReadError(f"cannot read metadata of {path}: {e}") from e
    finally:
        container.close()


@dataclass
class FrameIndex:
    """Where each frame sits in the file, read from its packets without decoding: pts[i] is the timestamp of frame i
    (frames counted in presentation order, as a decoder outputs them from the start) and keyframes the frame
    numbers a seek can land on (sorted). With B-frames the packets come in decode order; sorting their timestamps
    gives the presentation order, so the numbering is that of a plain sequential decode, whatever the frame rate."""
    pts: np.ndarray  # int64 (num_frames,)
    keyframes: np.ndarray  # int64 (K,), keyframes[0] == 0

    def number(self, pts):
        """The frame number of a decoded frame's timestamp, or -1 for a timestamp no packet had."""
        i = int(np.searchsorted(self.pts, pts)) if pts is not None else -1
        return i if 0 <= i < len(self.pts) and self.pts[i] == pts else -1


_INDEX_CACHE = {}  # (path, mtime, size) -> FrameIndex, per process: a long video is indexed once for its many clips
INDEX_CACHE_SIZE = 64


def frame_index(container, stream, path):
    """The FrameIndex of a video (one demux pass: reads packets, decodes nothing), or None when the packets carry
    no usable timestamps (some raw or AVI streams): such files are decoded sequentially."""
    st = os.stat(path)
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    pts, key_pts = [], []
    for packet in container.demux(stream):
        if packet.size == 0 or packet.is_discard:  # the flush packet; samples an edit list drops are never shown
            continue
        if packet.pts is None:
            container.seek(0)  # (the caller decodes from the start)
            return None
        pts.append(packet.pts)
        if packet.is_keyframe:
            key_pts.append(packet.pts)
    container.seek(0)
    pts = np.array(pts, dtype=np.int64)
    order = np.sort(pts)
    if len(order) == 0 or len(np.unique(order)) != len(order) or not key_pts or min(key_pts) != order[0]:
        return None  # repeated timestamps, or a first frame that is no keyframe: sequential decoding only
    index = FrameIndex(order, np.searchsorted(order, np.unique(np.array(key_pts, dtype=np.int64))))
    if len(_INDEX_CACHE) >= INDEX_CACHE_SIZE:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))  # oldest first
    _INDEX_CACHE[key] = index
    return index


SEEK_COST_FRAMES = 4  # a seek (demuxer jump, decoder flush) costs about as much as decoding this many frames


def plan_reads(keyframes, wanted):
    """Which frames to reach by seeking: -> list of (keyframe to seek to, or None to go on decoding, [frames]).

    `wanted` sorted, distinct. Decoding goes forward from the current frame; a wanted frame is reached either by
    decoding on (cost: the frames in between) or by seeking to the keyframe at or before it (cost: the frames
    from that keyframe, plus SEEK_COST_FRAMES). A long GOP then decodes on from the start, a short GOP seeks to
    each wanted frame, and a clip whose frames share a GOP is decoded once from its keyframe."""
    plan, pos = [], -1  # pos: the last frame decoded (-1: before the first, at the file's start)
    for f in wanted:
        k = int(keyframes[np.searchsorted(keyframes, f, side="right") - 1])  # the keyframe at or before f
        if k - 1 - pos > SEEK_COST_FRAMES:  # the frames a seek skips are worth more than the seek
            plan.append((k, [f]))
        elif plan:
            plan[-1][1].append(f)
        else:
            plan.append((None, [f]))
        pos = f
    return plan


def _decode_skipping(container, stream, keep):
    """Decoded frames from the demuxer's position on, skipping the frames no other frame refers to (B-frames, mostly)
    unless their timestamp is in `keep`: the decoder knows a frame is such from its packet, before decoding it, and
    the frames that are decoded come out the same (nothing refers to a skipped one)."""
    context = stream.codec_context
    try:
        for packet in container.demux(stream):
            context.skip_frame = "DEFAULT" if packet.size == 0 or packet.pts in keep else "NONREF"
            yield from packet.decode()
    finally:
        context.skip_frame = "DEFAULT"


def _decode(container, stream, meta, indices, path, short_side=None):
    """Frames `indices` as uint8 RGB, read by the plan of `plan_reads` (or sequentially when the file has no
    frame index); only the wanted frames are converted, and scaled in swscale so that their short side is
    `short_side` when they are larger (a resize follows in VideoTransform anyway)."""
    wanted = sorted(set(indices))
    frames = {}
    height, width = stream.codec_context.height, stream.codec_context.width
    if short_side and min(height, width) > short_side:  # scale down in the conversion, never up
        ratio = short_side / min(height, width)
        height, width = max(short_side, round(height * ratio)), max(short_side, round(width * ratio))
    # One reformatter for the whole call: frame.to_ndarray(format="rgb24") builds a new swscale context per frame,
    # which took 27x longer than this (same bytes) on the 64x64 EgoClip videos.
    to_rgb = av.video.reformatter.VideoReformatter()

    def convert(frame):
        size = dict(width=width, height=height) if (frame.height, frame.width) != (height, width) else {}
        return to_rgb.reformat(frame, format="rgb24", interpolation="AREA" if size else None, **size).to_ndarray()
    try:
        index = frame_index(container, stream, path)
        if index is None:  # count frames as they come out of the decoder, from the start
            last, todo = wanted[-1], set(wanted)
            for i, frame in enumerate(container.decode(stream)):
                if i in frames or i < wanted[0]:
                    continue
                if i in todo:
                    frames[i] = convert(frame)
                if i >= last:
                    break
        else:
            wanted = sorted({min(f, len(index.pts) - 1) for f in wanted})  # a header may overstate the count
            keep = {int(index.pts[f]) for f in wanted}
            for seek_to, group in plan_reads(index.keyframes, wanted):
                if seek_to is not None:  # lands on the keyframe at or before this timestamp (the file's own index)
                    container.seek(int(index.pts[seek_to]), stream=stream, backward=True)
                todo = set(group)
                for frame in _decode_skipping(container, stream, keep):
                    i = index.number(frame.pts)
                    if i in todo:
                        frames[i] = convert(frame)
                        todo.discard(i)
                    if not todo or i > group[-1]:
                        break
    except av.FFmpegError as e:
        raise VideoReadError(f"cannot decode {path}: {e}") from e
    if not frames:
        raise VideoReadError(f"decoded no frames from {path} (wanted {min(indices)}..{max(indices)}, header says "
                             f"{meta.num_frames})")
    # Headers can overstate the frame count by a frame or two: a missing index takes the nearest decoded frame.
    have = sorted(frames)
    out = [frames.get(i) if i in frames else frames[min(have, key=lambda h: abs(h - i))] for i in indices]
    return np.stack(out)


def read_frames(path, indices, short_side=None):
    """Decode frames `indices` (any order, repeats allowed) of `path` -> uint8 array (n, H, W, 3), RGB; frames
    whose short side exceeds `short_side` come scaled down to it (aspect kept)."""
    container, stream = _open(path)
    try:
        meta = _meta(container, stream, path)
        return _decode(container, stream, meta, list(indices), path, short_side)
    except av.FFmpegError as e:
        raise VideoReadError(f"cannot decode {path}: {e}") from e
    finally:
        container.close()


def decode_videos(paths, threads):
    """Decode whole videos ahead of training, `threads` at a time (PyAV decodes outside the GIL).
    -> ({path: uint8 (F, H, W, 3)}, {path: error} of the unreadable ones)."""
    from concurrent.futures import ThreadPoolExecutor
    frames, unreadable = {}, {}

    def decode(path):
        try:
            frames[path] = read_frames(path, range(video_meta(path).num_frames))
        except VideoReadError as e:
            unreadable[path] = str(e)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, sorted(set(paths))))
    return frames, unreadable



class ClipCache:
    """Clips kept in RAM after their first read, under a key the caller chooses (a path, (video, view), a window).

    `get(key, read)` calls `read()` the first time and keeps what it returns (frames or a tensor); a VideoReadError
    is kept as None, its message in `unreadable[key]`, so an unreadable file is tried (and named) once. Once the
    kept clips hold `limit_bytes`, later ones are not kept (read again each time): memory stays flat on a
    benchmark of real size. One per process: a DataLoader worker fills its own."""

    def __init__(self, limit_bytes=float("inf")):
        self.clips, self.unreadable, self.nbytes, self.limit_bytes = {}, {}, 0, limit_bytes

    def __len__(self):
        return len(self.clips)

    def __contains__(self, key):
        return key in self.clips

    def get(self, key, read):
        if key in self.clips:
            return self.clips[key]
        try:
            clip = read()
        except VideoReadError as e:
            self.unreadable[key], clip = str(e), None
        self.put(key, clip)
        return clip

    def put(self, key, clip):
        """Keep `clip` (None: unreadable, always kept) unless the limit is reached; -> whether it was kept."""
        size = 0 if clip is None else clip.nbytes
        if self.nbytes + size > self.limit_bytes:
            return False
        self.clips[key], self.nbytes = clip, self.nbytes + size
        return True

def load_clip(path, n, mode, start_sec=None, end_sec=None, rng=None, short_side=None):
    """Sample and decode n frames of a whole video, or of the window [start_sec, end_sec] (short_side: see
    read_frames).

    Returns (frames uint8 (n, H, W, 3), indices list[int]).
    """
    container, stream = _open(path)
    try:
        meta = _meta(container, stream, path)
        start, end = 0, meta.num_frames
        if start_sec is not None:
            start, end = window_to_frames(start_sec, end_sec, meta.fps, meta.num_frames)
        indices = sample_frame_indices(meta.num_frames, n, mode, start, end, rng)
        return _decode(container, stream, meta, indices, path, short_side), indices
    except av.FFmpegError as e:
        raise VideoReadError(f"cannot decode {path}: {e}") from e
    finally:
        container.close()


# -----------------------------------------------------------------------------
# augmentation: one geometry for all frames of a clip (and its boxes)

def random_resized_crop_params(height, width, scale, ratio=(3 / 4, 4 / 3), rng=None):
    """(top, left, h, w) of a crop covering `scale` of the area with aspect ratio in `ratio` (torchvision's rule)."""
    rng = rng or random
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    side = min(height, width)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


def transform_boxes(boxes, crop, size, flip):
    """Map (K, 4) x1,y1,x2,y2 boxes in source pixels through crop (top, left, h, w), resize to size², flip."""
    top, left, h, w = crop
    boxes = np.asarray(boxes, dtype=np.float32).copy()
    boxes[:, [0, 2]] = (boxes[:, [0, 2]] - left) * (size / w)
    boxes[:, [1, 3]] = (boxes[:, [1, 3]] - top) * (size / h)
    boxes = boxes.clip(0, size)
    if flip:
        boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
    return boxes


def resize_crop_params(height, width, size, resize_to, rng=None):
    """(top, left, h, w) in source pixels of the release's Resize(resize_to) -> RandomCrop(size): resizing the short
    side to resize_to and cutting a random size x size square is the same as cutting a random square of side
    min(height, width) * size / resize_to from the source and resizing it to size (up to interpolation)."""
    rng = rng or random
    side = max(1, min(height, width, int(round(min(height, width) * size / resize_to))))
    return rng.randint(0, height - side), rng.randint(0, width - side), side, side


def _gray(x):
    """(n, 3, h, w) RGB in [0, 1] -> (n, 1, h, w) luma, ITU-R 601 weights (torchvision's rgb_to_grayscale)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _shift_hue(x, shift):
    """Rotate the hue of (n, 3, h, w) RGB in [0, 1] by `shift` turns (torchvision's adjust_hue, via HSV)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    h = (h + shift) % 1.0
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype).view(1, 3, 1, 1) + 6 * h.unsqueeze(1)) % 6  # HSV -> RGB
    return maxc.unsqueeze(1) * (1 - s.unsqueeze(1) * (torch.minimum(k, 4 - k).clamp(0, 1)))


def color_jitter(x, brightness, contrast, saturation, hue, order):
    """torchvision's ColorJitter with drawn factors, on (n, 3, h, w) RGB in [0, 1]; the same factors for every
    frame of the clip. `order` is the permutation of the four ops (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    for op in order:
        if op == 0:
            x = (x * brightness).clamp(0, 1)
        elif op == 1:  # blend with the mean luma of each frame
            x = (contrast * x + (1 - contrast) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp(0, 1)
        elif op == 2:  # blend with the frame's own grayscale
            x = (saturation * x + (1 - saturation) * _gray(x)).clamp(0, 1)
        elif hue != 0:
            x = _shift_hue(x, hue)
    return x


class VideoTransform:
    """Clip augmentation, then ImageNet normalisation; one draw per clip, applied to every frame (and the boxes).

    train:
      crop      "random_resized": RandomResizedCrop(scale) (Frozen, EgoVLP, All-in-one)
                "resize_random":  Resize(short side = size * resize_ratio) -> RandomCrop(size) (OA-Trans release:
                                  Resize(242) -> RandomCrop(224), resize_ratio = 242 / 224)
      flip      horizontal flip with probability 0.5 (off wherever captions say "left" / "right")
      jitter    (brightness, contrast, saturation, hue) of torchvision's ColorJitter, applied with probability
                jitter_p, ops in a random order (OA-Trans release: (0.5, 0.5, 0.5, 0.1) at p = 0.8); None = off
      grayscale_p  RandomGrayscale probability (OA-Trans release 0.3)
    eval: short-side resize + centre crop, nothing random.

    Call with frames uint8 (n, H, W, 3) [and boxes (K, 4) in source pixels] -> (video (n, 3, size, size), boxes).
    """

    def __init__(self, size, train, scale=(0.5, 1.0), flip=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 crop="random_resized", resize_ratio=242 / 224, jitter=None, jitter_p=0.8, grayscale_p=0.0):
        assert crop in ("random_resized", "resize_random"), crop
        self.size, self.train, self.scale, self.flip = size, train, scale, flip
        self.crop, self.resize_ratio = crop, resize_ratio
        self.jitter, self.jitter_p, self.grayscale_p = jitter, jitter_p, grayscale_p
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def params(self, height, width, rng=None):
        """The crop (top, left, h, w) and flip used for one clip."""
        rng = rng or random
        if not self.train:
            side = min(height, width)
            return ((height - side) // 2, (width - side) // 2, side, side), False
        if self.crop == "random_resized":
            crop = random_resized_crop_params(height, width, self.scale, rng=rng)
        else:
            crop = resize_crop_params(height, width, self.size, self.size * self.resize_ratio, rng=rng)
        return crop, self.flip and rng.random() < 0.5

    def color_params(self, rng=None):
        """None (no jitter) or the drawn (brightness, contrast, saturation, hue, order); and whether to gray."""
        rng = rng or random
        jitter = None
        if self.train and self.jitter is not None and rng.random() < self.jitter_p:
            b, c, s, h = self.jitter
            order = list(range(4))
            rng.shuffle(order)
            jitter = (rng.uniform(max(0, 1 - b), 1 + b), rng.uniform(max(0, 1 - c), 1 + c),
                      rng.uniform(max(0, 1 - s), 1 + s), rng.uniform(-h, h), order)
        return jitter, self.train and self.grayscale_p > 0 and rng.random() < self.grayscale_p

    def __call__(self, frames, boxes=None, rng=None):
        n, height, width, _ = frames.shape
        crop, flip = self.params(height, width, rng)
        top, left, h, w = crop
        x = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + h, left:left + w])).permute(0, 3, 1, 2)
        if (h, w) != (self.size, self.size):  # resized in uint8 (rounded as PIL does): ~5x faster than in float
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = x.float().div_(255)  # (n, 3, size, size)
        if flip:
            x = x.flip(-1)
        jitter, gray = self.color_params(rng)
        if jitter is not None:
            x = color_jitter(x, *jitter)
        if gray:
            x = _gray(x).expand(-1, 3, -1, -1)
        x = (x - self.mean) / self.std
        if boxes is not None:
            boxes = transform_boxes(boxes, crop, self.size, flip)
        return x, boxes
