"""Failures a user can cause end in one `error:` line naming the path / column / cause, with exit status 1 and no
traceback (common/errors.py); annotation files as spreadsheets and editors save them read the same rows; two runs
never write into one out_dir.   Run: python -m pytest -q tests/test_failures.py

Most cases call the functions or main() in-process (main() raises the SystemExit whose text Python prints alone);
a few run a script in a subprocess to see what the user sees: the exit status and stderr without a traceback."""
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import all_in_one as aio
import egovlp
import oa_trans as oa
from common.annotations import no_items, read_rows, set_strict, skipped_rows
from common.errors import UserError, user_errors
from common.text import Tokenizer
from common.train import JsonlLogger, prepare_out_dir, save_checkpoint, write_metrics
from data.check import check

ROOT = Path(__file__).resolve().parents[1]
ANNOTATIONS = (".csv", ".json", ".jsonl", ".txt", ".list")


@pytest.fixture(autouse=True)
def default_policy():
    set_strict(False)
    yield
    set_strict(False)


def script(*args, timeout=120):
    """`python <args>` in the repository on one thread, as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc, *names):
    """Exit status 1, stderr's last line is `error: ...` naming each of `names`, and no traceback anywhere."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    for name in names:
        assert str(name) in last, (name, last)
    return last


# --- annotation files as real tools write them -----------------------------------------------------------------

