#!/usr/bin/env bash
# Executable documentation: how to set up, test and run each paper file.
#
#   bash run.sh            install what is missing, generate the synthetic corpus, run each paper's default job
#   bash run.sh test       install what is missing, run the test suite
#   bash run.sh setup      only install
#   bash run.sh data       only generate the synthetic corpus (data/synth, 1-2 minutes on 2 cores)
#   bash run.sh all_in_one | egovlp | oa_trans    one paper's default job
#   bash run.sh ablate <paper> [--seeds 0,1,2] [--variants a,b] [--dry_run] [-- <flags for every run>]
#                          the paper's central ablation (its ABLATION dict) over seeds: runs/ablate/<paper>/..., and
#                          the table of mean ± std, differences beyond two standard errors in bold: runs/ablate/<paper>.md
#   bash run.sh gpu        on a CUDA machine: each default and paper-size preset in bf16 for a few hundred steps,
#                          the benchmark table, and a summary (clips/s, loss fall, seconds to the first logged step)
#
# Set PYTHON to choose the interpreter (default: python3). Outputs go to runs/<paper>/ (each paper file's default out_dir).
# A paper file refuses to write into an out_dir holding another run's files unless given --resume (continue it) or
# --overwrite (replace it); the jobs below pass --overwrite, so running them again replaces their earlier outputs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
  # torch first: the CPU build is small (and on this project's machines it lies on local disk); a machine with
  # an NVIDIA driver gets the default CUDA build.
  if ! $PY -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      $PY -m pip install -q "torch>=2.4"
    else
      $PY -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
        || $PY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu \
        || $PY -m pip install -q "torch>=2.4"
    fi
  fi
  if ! $PY -c "import einops, numpy, PIL, av, tqdm, pytest" 2>/dev/null; then
    $PY -m pip install -q -r requirements.txt
  fi
}

data() {
  $PY -m data.synthetic --out data/synth --seed 0 --size default
}

# --- the default jobs: CPU-sized models trained from scratch on the synthetic corpus, a few minutes each ---
# All-in-one: one single-stream transformer, temporal token rolling, VTM + MLM + VTC; zero-shot retrieval,
# multiple choice and masked motion words at the end. Ablation: --temporal=mean.
#   one GPU:   python all_in_one.py --pretrain --device=cuda --num_workers=8
#   many GPUs: torchrun --standalone --nproc_per_node=8 all_in_one.py --pretrain
run_all_in_one() { $PY all_in_one.py --pretrain --overwrite "$@"; }

# EgoVLP: Frozen-style dual encoder on EgoClip pairs with EgoNCE; EgoMCQ and EPIC-MIR at the end.
# Ablation (InfoNCE): --positives=self --negatives=none
run_egovlp() { $PY egovlp.py --pretrain --overwrite "$@"; }

# OA-Trans: dual encoder plus object regions on an anchor frame and object tags; zero-shot MSR-VTT-style retrieval.
# Ablation (plain Frozen): --objects=off
run_oa_trans() { $PY oa_trans.py --pretrain --overwrite "$@"; }

# --- the central ablations (common/ablate.py; the variants are each paper file's ABLATION, next to its presets):
#   bash run.sh ablate all_in_one     temporal=roll | mean | shift | flatten, and rolling in the video-only pass
#   bash run.sh ablate egovlp         positives self | noun | verb | verb_and_noun x negatives none | scene
#   bash run.sh ablate oa_trans       objects off | on | each object term alone
# 3 seeds each; a run whose metrics.json exists is reused, so an interrupted sweep resumes where it stopped.
run_ablate() { $PY -m common.ablate "$@"; }

# --- on a GPU: every default and every paper-size preset in bf16 for a few hundred steps, then the benchmark
gpu() {
  mkdir -p runs/gpu
  local common=(--device=cuda --precision=bf16 --num_workers="${GPU_WORKERS:-8}" --log_every=25 --overwrite)
  timed() { local out=$1; shift; date +%s.%N > "runs/gpu/$out.start"; "$@" --out_dir="runs/gpu/$out"; }
  for paper in all_in_one egovlp oa_trans; do
    timed "$paper" $PY "$paper.py" --pretrain "${common[@]}" --max_steps=300
  done
  timed all_in_one_B $PY all_in_one.py --pretrain --paper --B "${common[@]}" --batch_size=32 --grad_accum=1 \
    --max_steps=200 --eval_every=1000 --max_eval_items=100
  timed egovlp_paper $PY egovlp.py --paper "${common[@]}" --batch_size=32 --max_steps=200 --max_eval_items=50
  timed oa_trans_paper $PY oa_trans.py --paper "${common[@]}" --batch_size=32 --max_steps=200 --eval_every=1000
  $PY tests/bench.py --device=cuda --paper_batch=16 --data_steps=0 --out=runs/gpu/bench.md
  $PY - <<'PY'
import glob, json, os, statistics
print("\n==== GPU runs (runs/gpu/<run>/log.jsonl) ====")
print(f"{'run':<16} {'s to step 25':>12} {'clips/s (median)':>17} {'data wait':>10} {'first loss':>11} {'last loss':>10}")
for log in sorted(glob.glob("runs/gpu/*/log.jsonl")):
    run = os.path.basename(os.path.dirname(log))
    recs = [r for r in map(json.loads, open(log)) if "clips_per_s" in r]
    if not recs:
        continue
    start = float(open(f"runs/gpu/{run}.start").read())
    print(f"{run:<16} {recs[0]['time'] - start:12.1f} {statistics.median(r['clips_per_s'] for r in recs[1:] or recs):17.0f} "
          f"{statistics.median(r.get('data_wait_pct', float('nan')) for r in recs):9.0f}% "
          f"{recs[0]['loss']:11.3f} {recs[-1]['loss']:10.3f}")
PY
}

summary() {
  $PY - "$@" <<'PY'
import json, os, sys
print("\n==== summary (runs/<paper>/metrics.json) ====")
for paper in sys.argv[1:]:
    path = os.path.join("runs", paper, "metrics.json")
    if not os.path.exists(path):
        print(f"{paper:<11} (no metrics.json)")
        continue
    metrics = json.load(open(path))
    print(f"{paper}:")
    for k, v in sorted(metrics.items()):
        print(f"  {k:<32} {v:8.2f}")
PY
}

cmd=${1:-main}
case "$cmd" in
  setup) setup ;;
  test)
    setup
    $PY -m pytest -q tests ;;
  data) setup; data ;;
  gpu) setup; data; gpu ;;
  ablate) setup; data; shift; run_ablate "$@" ;;
  all_in_one|egovlp|oa_trans)
    setup; shift; "run_$cmd" "$@"; summary "$cmd" ;;
  main)
    setup
    data   # a no-op when data/synth is complete and current; regenerates an outdated version
    papers=()
    for paper in all_in_one egovlp oa_trans; do
      if [ -f "$paper.py" ]; then "run_$paper"; papers+=("$paper"); fi
    done
    summary "${papers[@]}" ;;
  *) echo "unknown command '$cmd': use test, setup, data, gpu, ablate, all_in_one, egovlp, oa_trans or nothing"; exit 2 ;;
esac
