"""The data path at paper size: clips/s per core, raw and after data.prepare, the annotation index at millions of
rows, and the cores one GPU needs. A benchmark, not a test (pytest does not collect it).

    python tests/bench_data.py                       # everything (= python tests/bench.py --data); ~20 min, 2 cores
    python tests/bench_data.py --parts decode        # videos only;  --parts index: annotation indexes only
    /tmp/decord-venv/bin/python -c 'import decord'   # optional: with --decord_python, decord on the same clips
    python tests/bench_data.py --decord_python /tmp/decord-venv/bin/python

Videos: generated H.264 files shaped like each real dataset (resolution, duration, frame rate, keyframe interval,
x264 `veryfast` crf 23 with B-frames, smooth panning texture plus noise), cached in --work. Each clip is what the
`--paper` loaders ask for: T frames sampled one per bin at random (EgoClip: from a 1-4 s window), then
VideoTransform(224, train=True) (random resized crop, scale 0.5-1). Timed on ONE core (the process is pinned with
sched_setaffinity, torch and FFmpeg on one thread): the rate a DataLoader worker reaches. Rows:
  raw       common.video.load_clip on the generated file (the decode planner) + the transform
  raw/256   the same, frames scaled to short side 256 in swscale while converting (load_clip(short_side=256))
  prepared  the file after `python -m data.prepare` (short side 256, 1-s GOP, fastdecode) + the transform
  decord    decord.VideoReader + get_batch of the same frame indices (run in --decord_python), + the same
            transform's time on frames of that size (decord is not installed with this project; never required)
Index: a WebVid-format CSV of 1 M and 10 M rows and an EgoClip-format TSV of 3.8 M rows are generated in --work and
read by the paper loaders (all_in_one.read_webvid, egovlp.read_egoclip): the build (first start), a later start
from the cache, bytes per row held, and the private (USS) and proportional (PSS) memory of 2 DataLoader workers that
read 200,000 random rows each; at 1 M rows the plain CSV reader (read_rows, a list of dicts) is the baseline.
Generated files are deleted at the end unless --keep.
Cores per GPU: training FLOPs per clip at paper size (tests/bench.py's table in the README, bf16 rows) at a stated
MFU of an H100's dense bf16 peak, divided by the measured clips/s per core.
"""

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIDEOS = {  # name -> (width, height, seconds, fps, keyframe interval in frames, frames per clip, window (s) or None)
    "WebVid-like 596x336 15 s, GOP 250": (596, 336, 15, 25, 250, 4, None),
    "WebVid-like 596x336 15 s, GOP 60": (596, 336, 15, 25, 60, 4, None),
    "MSR-VTT-like 320x240 15 s": (320, 240, 15, 30, 250, 3, None),
    "Ego4D-chunk-like 456x256 120 s, 1-4 s windows": (456, 256, 120, 30, 250, 4, (1.0, 4.0)),
}
FILES_PER_KIND = 2
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet, without sparsity)
MFU = 0.45
TRAIN_GFLOP_PER_CLIP = {  # README's `python tests/bench.py` table (2026-12-02): GFLOP/step of the paper rows / clips
    "all_in_one (B, WebVid)": (2046.7 / 2, "WebVid-like 596x336 15 s, GOP 250"),
    "oa_trans (WebVid)": (1397.5 / 2, "WebVid-like 596x336 15 s, GOP 250"),
    "egovlp (EgoClip, with scene negatives)": (2232.2 / 4, "Ego4D-chunk-like 456x256 120 s, 1-4 s windows"),
}


def load():
    return os.getloadavg()[0]


def pin_one_core():
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    import torch
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------- videos

