"""Prepare a real dataset for training: videos re-encoded to a training-friendly form, annotations copied as they are.

    python -m data.prepare --root /data/raw --out /data/prep --format webvid            # every core
    python -m data.prepare --root /data/raw --out /data/prep --format egoclip --short_side 256 --workers 8
    python -m data.prepare --root data/synth --out /tmp/prep --format msrvtt --short_side 32

Why: a video downloaded from the web keeps its keyframes far apart (WebVid: every 250 frames) at a resolution the
model never sees, so every clip of 4 frames decodes hundreds of full-size frames (README, "Real data at its real
size"). Each video is decoded once here and written back with
- its short side scaled to --short_side (default 256: the releases' pre-processing for 224-px inputs; never
  scaled up), aspect ratio kept, even width and height (4:2:0);
- a keyframe every --gop_seconds (default 1 s), so a clip seeks to the second before each frame it wants;
- H.264 (libx264 `veryfast`, crf --crf, `tune=fastdecode`: no CABAC, no deblocking, decodes faster for a few
  more bytes), the source's own timestamps (variable frame rates stay variable), no audio;
- the same container and file name, in the same place under --out.
Every other file of the format's folder (CSV / JSON / TXT / NPY / NPZ annotations, detections), and the files at
the top of --root (vocab.txt), is hard-linked (copied across file systems), so the paper files read --out exactly
as they read --root: `--data_root=<out>`.

--root is the paper files' --data_root; --format picks the folder (the same names as `python -m data.check`):
  webvid  webvid/    msrvtt  msrvtt/    egoclip  egoclip/ (without epic_mir/ and charades/)
  epic_mir  egoclip/epic_mir/    charades  egoclip/charades/

Runs over --workers processes (default: every core) with a progress bar. Resumable: a video is written to a hidden
temporary name and renamed when whole, so a re-run (after a kill, or with new files) skips the finished ones.
A video that cannot be read is not written: it is named on the console and in <out>/prepare_failed.txt, and
a re-run tries it again; the loaders then skip it as a missing file and count it (data/README.md). A destination
that cannot be written (a full disk, a permission) stops the run with one error line; a re-run continues.
"""

import argparse
import errno
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from tqdm import tqdm

from common.errors import user_errors

FOLDERS = {"webvid": "webvid", "msrvtt": "msrvtt", "egoclip": "egoclip", "epic_mir": "egoclip/epic_mir",
           "charades": "egoclip/charades"}
EXCLUDE = {"egoclip": ("epic_mir", "charades")}  # sub-folders that are formats of their own
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # stop the run, not skip a file


def output_size(width, height, short_side):
    """(width, height) with the short side scaled down to short_side (never up), both even (4:2:0 needs it)."""
    scale = min(1.0, short_side / min(width, height))
    even = lambda v: max(2, int(round(v * scale / 2)) * 2)  # noqa: E731
    return even(width), even(height)


def transcode(src, dst, short_side, gop_seconds, crf):
    """Re-encode one video (see the module docstring) into dst, through a hidden temporary file renamed at the end.
    Returns None, or the error of a file that could not be read or written."""
    import av
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{os.getpid()}{os.path.splitext(dst)[1]}")
    try:
        with av.open(src) as inp:
            if not inp.streams.video:
                return "no video stream"
            ist = inp.streams.video[0]
            fps = float(ist.average_rate or ist.guessed_rate or 25)
            width, height = output_size(ist.codec_context.width, ist.codec_context.height, short_side)
            with av.open(tmp, "w") as out:  # the container of the file name's extension
                ost = out.add_stream("libvpx-vp9" if src.endswith(".webm") else "libx264", rate=ist.average_rate or 25)
                ost.width, ost.height, ost.pix_fmt = width, height, "yuv420p"
                ost.time_base = ist.time_base  # the source's timestamps, unchanged
                ost.codec_context.time_base = ist.time_base
                gop = max(1, int(round(gop_seconds * fps)))
                ost.options = {"g": str(gop), "threads": "1"} | (
                    {} if src.endswith(".webm") else {"preset": "veryfast", "crf": str(crf), "tune": "fastdecode"})
                last_pts = None
                for frame in inp.decode(ist):
                    if frame.pts is None or (last_pts is not None and frame.pts <= last_pts):
                        continue  # a frame without a (new) timestamp cannot be placed: the decoder's duplicate
                    last_pts = frame.pts
                    scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                    scaled.pts, scaled.time_base = frame.pts, ist.time_base
                    for packet in ost.encode(scaled):
                        out.mux(packet)
                if last_pts is None:
                    raise ValueError("no frames decoded")
                for packet in ost.encode():
                    out.mux(packet)
        os.replace(tmp, dst)
        return None
    except Exception as e:  # PyAV raises many types (InvalidDataError, OSError, ValueError ...): all name the file
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:  # the destination, not the video: stop the run
            raise SystemExit(f"error: {dst}: cannot be written ({os.strerror(e.errno)}); free some space, or "
                             f"choose another --out. A re-run continues where this one stopped") from None
        return f"{type(e).__name__}: {e}"


