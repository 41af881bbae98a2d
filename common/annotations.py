"""Annotation files (CSV, TSV, JSON lines, JSON) read under one bad-row policy, shared by the three paper files.

Real annotation dumps hold rows that cannot be used: missing columns, malformed tag lists, empty captions, bytes
that are not UTF-8, duplicate ids, paths that leave the data root. A reader hands each row to a small `parse`
function of its paper file; a row that `parse` cannot use (it raises BadRow, or KeyError / ValueError / TypeError /
SyntaxError on a malformed field) is
- by default skipped and counted, with its `file, line N: why` on the console and in `skipped_rows()` (the paper
  files put the count in metrics.json as data/bad_rows);
- with `--strict` (`set_strict(True)`) an error naming the file and the line, before the first training step.
(The release's pandas readers drop such lines silently, or crash at the step that first touches them.)
"""

import csv
import io
import json
import os

_POLICY = {"strict": False}
_SKIPPED = []  # "file, line N: why" of every row skipped in this process


class BadRow(ValueError):
    """A row that cannot be used; the message says why (the caller adds file and line)."""


def set_strict(strict):
    _POLICY["strict"] = bool(strict)
    _SKIPPED.clear()  # one run's count


def skipped_rows():
    return list(_SKIPPED)


def bad_row(path, where, why):
    """Apply the policy to one unusable row: skip and count it, or (strict) stop, naming file and line / key."""
    message = f"{path}, {where}: {why}"
    if _POLICY["strict"]:
        raise SystemExit(f"error: {message} (--strict; without it the row would be skipped and counted)")
    if message not in _SKIPPED:  # a file read twice (train answers, then train items) counts its rows once
        _SKIPPED.append(message)
        print(f"warning: {message}; row skipped (--strict makes this an error)")


def read_text(path):
    """The file as text; bytes that are not UTF-8 are kept as surrogates, so that the row holding them (and only
    that row) is reported by `read_rows`."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def _not_utf8(values):
    return any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in values)


def read_rows(path, parse, fmt="csv"):
    """Rows of a "csv" / "tsv" file (with a header), a "jsonl" file or a "lines" file (one stripped line per row:
    split lists, K400-style lists), each passed through `parse(row)` -> the kept value; unusable rows follow the
    bad-row policy. Returns the list of parsed rows, in file order."""
    text, out = read_text(path), []
    if fmt in ("jsonl", "lines"):
        rows = ((n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip())
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
        rows = ((reader.line_num, r) for r in reader)  # line 1 is the header
    for n, row in rows:
        try:
            if _not_utf8(row.values() if isinstance(row, dict) else [row]):
                raise BadRow("bytes that are not UTF-8")
            if fmt == "jsonl":
                try:
                    row = json.loads(row)
                except json.JSONDecodeError as e:
                    raise BadRow(f"malformed JSON ({e})") from None
                if not isinstance(row, dict):
                    raise BadRow(f"expected a JSON object, got {type(row).__name__}")
            elif fmt != "lines" and (None in row or None in row.values()):
                raise BadRow(f"{len([v for v in row.values() if v is not None]) + len(row.get(None) or [])} "
                             f"columns, the header has {len([k for k in row if k is not None])}")
            out.append(parse(row))
        except (BadRow, KeyError, ValueError, TypeError, SyntaxError) as e:
            why = str(e) if isinstance(e, BadRow) else f"malformed row ({type(e).__name__}: {e})"
            bad_row(path, f"line {n}", why)
    return out


def read_json(path):
    """A whole JSON file; a syntax error or non-UTF-8 bytes are an error naming the file, line and column (a JSON
    file is one record: it cannot be skipped row by row; its entries can, with `bad_row(path, key, why)`)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}, byte {e.start}: not UTF-8 ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}, line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None


def text_field(row, key):
    """row[key] as a non-empty string: an empty caption is a bad row, not a silent training pair."""
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"empty {key!r}")
    return value


def inside(root, *parts):
    """os.path.join(root, *parts), refused (BadRow) when the result leaves `root`: an annotation cell holding
    `../` or an absolute path must not make the run read files elsewhere on the machine."""
    path = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise BadRow(f"path {os.path.join(*parts)!r} leaves the data root {root}")
    return path