def write_video(path, width, height, seconds, fps, gop, seed):
    """A smooth texture panning across the frame with a little noise: compresses like camera footage."""
    import av
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 2, (width + int(seconds * fps) * 2) // 16 + 2, 3), dtype=np.uint8)
    big = np.asarray(Image.fromarray(small).resize((small.shape[1] * 16, small.shape[0] * 16), Image.BICUBIC))
    tmp = path.with_name(path.stem + ".tmp.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23", "g": str(gop), "bf": "3"}
        for i in range(int(seconds * fps)):
            img = big[:height, 2 * i:2 * i + width].astype(np.int16) + rng.integers(-3, 4, (height, width, 1))
            for p in s.encode(av.VideoFrame.from_ndarray(img.clip(0, 255).astype(np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)


def make_videos(work):
    from data.prepare import transcode
    files = {}
    for k, (name, (w, h, sec, fps, gop, _, _)) in enumerate(VIDEOS.items()):
        files[name] = []
        for j in range(FILES_PER_KIND):
            raw = work / "videos" / f"{k}_{j}.mp4"
            prep = work / "prepared" / f"{k}_{j}.mp4"
            raw.parent.mkdir(parents=True, exist_ok=True)
            prep.parent.mkdir(parents=True, exist_ok=True)
            if not raw.exists():
                print(f"writing {raw} ({name})", file=sys.stderr)
                write_video(raw, w, h, sec, fps, gop, seed=k * 10 + j)
            if not prep.exists():
                error = transcode(str(raw), str(prep), 256, 1.0, 23)
                assert error is None, error
            files[name].append((raw, prep))
    return files


def clip_requests(files, name, n, seed):
    """n clips: (file index, frame indices) as the --paper loaders sample them."""
    from common.video import sample_frame_indices, video_meta, window_to_frames
    rng = random.Random(seed)
    _, _, _, _, _, frames, window = VIDEOS[name]
    metas = [video_meta(raw) for raw, _ in files[name]]
    out = []
    for _ in range(n):
        f = rng.randrange(len(metas))
        m = metas[f]
        start, end = 0, m.num_frames
        if window:
            length = rng.uniform(*window)
            t = rng.uniform(0, m.duration - length)
            start, end = window_to_frames(t, t + length, m.fps, m.num_frames)
        out.append((f, sample_frame_indices(m.num_frames, frames, "rand", start, end, rng)))
    return out


def time_ours(files, name, requests, which, short_side=None):
    """Seconds per clip of read_frames + VideoTransform(224, train=True), one core."""
    from common.video import VideoTransform, read_frames
    transform = VideoTransform(224, train=True, scale=(0.5, 1.0))
    rng = random.Random(0)
    paths = [pair[which] for pair in files[name]]
    for f, idx in requests[:3]:  # warm-up (page cache, first swscale context)
        transform(read_frames(paths[f], idx, short_side), rng=rng)
    t, cpu = time.perf_counter(), time.process_time()
    for f, idx in requests:
        transform(read_frames(paths[f], idx, short_side), rng=rng)
    return (time.process_time() - cpu) / len(requests), (time.perf_counter() - t) / len(requests)


# Run only by the interpreter given as --decord_python (a separate virtual environment): decord is never imported by
# this project's own Python and never a dependency.
DECORD_SCRIPT = r"""
import json, os, sys, time
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
import decord
jobs = json.load(sys.stdin)
out = []
for paths, requests in jobs:
    vr = decord.VideoReader(paths[requests[0][0]], num_threads=1)  # warm-up
    vr.get_batch(requests[0][1]).asnumpy()
    t, cpu = time.perf_counter(), time.process_time()
    for f, idx in requests:  # one reader per clip, as the releases' datasets open it per item
        frames = decord.VideoReader(paths[f], num_threads=1).get_batch(idx).asnumpy()
    out.append([(time.process_time() - cpu) / len(requests), (time.perf_counter() - t) / len(requests),
                list(frames.shape)])
print(json.dumps(out))
"""


def time_decord(python, jobs):
    """[(seconds per clip, frame shape)] of decord on the same clips, or None without a decord interpreter."""
    if not python:
        return None
    r = subprocess.run([python, "-c", DECORD_SCRIPT], input=json.dumps(jobs), capture_output=True, text=True)
    if r.returncode:
        print(f"decord run failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout)


def time_transform(shape, n=30):
    import numpy as np
    from common.video import VideoTransform
    transform = VideoTransform(224, train=True, scale=(0.5, 1.0))
    frames = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    rng = random.Random(0)
    transform(frames, rng=rng)
    cpu = time.process_time()
    for _ in range(n):
        transform(frames, rng=rng)
    return (time.process_time() - cpu) / n


def decode_part(args, work):
    files = make_videos(work)
    pin_one_core()
    rows, rates = [], {}
    for name in VIDEOS:
        req = clip_requests(files, name, args.clips, seed=1)
        repeats = {"raw": [], "raw/256": [], "prepared": []}
        for _ in range(args.repeats):
            repeats["raw"].append(time_ours(files, name, req, 0))
            repeats["raw/256"].append(time_ours(files, name, req, 0, short_side=256))
            repeats["prepared"].append(time_ours(files, name, req, 1))
        dec = {}
        for which, label in ((0, "raw"), (1, "prepared")):
            paths = [str(pair[which]) for pair in files[name]]
            got = [time_decord(args.decord_python, [[paths, req]]) for _ in range(args.repeats)]
            if got[0] is not None:
                extra = time_transform(got[0][0][2])
                dec[label] = (statistics.median(g[0][0] for g in got) + extra,
                              statistics.median(g[0][1] for g in got) + extra)
        med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in repeats.items()}
        rates[name] = {k: 1 / v[0] for k, v in med.items()}
        fmt = lambda s: f"{s[0] * 1000:.1f} ms, {1 / s[0]:.1f}/s ({s[1] * 1000:.0f} ms)"  # noqa: E731
        rows.append(f"| {name} | {VIDEOS[name][5]} | {fmt(med['raw'])} | {fmt(med['raw/256'])} | "
                    f"{fmt(dec['raw']) if 'raw' in dec else '-'} | {fmt(med['prepared'])} | "
                    f"{fmt(dec['prepared']) if 'prepared' in dec else '-'} | {load():.2f} |")
    lines = [f"Decoding + VideoTransform(224, train=True), one core, {args.clips} clips x {args.repeats} repeats "
             "(median): CPU ms per clip, clips/s per core (wall ms per clip, inflated on a shared machine):", "",
             "| video | frames | raw | raw/256 | decord raw | prepared | decord prepared | load (1 min) |",
             "|---|---|---|---|---|---|---|---|"] + rows
    lines += ["", f"Cores one H100 needs at paper size ({MFU:.0%} MFU of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16, "
              "clips/s per core from the CPU times above):", "",
              "| paper | train GFLOP/clip | GPU clips/s | cores, raw | cores, prepared |", "|---|---|---|---|---|"]
    for paper, (gflop, video) in TRAIN_GFLOP_PER_CLIP.items():
        gpu = MFU * H100_BF16_PEAK / (gflop * 1e9)
        lines.append(f"| {paper} | {gflop:.0f} | {gpu:.0f} | {gpu / rates[video]['raw']:.0f} | "
                     f"{gpu / rates[video]['prepared']:.0f} |")
    return lines


# --------------------------------------------------------------------------------------------------- index

WORDS = ("a man woman dog cat car city beach forest walks runs drives sits on the in of with red blue green slow "
         "motion aerial view sunset close up young old people happy smiling water tree sky over near").split()


def write_webvid(path, n):
    rng = random.Random(0)
    with open(f"{path}.tmp", "w") as f:
        f.write("videoid,contentUrl,duration,page_dir,name\n")
        for i in range(n):
            vid = 1_000_000 + i
            page = f"{vid // 50 * 50}_{vid // 50 * 50 + 49}"
            caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
            f.write(f"{vid},https://ak.picdn.net/shutterstock/videos/{vid}/preview/stock-footage.mp4,PT00H00M"
                    f"{rng.randint(5, 30)}S,{page},{caption}\n")
    os.rename(f"{path}.tmp", path)


def write_egoclip(path, n):
    rng = random.Random(0)
    with open(f"{path}.tmp", "w") as f:
        f.write("clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\tclip_start\t"
                "clip_end\tclip_text\ttag_verb\ttag_noun\n")
        uid, t = "", 0.0
        for i in range(n):
            if i % 1000 == 0:
                uid, t = f"{rng.getrandbits(128):032x}"[:8] + "-" + f"{rng.getrandbits(128):032x}"[:27], 0.0
            t += rng.uniform(0.5, 4)
            text = "#C C " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
            f.write(f"{i}\t{uid}\t3600.0\tnarration_pass_1\t{i % 1000}\t{t:.3f}\t{t - 0.5:.3f}\t{t + 0.5:.3f}\t"
                    f"{text}\t[{rng.randrange(118)}]\t[{rng.randrange(582)}, {rng.randrange(582)}]\n")
    os.rename(f"{path}.tmp", path)


def index_child(kind, root, mode):
    """Runs in its own process: read the index (building it, or from the cache, or with read_rows) and report."""
    import all_in_one
    import egovlp
    from common import annotations
    if mode == "rows":  # the reader before the index: a list of dicts
        all_in_one.read_table = lambda p, parse, fmt="csv", columns=(), version="": RowList(
            annotations.read_rows(p, parse, fmt, columns))
        egovlp.read_table = lambda p, parse, fmt="csv", columns=(), version="": annotations.read_rows(p, parse, fmt,
                                                                                                     columns)
    rss0 = current_rss()
    t, cpu = time.perf_counter(), time.process_time()
    if kind == "webvid":
        rows = all_in_one.read_webvid(root, "train")
    else:
        rows = egovlp.read_egoclip(Path(root) / "egoclip" / "egoclip.csv")
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    out = dict(rows=len(rows), seconds=seconds, cpu=cpu, peak_rss=peak, held_rss=current_rss() - rss0)
    if mode == "cache":
        out["nbytes"] = rows.nbytes()
        out.update(worker_memory(rows))
    print(json.dumps(out))


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RowList(list):
    def distinct(self, name):
        return {r[name] for r in self}


def smaps(pid="self"):
    """(private dirty, PSS) in bytes from /proc/<pid>/smaps_rollup. Private dirty is memory this process alone
    holds and wrote: what copy-on-write copies of the parent's objects cost. (USS also counts the index's file pages
    that only this worker happened to read; those are the page cache, shared, not a copy.)"""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    return fields["Private_Dirty"], fields["Pss"]


class RowsDataset:
    """Reads rows of the index (as a paper Dataset's __getitem__ does) and, at the end of each batch, reports its
    worker's memory."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return len(str(self.rows[i]))


def worker_memory(rows, per_worker=200_000, batch=2000):
    import torch
    sampler = random.Random(0).sample(range(len(rows)), min(len(rows), 2 * per_worker))

    def collate(items):
        info = torch.utils.data.get_worker_info()
        return (info.id if info else -1, os.getpid(), smaps(), len(items))
    loader = torch.utils.data.DataLoader(RowsDataset(rows), batch_size=batch, sampler=sampler, num_workers=2,
                                         collate_fn=collate)
    t = time.perf_counter()
    last = {}
    for wid, pid, mem, _ in loader:
        last[wid] = mem
    seconds = time.perf_counter() - t
    return dict(worker_dirty=[m[0] for m in last.values()], worker_pss=[m[1] for m in last.values()],
                iterate_seconds=seconds)


def index_part(args, work):
    lines = ["Annotation index (the paper loaders' own parse functions), one thread. Times: CPU seconds of the "
             "process (wall seconds in brackets: the machine is shared); load average at each row:", "",
             "| file | rows | reader | first start (build) | peak RSS of the build | later start | bytes/row held | "
             "2 workers' private dirty (PSS), 200k random rows each | load (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    sizes = [("webvid", n) for n in args.webvid_rows] + [("egoclip", n) for n in args.egoclip_rows]
    for kind, n in sizes:
        root = work / f"index_{kind}_{n}"
        csv_path = root / ("webvid/results_train.csv" if kind == "webvid" else "egoclip/egoclip.csv")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        if not csv_path.exists():
            print(f"writing {csv_path} ({n} rows)", file=sys.stderr)
            (write_webvid if kind == "webvid" else write_egoclip)(csv_path, n)
        shutil.rmtree(str(csv_path) + ".index", ignore_errors=True)
        modes = (["rows"] if n <= args.baseline_max_rows else []) + ["build", "cache"]
        got = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--index_child", kind, str(root), mode]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode:
                raise SystemExit(f"index child failed: {r.stderr[-2000:]}")
            got[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            got[mode]["load"] = load()
        mib = lambda b: f"{b / 2 ** 20:.0f} MiB"  # noqa: E731
        label = f"{'WebVid' if kind == 'webvid' else 'EgoClip'} ({csv_path.stat().st_size / 2 ** 20:.0f} MiB)"
        if "rows" in got:
            g = got["rows"]
            lines.append(f"| {label} | {g['rows']:,} | read_rows (list of dicts) | {g['cpu']:.1f} s "
                         f"({g['seconds']:.0f}) | {mib(g['peak_rss'])} | {g['cpu']:.1f} s ({g['seconds']:.0f}) every "
                         f"start | "
                         f"{g['held_rss'] / g['rows']:.0f} (RSS) | - | {g['load']:.2f} |")
        b, c = got["build"], got["cache"]
        workers = ", ".join(f"{mib(u)} ({mib(p)})" for u, p in zip(c["worker_dirty"], c["worker_pss"]))
        lines.append(f"| {label} | {b['rows']:,} | read_table (index) | {b['cpu']:.1f} s ({b['seconds']:.0f}) | "
                     f"{mib(b['peak_rss'])} | {c['cpu']:.2f} s ({c['seconds']:.2f}) | {c['nbytes'] / c['rows']:.0f} "
                     f"(index {mib(c['nbytes'])}) | {workers} | "
                     f"{b['load']:.2f} / {c['load']:.2f} |")
        print(lines[-1], file=sys.stderr)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="decode,index", help="decode, index or both")
    p.add_argument("--work", default="/tmp/bench_data", help="generated videos and annotation files")
    p.add_argument("--clips", type=int, default=40, help="timed clips per row and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decord_python", default="", help="a python with decord installed (a separate venv)")
    p.add_argument("--webvid_rows", default="1000000,10000000")
    p.add_argument("--egoclip_rows", default="3800000")
    p.add_argument("--baseline_max_rows", type=int, default=1_000_000, help="read_rows baseline up to this size")
    p.add_argument("--keep", action="store_true", help="keep the generated annotation files")
    p.add_argument("--out", default="runs/bench/bench_data.md")
    p.add_argument("--index_child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.index_child:
        return index_child(*args.index_child)
    args.webvid_rows = [int(x) for x in args.webvid_rows.split(",") if x]
    args.egoclip_rows = [int(x) for x in args.egoclip_rows.split(",") if x]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = [f"# bench_data, {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} x {cpu}, "
             f"load average at start {load():.2f}", ""]
    if "index" in args.parts:  # first: its subprocesses use both cores; the decode part pins itself to one
        lines += index_part(args, work) + [""]
    if "decode" in args.parts:
        lines += decode_part(args, work) + [""]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