def _job(args):
    src, dst, short_side, gop_seconds, crf = args
    return src, transcode(src, dst, short_side, gop_seconds, crf)


def plan(root, out, fmt):
    """-> (videos [(src, dst)] still to do, videos already done, other files [(src, dst)] to link)."""
    base = os.path.join(root, FOLDERS[fmt])
    if not os.path.isdir(base):
        raise SystemExit(f"error: {base} not found: --root must be the paper files' --data_root, holding "
                         f"{FOLDERS[fmt]}/ (layouts: data/README.md)")
    todo, done, others = [], 0, []
    for name in sorted(os.listdir(root)):  # vocab.txt and other files the paper files read from --data_root itself
        if os.path.isfile(os.path.join(root, name)) and not name.startswith(".") and name != "DONE":
            others.append((os.path.join(root, name), os.path.join(out, name)))
    for folder, dirs, files in os.walk(base):
        rel = os.path.relpath(folder, base)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.endswith(".index")  # caches, temps
                         and not (rel == "." and d in EXCLUDE.get(fmt, ())))
        for name in sorted(files):
            if name.startswith("."):
                continue
            src = os.path.join(folder, name)
            dst = os.path.join(out, FOLDERS[fmt], rel, name)
            if name.lower().endswith(VIDEO_EXTENSIONS):
                if os.path.exists(dst):
                    done += 1
                else:
                    todo.append((src, dst))
            else:
                others.append((src, dst))
    return todo, done, others


def link_or_copy(src, dst):
    """Hard link (no space), else a copy; an existing destination is replaced only when it differs."""
    if os.path.exists(dst):
        s, d = os.stat(src), os.stat(dst)
        if (s.st_ino, s.st_dev) == (d.st_ino, d.st_dev) or (s.st_size == d.st_size and s.st_mtime_ns == d.st_mtime_ns):
            return
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def prepare(root, out, fmt, short_side=256, gop_seconds=1.0, crf=23, workers=None, progress=True):
    """Prepare one format's folder (see the module docstring) -> dict(done, skipped, failed {src: error})."""
    if os.path.realpath(root) == os.path.realpath(out):
        raise SystemExit("error: --out is --root: the prepared copy goes to another folder")
    todo, skipped, others = plan(root, out, fmt)
    for src, dst in others:  # (an OSError names its path: one error line by @user_errors on main)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        link_or_copy(src, dst)
    for _, dst in todo:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
    workers = workers or os.cpu_count() or 1
    jobs = [(src, dst, short_side, gop_seconds, crf) for src, dst in todo]
    failed = {}
    bar = tqdm(total=len(jobs), desc=f"prepare {fmt}", disable=not progress, dynamic_ncols=True)
    if workers == 1:
        results = map(_job, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        results = pool.map(_job, jobs, chunksize=4)
    for src, error in results:
        if error:
            failed[src] = error
            tqdm.write(f"warning: {src}: cannot be prepared ({error}); not written")
        bar.update()
    bar.close()
    if workers != 1:
        pool.shutdown()
    report = os.path.join(out, "prepare_failed.txt")
    if failed:
        with open(report, "a") as f:
            f.write("".join(f"{src}\t{error}\n" for src, error in sorted(failed.items())))
    return dict(done=len(jobs) - len(failed), skipped=skipped, failed=failed, linked=len(others))


@user_errors  # a path that cannot be read or written, a full disk: one `error:` line (common/errors.py)
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="the raw dataset: the paper files' --data_root")
    ap.add_argument("--out", required=True, help="where the prepared copy goes (then --data_root=<out>)")
    ap.add_argument("--format", required=True, choices=sorted(FOLDERS))
    ap.add_argument("--short_side", type=int, default=256, help="pixels of the short side (never scaled up); "
                    "256 for 224-px inputs")
    ap.add_argument("--gop_seconds", type=float, default=1.0, help="seconds between keyframes")
    ap.add_argument("--crf", type=int, default=23, help="x264 quality (lower = better, larger files; 17-28)")
    ap.add_argument("--workers", type=int, default=0, help="processes (default: every core)")
    args = ap.parse_args(argv)
    if args.short_side < 2 or args.gop_seconds <= 0 or not 0 <= args.crf <= 51 or args.workers < 0:
        raise SystemExit("error: --short_side >= 2, --gop_seconds > 0, --crf in 0..51, --workers >= 0")
    t = time.time()
    r = prepare(args.root, args.out, args.format, args.short_side, args.gop_seconds, args.crf,
                args.workers or None)
    print(f"{args.format}: {r['done']} videos prepared, {r['skipped']} already done (skipped), {len(r['failed'])} "
          f"unreadable, {r['linked']} other files linked, in {time.time() - t:.0f} s -> "
          f"{os.path.join(args.out, FOLDERS[args.format])}")
    if r["failed"]:
        print(f"unreadable videos (listed in {os.path.join(args.out, 'prepare_failed.txt')}; a re-run tries them "
              f"again):")
        for src, error in sorted(r["failed"].items())[:20]:
            print(f"    {src}: {error}")
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
