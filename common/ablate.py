"""A paper's central ablation over a few seeds, as one markdown table of mean ± std.

    python -m common.ablate all_in_one                          # every variant x seeds 0,1,2 (bash run.sh ablate ...)
    python -m common.ablate egovlp --seeds 0,1 --variants self+none,verb_and_noun+scene
    python -m common.ablate oa_trans --dry_run                  # print the command lines, run nothing
    python -m common.ablate all_in_one -- --max_steps=500       # flags after `--` go to every run
    python -m common.ablate egovlp --jobs 2                     # two runs at a time, one thread each (2 cores)

The variants live in the paper file itself, next to its presets: `ABLATION = dict(reference=..., variants={name:
[flags]}, metrics=[...])`. Each run is `python <paper>.py --pretrain <variant flags> <extra flags> --seed=S
--out_dir=<out>/<paper>/<variant>/s<S>`, one after another (a run already uses the machine's cores), or `--jobs N` at
a time with cpu_count / N threads each (faster for these small models: see `run_all`). A run whose
metrics.json exists is reused, so an interrupted sweep continues where it stopped; its command line is kept in
cmd.txt beside it, and a run made with other flags is refused rather than mixed into the table.

The table (<out>/<paper>.md, also printed): for every metric, mean ± sample std over the seeds; then each variant's
difference to the reference variant (the paper's method) with two standard errors of that difference,
2·sqrt(s_a²/n_a + s_b²/n_b), in bold where the difference is larger. With 3 seeds this is a rough screen (a t-test
would ask for ~2.8 SE at 95%), not a significance test: it says which differences are worth a second look.
"""

import argparse
import datetime
import importlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.train import cpu_name

ROOT = Path(__file__).resolve().parent.parent  # the repository: where the paper files are
PAPERS = ("all_in_one", "egovlp", "oa_trans")


def load_ablation(paper):
    """The paper file's ABLATION dict: reference (variant name), variants {name: [flags]}, metrics [keys]."""
    if paper not in PAPERS:
        raise SystemExit(f"error: unknown paper {paper!r}; choose one of {', '.join(PAPERS)}")
    ablation = importlib.import_module(paper).ABLATION
    assert ablation["reference"] in ablation["variants"], ablation
    return ablation


def run_dir(out, paper, variant, seed):
    return Path(out) / paper / variant / f"s{seed}"


def command(paper, flags, seed, out_dir, extra=()):
    """The command line of one run (a list for subprocess)."""
    return [sys.executable, f"{paper}.py", "--pretrain", *flags, *extra, f"--seed={seed}", f"--out_dir={out_dir}"]


# --- the table maths ---------------------------------------------------------------------------------------------