@pytest.fixture(scope="module")
def bom_crlf(tiny_corpus, tmp_path_factory):
    """A copy of the tiny corpus whose every annotation file (CSV, TSV, JSON, JSONL, TXT lists, the vocab) starts
    with a UTF-8 byte-order mark and ends its lines with CRLF, as a spreadsheet on Windows saves them."""
    root = tmp_path_factory.mktemp("bom") / "corpus"
    shutil.copytree(tiny_corpus, root)
    (root / "DONE").unlink()
    changed = 0
    for path in root.rglob("*"):
        if path.suffix in ANNOTATIONS and path.name != "DONE":
            data = path.read_bytes()
            assert not data.startswith(b"\xef\xbb\xbf") and b"\r\n" not in data  # the originals are plain
            path.write_bytes(b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n"))
            changed += 1
    assert changed >= 25
    return root


def same_rows(reader, original, copy):
    """reader(root) on the original and on the copy, paths made relative to each root, compared."""
    def norm(root):
        return json.loads(json.dumps(reader(root), default=lambda x: x.tolist()).replace(str(root), "ROOT"))
    a, b = norm(original), norm(copy)
    assert a == b and a  # the same, and not trivially (something was read)
    return a


def test_a_bom_crlf_copy_of_each_annotation_format_reads_exactly_the_rows_of_the_original(tiny_corpus, bom_crlf):
    readers = {
        "webvid csv": lambda r: [aio.read_webvid(r, s) for s in ("train", "val")],
        "msrvtt json + split lists": lambda r: [aio.read_msrvtt(r, s) for s in ("train", "val", "test")],
        "qa / mc jsonl, action lists": lambda r: [
            aio.build_task_items(aio.Config(data_root=str(r)), t, s) for t in ("qa", "mc", "action")
            for s in ("train", "test")] + [aio.num_action_classes(aio.Config(data_root=str(r)))],
        "egoclip tsv": lambda r: egovlp.read_egoclip(r / "egoclip" / "egoclip.csv"),
        "epic csv": lambda r: [egovlp.read_epic_split(r / "egoclip" / "epic_mir", s)[:2] for s in ("train", "test")],
        "egomcq json": lambda r: egovlp.read_json(r / "egoclip" / "egomcq.json"),
        "charades csv + classes": lambda r: (lambda c: [c.class_texts, c.class_ids, c.labels.tolist()])(
            egovlp.CharadesEgo(r / "egoclip" / "charades", egovlp.Config())),
        "class lists": lambda r: [open(r / "egoclip" / f, encoding="utf-8-sig").read().split() for f in
                                  ("verb_classes.txt", "noun_classes.txt")],
        "oa_trans csv + object vocab": lambda r: (lambda d: [d.rows, d.object_names])(
            oa.WebVidObjects(str(r), "train", oa.Config(), None)),
        "vocab": lambda r: Tokenizer(str(r / "vocab.txt")).ids_to_tokens,
    }
    for name, reader in readers.items():
        same_rows(reader, tiny_corpus, bom_crlf)
    assert skipped_rows() == []  # not one row of either copy was skipped
    for fmt, split in (("webvid", "train"), ("msrvtt", "test"), ("egoclip", "train"), ("epic_mir", "train"),
                       ("charades", "test")):  # data.check finds nothing in the copy either
        problems, _ = check(str(bom_crlf), fmt, split, sample=0, progress=False)
        assert not any(problems.values()), (fmt, problems)


def test_quoted_fields_with_commas_quotes_and_line_breaks(tmp_path):
    captions = ['a red ball, then a cube', 'the "big" box', 'two\nlines', 'crlf\r\ninside', 'plain']
    path = tmp_path / "webvid" / "results_train.csv"
    path.parent.mkdir()
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # csv.writer quotes as Excel does, CRLF rows
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerows([str(i), "u", "PT00H00M02S", "p", c] for i, c in enumerate(captions))
    assert [r["text"] for r in aio.read_webvid(tmp_path, "train")] == captions and skipped_rows() == []


def test_a_header_without_a_required_column_is_one_error_before_any_row(tmp_path, capsys):
    path = tmp_path / "webvid" / "results_train.csv"
    path.parent.mkdir()
    path.write_text("video_id,contentUrl,duration,page_dir,name\n" + "".join(f"{i},u,2,p,a ball\n" for i in range(50)))
    with pytest.raises(SystemExit) as e:
        aio.read_webvid(tmp_path, "train")
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    assert str(path) in message and "lacks column videoid" in message and "'video_id'" in message
    assert "warning" not in capsys.readouterr().out and skipped_rows() == []  # no row was read
    with pytest.raises(SystemExit, match=rf"{path}: the header lacks column videoid; it has 'video_id'"):
        oa.WebVidObjects(str(tmp_path), "train", oa.Config(), None)  # oa_trans's reader of the same file


@pytest.mark.parametrize("reader,path,column", [
    (lambda p: egovlp.read_egoclip(p), "egoclip.csv", "clip_text"),
    (lambda p: egovlp.read_csv(p, ("narration",)), "sentences.csv", "narration"),
])
def test_the_header_check_in_the_other_csv_readers(tmp_path, reader, path, column):
    path = tmp_path / path
    path.write_text("\t".join(["video_uid", "narration_time", "clip_start", "clip_end", "tag_verb", "tag_noun"])
                    + "\nv\t1\t0\t2\t[]\t[]\n")
    with pytest.raises(SystemExit, match=rf"{path.name}: the header lacks column {column}; it has"):
        reader(path)


def test_a_spreadsheet_csv_with_a_bom_trains(tiny_corpus, tmp_path):
    """The issue's case: every row of a BOM-prefixed results_train.csv was skipped ("KeyError: 'videoid'")."""
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    (root / "DONE").unlink()
    csv_path = root / "webvid" / "results_train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    m = aio.main(["--tiny", "--img_size=32", "--max_eval_items=4", "--precision=fp32", "--batch_size=5",
                  "--max_steps=1", "--eval_every=100", f"--data_root={root}", f"--out_dir={tmp_path / 'out'}"])
    assert m["data/bad_rows"] == 0


def test_a_split_without_usable_rows_says_why_not_batch_size_0(tmp_path):
    assert "--batch_size=3 or less" in str(no_items(3, 8))
    path = tmp_path / "a.jsonl"
    path.write_text('{"q": 1}\n{"q": 2}\n[3]\n')
    read_rows(path, lambda row: row["question"], "jsonl")
    message = str(no_items(0, 8))
    assert "3 bad rows skipped" in message and f"{path}, line 1: malformed row (KeyError: 'question')" in message
    assert "batch_size" not in message and "\n" not in message


