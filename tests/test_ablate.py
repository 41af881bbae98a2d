"""common/ablate.py: the table maths on hand-made metrics.json files, the command lines of a dry run, and one real
sweep of two tiny All-in-one variants (4 runs of 1 step, ~30 s on 2 cores).

    python -m pytest -q tests/test_ablate.py
"""
import json
import math
import re
import statistics

import pytest

from common import ablate


def write_run(out, paper, variant, seed, metrics):
    d = ablate.run_dir(out, paper, variant, seed)
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_mean_std_and_two_se_match_statistics():
    values_a, values_b = [10.0, 12.0, 17.0], [20.0, 21.0]
    a, b = ablate.mean_std(values_a), ablate.mean_std(values_b)
    assert a[0] == pytest.approx(statistics.mean(values_a)) and a[1] == pytest.approx(statistics.stdev(values_a))
    assert a[2] == 3 and b[2] == 2
    expected = 2 * math.sqrt(statistics.variance(values_a) / 3 + statistics.variance(values_b) / 2)
    assert ablate.two_se(a, b) == pytest.approx(expected)
    assert math.isnan(ablate.mean_std([5.0])[1])  # one seed: no spread, and no claim either
    assert not ablate.beyond_two_se(ablate.mean_std([5.0]), ablate.mean_std([50.0]))


def test_table_from_hand_made_runs_marks_only_the_differences_beyond_two_se(tmp_path):
    ablation = dict(reference="ref", variants={"ref": [], "far": ["--x=1"], "near": ["--x=2"]},
                    metrics=["task/acc", "task/other"])
    runs = {"ref": [50, 52, 54], "far": [60, 61, 62], "near": [51, 53, 56]}  # far: +9 (2 SE 2.6); near: +1.3 (2 SE 4)
    for variant, accs in runs.items():
        for seed, acc in enumerate(accs):
            write_run(tmp_path, "paper", variant, seed, {"task/acc": acc, "task/other": 1.0})
    summary = ablate.summarize(ablate.read_runs(tmp_path, "paper", list(runs), [0, 1, 2]), ablation["metrics"])
    assert summary["far"]["task/acc"][0] == pytest.approx(61.0)
    assert summary["ref"]["task/acc"][1] == pytest.approx(2.0)
    assert ablate.beyond_two_se(summary["far"]["task/acc"], summary["ref"]["task/acc"])
    assert not ablate.beyond_two_se(summary["near"]["task/acc"], summary["ref"]["task/acc"])
    table = ablate.markdown_table("paper", ablation, summary, [0, 1, 2])
    assert "| ref (reference) | `(default)` | 3 | 52.0 ± 2.0 | 1.0 ± 0.0 |" in table
    assert "| far | **+9.0 ± 2.6** | +0.0 ± 0.0 |" in table
    near = next(line for line in table.splitlines() if line.startswith("| near | +"))
    assert "**" not in near


def test_dry_run_prints_one_command_per_variant_and_seed(capsys, monkeypatch):
    monkeypatch.chdir(ablate.ROOT)  # --out is relative to where the command is typed; the runs start in the repo
    ablate.main(["egovlp", "--dry_run", "--seeds", "3,4", "--variants", "self+none,verb_and_noun+scene",
                 "--out", "runs/test_ablate_dry", "--", "--max_steps=7"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert lines == [
        "python egovlp.py --pretrain --positives=self --negatives=none --max_steps=7 --seed=3 "
        "--out_dir=runs/test_ablate_dry/egovlp/self+none/s3",
        "python egovlp.py --pretrain --positives=self --negatives=none --max_steps=7 --seed=4 "
        "--out_dir=runs/test_ablate_dry/egovlp/self+none/s4",
        "python egovlp.py --pretrain --positives=verb_and_noun --negatives=scene --max_steps=7 --seed=3 "
        "--out_dir=runs/test_ablate_dry/egovlp/verb_and_noun+scene/s3",
        "python egovlp.py --pretrain --positives=verb_and_noun --negatives=scene --max_steps=7 --seed=4 "
        "--out_dir=runs/test_ablate_dry/egovlp/verb_and_noun+scene/s4"]


@pytest.mark.parametrize("paper", ablate.PAPERS)
def test_every_variant_parses_as_a_config(paper):
    """A typo in a variant's flags would otherwise surface only an hour into a sweep."""
    import importlib
    from common.config import parse_config
    module = importlib.import_module(paper)
    ab = module.ABLATION
    assert ab["reference"] in ab["variants"] and ab["metrics"]
    configs = [parse_config(module.Config, ["--pretrain", *flags], module.PRESETS) for flags in ab["variants"].values()]
    assert len({repr(c) for c in configs}) == len(configs)  # every variant is a different run


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit, match="unknown variant"):
        ablate.main(["oa_trans", "--dry_run", "--variants", "on,of"])


def test_tiny_sweep_runs_resumes_and_writes_the_table(tiny_corpus, tmp_path, capsys):
    extra = ["--", "--tiny", f"--data_root={tiny_corpus}", "--img_size=32", "--max_steps=1", "--max_eval_items=8",
             "--precision=fp32"]
    ablate.main(["all_in_one", "--seeds", "0", "--variants", "roll", "--out", str(tmp_path), *extra])
    first = tmp_path / "all_in_one" / "roll" / "s0" / "metrics.json"
    stamp = first.stat().st_mtime_ns
    table = ablate.main(["all_in_one", "--seeds", "0,1", "--variants", "roll,mean", "--out", str(tmp_path), "--jobs",
                         "2", *extra])  # the three missing runs, two at a time
    out = capsys.readouterr().out
    assert "[1/4] all_in_one roll seed 0: reusing" in out and first.stat().st_mtime_ns == stamp
    assert "[4/4] all_in_one mean seed 1: running" in out
    for variant in ("roll", "mean"):
        for seed in (0, 1):
            m = json.loads((tmp_path / "all_in_one" / variant / f"s{seed}" / "metrics.json").read_text())
            assert {"retrieval/t2v_R@1", "mc_order/acc"} <= set(m)
    assert (tmp_path / "all_in_one.md").read_text() == table
    assert "| roll (reference) | `(default)` | 2 |" in table and "| mean | `--temporal=mean` | 2 |" in table
    assert "Difference to `roll`" in table
    assert re.search(r"3 of the 4 runs made by this call in \d+ min, 2 at a time with \d+ threads? each", table), table
    with pytest.raises(SystemExit, match="other flags"):  # a changed recipe is not mixed into the same table
        ablate.main(["all_in_one", "--seeds", "0", "--variants", "roll", "--out", str(tmp_path), *extra[:-1]])


def test_a_failed_run_stops_the_sweep_and_names_it(tiny_corpus, tmp_path):
    extra = ["--", "--tiny", f"--data_root={tiny_corpus}", "--no_such_flag=1"]
    with pytest.raises(SystemExit, match="run failed.*no_such_flag"):
        ablate.main(["all_in_one", "--seeds", "0,1", "--variants", "roll", "--out", str(tmp_path), "--jobs", "2",
                     *extra])
    assert not (tmp_path / "all_in_one" / "roll" / "s0" / "metrics.json").exists()