def mean_std(values):
    """-> (mean, sample std with n - 1, n); std is nan for a single value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def two_se(a, b):
    """Two standard errors of the difference of the means of two (mean, std, n) summaries."""
    (_, sa, na), (_, sb, nb) = a, b
    return 2 * math.sqrt(sa ** 2 / na + sb ** 2 / nb)


def beyond_two_se(a, b):
    """True when |mean_a - mean_b| > 2 SE of the difference (False when an SE is undefined: fewer than 2 seeds)."""
    se2 = two_se(a, b)
    return not math.isnan(se2) and abs(a[0] - b[0]) > se2


def read_runs(out, paper, variants, seeds):
    """{variant: {seed: metrics dict}} for the runs that have a metrics.json."""
    runs = {}
    for v in variants:
        for s in seeds:
            path = run_dir(out, paper, v, s) / "metrics.json"
            if path.exists():
                runs.setdefault(v, {})[s] = json.loads(path.read_text())
    return runs


def summarize(runs, metrics):
    """{variant: {metric: (mean, std, n)}} over the seeds that report the metric."""
    out = {}
    for v, by_seed in runs.items():
        out[v] = {}
        for m in metrics:
            values = [r[m] for r in by_seed.values() if m in r and not math.isnan(r[m])]
            if values:
                out[v][m] = mean_std(values)
    return out


def fmt(x, digits=1):
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def markdown_table(paper, ablation, summary, seeds, note=""):
    """The report: mean ± std per variant and metric, then the differences to the reference (bold beyond 2 SE)."""
    metrics, ref = ablation["metrics"], ablation["reference"]
    variants = [v for v in ablation["variants"] if v in summary]
    lines = [f"### {paper}: ablation over seeds {','.join(map(str, seeds))}", ""]
    if note:
        lines += [note, ""]
    lines.append("| variant | flags | seeds | " + " | ".join(metrics) + " |")
    lines.append("|---|---|---|" + "---|" * len(metrics))
    for v in variants:
        cells = []
        for m in metrics:
            s = summary[v].get(m)
            cells.append("–" if s is None else f"{fmt(s[0])} ± {fmt(s[1])}")
        n = max((s[2] for s in summary[v].values()), default=0)
        name = f"{v} (reference)" if v == ref else v
        lines.append(f"| {name} | `{' '.join(ablation['variants'][v]) or '(default)'}` | {n} | " + " | ".join(cells)
                     + " |")
    if ref in summary and len(variants) > 1:
        lines += ["", f"Difference to `{ref}` (± two standard errors of the difference; **bold**: beyond 2 SE):", ""]
        lines.append("| variant | " + " | ".join(metrics) + " |")
        lines.append("|---|" + "---|" * len(metrics))
        for v in variants:
            if v == ref:
                continue
            cells = []
            for m in metrics:
                a, b = summary[v].get(m), summary[ref].get(m)
                if a is None or b is None:
                    cells.append("–")
                    continue
                cell = f"{a[0] - b[0]:+.1f} ± {fmt(two_se(a, b))}"
                cells.append(f"**{cell}**" if beyond_two_se(a, b) else cell)
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- the sweep ---------------------------------------------------------------------------------------------------

def parse_list(text, cast=str):
    return [cast(x) for x in text.split(",") if x.strip()]


def threads_per_run(jobs):
    return max(1, (os.cpu_count() or 1) // jobs)


def run_all(todo, total, paper, metrics, jobs):
    """Run the commands `jobs` at a time, each with cpu_count / jobs threads (OMP_NUM_THREADS). Small models use two
    threads poorly: on 2 cores, two one-thread runs side by side finish ~1.4x sooner than the same runs one after
    another with two threads each (EgoVLP default, measured: README "Ablations"). A failed run stops the sweep once
    the runs already started have ended; the finished ones are kept for the next call."""
    todo, threads = list(todo), str(threads_per_run(jobs))  # (a copy: the loop consumes it)
    env = os.environ if jobs == 1 else dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    running, failed, durations, t_start = [], None, [], time.time()
    while todo or running:
        while todo and len(running) < jobs and failed is None:
            i, v, s, out_dir, cmd, line = todo.pop(0)
            eta = ""
            if durations:  # the runs not finished (this one included) at the mean duration so far, `jobs` at a time
                left = sum(durations) / len(durations) * (len(todo) + len(running) + 1) / jobs
                eta = f", about {left / 60:.0f} min left"
            print(f"[{i}/{total}] {paper} {v} seed {s}: running ({(time.time() - t_start) / 60:.1f} min so far{eta})"
                  f" -> {out_dir}/stdout.log", flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "cmd.txt").write_text(line + "\n")
            log = open(out_dir / "stdout.log", "w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            running.append((proc, log, time.time(), i, v, s, out_dir, line))
        if failed is not None and not running:
            break
        time.sleep(0.2)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            proc, log, t0, i, v, s, out_dir, line = job
            log.close()
            metrics_file = out_dir / "metrics.json"
            if proc.returncode != 0 or not metrics_file.exists():
                tail = (out_dir / "stdout.log").read_text().splitlines()[-15:]
                failed = f"error: run failed (exit {proc.returncode}): {line}\n" + "\n".join(tail)
                continue
            m = json.loads(metrics_file.read_text())
            print(f"    [{i}/{total}] {v} seed {s} done in {(time.time() - t0) / 60:.1f} min: "
                  + ", ".join(f"{k} {m[k]:.1f}" for k in metrics if k in m), flush=True)
            durations.append(time.time() - t0)
    if failed is not None:
        raise SystemExit(failed)
    return time.time() - t_start


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = []
    if "--" in argv:  # everything after `--` is passed to every run
        extra, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    p = argparse.ArgumentParser(prog="python -m common.ablate", description=__doc__.split("\n")[0])
    p.add_argument("paper", help="all_in_one | egovlp | oa_trans")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    p.add_argument("--variants", default="", help="comma list of variant names (default: all of the paper's)")
    p.add_argument("--out", default="runs/ablate", help="runs go to <out>/<paper>/<variant>/s<seed>, the table to "
                                                         "<out>/<paper>.md")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each with cpu_count / jobs threads (default 1;"
                                                         " 2 on a 2-core CPU finishes a table ~1.4x sooner)")
    p.add_argument("--dry_run", action="store_true", help="print the command lines and the table of what exists")
    args = p.parse_args(argv)

    out = Path(args.out).resolve()
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out  # as the runs see it: their cwd is ROOT
    sys.path.insert(0, str(ROOT))
    ablation = load_ablation(args.paper)
    seeds = parse_list(args.seeds, int)
    variants = parse_list(args.variants) or list(ablation["variants"])
    unknown = [v for v in variants if v not in ablation["variants"]]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown} of {args.paper}; known: {list(ablation['variants'])}")
    jobs = [(v, s) for v in variants for s in seeds]

    todo = []  # (i, variant, seed, out_dir, cmd, line) of the runs to make
    for i, (v, s) in enumerate(jobs, 1):
        out_dir = run_dir(out, args.paper, v, s)
        cmd = command(args.paper, ablation["variants"][v], s, run_dir(rel, args.paper, v, s), extra)
        line = shlex.join(["python"] + cmd[1:])
        if args.dry_run:
            print(line)
            continue
        cmd_file, metrics_file = out_dir / "cmd.txt", out_dir / "metrics.json"
        if metrics_file.exists():
            if cmd_file.exists() and cmd_file.read_text().strip() != line:
                raise SystemExit(f"error: {out_dir} holds a run made with other flags:\n  {cmd_file.read_text().strip()}"
                                 f"\nnot\n  {line}\nremove it, or choose another --out")
            print(f"[{i}/{len(jobs)}] {args.paper} {v} seed {s}: reusing {metrics_file}", flush=True)
            continue
        todo.append((i, v, s, out_dir, cmd, line))
    seconds = run_all(todo, len(jobs), args.paper, ablation["metrics"], args.jobs)

    runs = read_runs(out, args.paper, variants, seeds)
    if not runs:
        return None
    note = (f"{datetime.date.today().isoformat()}, {cpu_name()}; each run: "
            f"`python {args.paper}.py --pretrain <flags> "
            f"{shlex.join(extra)} --seed=S`".replace("  ", " "))
    if todo:  # how long this call took, for the runs it made (reused runs are not counted)
        threads = threads_per_run(args.jobs)
        note += (f"; {len(todo)} of the {len(jobs)} runs made by this call in {seconds / 60:.0f} min, "
                 f"{args.jobs} at a time with {threads} thread{'s' * (threads > 1)} each")
    table = markdown_table(args.paper, ablation, summarize(runs, ablation["metrics"]), seeds, note)
    print("\n" + table)
    if not args.dry_run:
        path = out / f"{args.paper}.md"
        path.write_text(table)
        print(f"table written to {path}")
    return table


if __name__ == "__main__":
    main()