def test_a_training_split_of_bad_rows_only_names_them_in_main(tiny_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, root)
    (root / "DONE").unlink()
    csv_path = root / "webvid" / "results_train.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([lines[0]] + [",".join(line.split(",")[:3]) for line in lines[1:]]) + "\n")
    with pytest.raises(SystemExit) as e:
        aio.main(["--tiny", "--precision=fp32", f"--data_root={root}", f"--out_dir={tmp_path / 'out'}"])
    message = str(e.value)
    assert message.startswith("error: no training items: every row was unusable")
    assert f"{len(lines) - 1} bad rows skipped" in message and "results_train.csv, line 2" in message
    assert "batch_size" not in message


# --- paths checked at start-up ---------------------------------------------------------------------------------

@pytest.mark.parametrize("paper", ["all_in_one", "egovlp", "oa_trans"])
def test_a_missing_data_root_is_one_line_before_any_model(tmp_path, paper):
    proc = script(f"{paper}.py", f"--data_root={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / 'out'}")
    one_error_line(proc, tmp_path / "nowhere", "does not exist")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_corpus_generator_and_data_check_end_in_one_line_too(tmp_path):
    (tmp_path / "a_file").write_text("x")
    one_error_line(script("-m", "data.synthetic", "--out", tmp_path / "a_file" / "synth", "--size", "tiny"),
                   tmp_path / "a_file", "file exists")
    one_error_line(script("-m", "data.check", "--root", tmp_path / "a_file", "--format", "webvid"),
                   tmp_path / "a_file" / "webvid" / "results_train.csv", "not a directory")


def test_an_out_dir_that_is_a_file_is_one_line(tiny_corpus, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(SystemExit, match=rf"^error: --out_dir={tmp_path}/taken is a file, not a folder; choose"):
        oa.main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'taken'}"])
    with pytest.raises(SystemExit, match="cannot create --out_dir .*: not a directory"):
        prepare_out_dir(tmp_path / "taken" / "sub")


@pytest.mark.parametrize("paper", ["all_in_one", "egovlp", "oa_trans"])
def test_data_root_without_what_the_task_reads_and_missing_weights_files(tiny_corpus, tmp_path, paper):
    main = {"all_in_one": aio.main, "egovlp": egovlp.main, "oa_trans": oa.main}[paper]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=rf"--data_root={empty} lacks .*vocab\.txt"):
        main([f"--data_root={empty}", f"--out_dir={tmp_path / 'out'}"])
    for flag in ("init", "init_video", "init_text", "vocab_file"):
        with pytest.raises(SystemExit, match=rf"^error: --{flag}={tmp_path}/no\.pt: no such file"):
            main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'out'}", f"--{flag}={tmp_path}/no.pt"])
    assert not (tmp_path / "out").exists()


def test_a_vocab_larger_than_the_table_or_without_special_tokens_is_one_error(tiny_corpus, tmp_path):
    with pytest.raises(SystemExit, match=rf"^error: {tiny_corpus}/vocab\.txt: \d+ tokens, more than the model's "
                                         r"word-embedding table \(vocab_size=10\)"):
        aio.main(["--tiny", f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'a'}", "--vocab_size=10"])
    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\nball\n")
    for main in (oa.main, egovlp.main):
        with pytest.raises(SystemExit, match=r"v\.txt: special tokens \['\[CLS\]', '\[SEP\]', '\[MASK\]'\] are not"):
            main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'b'}", f"--vocab_file={tmp_path}/v.txt"])


def test_the_default_data_root_names_run_sh_data(tmp_path):
    from common.errors import check_data_root
    with pytest.raises(SystemExit, match="bash run.sh data"):
        check_data_root(str(tmp_path / "synth"), [], default_root=str(tmp_path / "synth"))


def test_a_refused_weight_load_is_one_report_without_traceback(tiny_corpus, tmp_path):
    torch.save({"model": {"not_a_layer.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    proc = script("all_in_one.py", "--tiny", "--precision=fp32", f"--data_root={tiny_corpus}",
                  f"--out_dir={tmp_path / 'out'}", f"--init={tmp_path / 'other.pt'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    report = proc.stderr[proc.stderr.index("error: cannot load"):]
    assert str(tmp_path / "other.pt") in report and "not_a_layer.weight" in report  # the keys, listed once
    assert "map to no parameter" in report and "are not in the source" in report


def test_the_handler_keeps_the_traceback_of_a_bug(tmp_path):
    @user_errors
    def bug():
        return {}["missing"]

    @user_errors
    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x"))
    with pytest.raises(KeyError):
        bug()
    with pytest.raises(UserError, match=rf"{tmp_path}/x: no space left on device; free some space"):
        full()


# --- a full or failing disk ------------------------------------------------------------------------------------

def enospc(*args, **kwargs):
    f = args[1] if len(args) > 1 else None
    if hasattr(f, "write"):
        f.write(b"x" * 1000)  # part of the file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_last_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "step": 2}, str(path))
    monkeypatch.setattr("common.train.torch.save", enospc)
    with pytest.raises(SystemExit) as e:
        save_checkpoint({"model": {"w": torch.zeros(3)}, "step": 4}, str(path))
    message = str(e.value)
    assert message.startswith(f"error: cannot write {path}: no space left on device") and "\n" not in message
    assert torch.load(path, weights_only=True)["step"] == 2 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_full_disk_for_metrics_and_log_names_the_path_and_keeps_the_numbers(tmp_path, monkeypatch):
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode or "a" in mode:
            f.write = lambda data: enospc()
        return f
    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(SystemExit, match=rf"cannot write {tmp_path}/metrics\.json: no space left on device.*"
                                         r'"test/R@1": 12\.5'):
        write_metrics(str(tmp_path), {"test/R@1": 12.5})
    with pytest.raises(SystemExit, match=rf"cannot write {tmp_path}/log\.jsonl: no space left on device"):
        JsonlLogger(str(tmp_path / "log.jsonl")).log({"step": 1})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["log.jsonl"]  # (opened for appending); no metrics.json.tmp left behind


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_real_enospc_reaches_the_message(tmp_path, monkeypatch):
    """/dev/full fails every write with ENOSPC, as a full disk does: the checkpoint file is opened there."""
    monkeypatch.setattr("common.train.tempfile.mkstemp", lambda **kw: (os.open(os.devnull, os.O_RDONLY), "/dev/full"))
    monkeypatch.setattr("common.train.os.remove", lambda p: None)  # (do not try to delete /dev/full)
    with pytest.raises(SystemExit, match=r"cannot write .*ckpt\.pt: no space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(100_000)}}, str(tmp_path / "ckpt.pt"))


# --- one writer per out_dir ------------------------------------------------------------------------------------

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from common.train import prepare_out_dir
prepare_out_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_locked_out_dir_is_refused_naming_the_pid_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (False, True):
            with pytest.raises(SystemExit, match=rf"process {holder.pid}\b") as e:
                prepare_out_dir(str(out), resume=resume)
            assert ("--resume refused" in str(e.value)) == resume and "another --out_dir" in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    prepare_out_dir(str(out))  # the OS released the killed process's lock
    assert (out / ".lock").read_text().strip() == str(os.getpid())


def test_two_runs_on_one_out_dir_exactly_one_proceeds(tiny_corpus, tmp_path):
    """Run A (a subprocess) trains; run B, started on the same out_dir while A holds it, is refused at once naming
    A's process id; A completes and its files are its own."""
    out = tmp_path / "out"
    args = ["--tiny", "--img_size=32", "--max_eval_items=4", "--precision=fp32", "--batch_size=5",
            "--max_steps=4", "--eval_every=100", "--log_every=1", f"--data_root={tiny_corpus}", f"--out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    a = subprocess.Popen([sys.executable, "all_in_one.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((out / ".lock").exists() and (out / ".lock").read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(SystemExit) as b:  # (in this process: refused within a second, while A still trains)
        aio.main(args)
    a_out, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-2000:]
    assert str(b.value).startswith(f"error: {out} is in use by another run (process {a.pid},")
    steps = [r["step"] for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # one run's records
