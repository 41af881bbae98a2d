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
    """The file as text, as spreadsheets and editors save it: UTF-8 with or without a byte-order mark (dropped),
    line endings left as they are (LF or CRLF; the readers below accept both). Bytes that are not UTF-8 are kept as
    surrogates, so that the row holding them (and only that row) is reported by `read_rows`."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        return f.read()


def _not_utf8(values):
    return any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in values)


def read_rows(path, parse, fmt="csv", columns=()):
    """Rows of a "csv" / "tsv" file (with a header), a "jsonl" file or a "lines" file (one stripped line per row:
    split lists, K400-style lists), each passed through `parse(row)` -> the kept value; unusable rows follow the
    bad-row policy. Returns the list of parsed rows, in file order.

    CSV / TSV as the csv module reads them: quoted fields may hold commas, quotes ("") and line breaks. `columns`:
    the header's required columns, checked before any row is read: a header without one is one error naming the
    file, the missing columns and the columns found (not a bad row per line)."""
    text, out = read_text(path), []
    if fmt in ("jsonl", "lines"):  # (split on "\n" only: str.splitlines would also split a JSON string at U+2028)
        rows = ((n, line.strip()) for n, line in enumerate(text.split("\n"), start=1) if line.strip())
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",")
        check_header(path, reader.fieldnames or [], columns)
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


def check_header(path, found, columns):
    """SystemExit naming the file, the required `columns` its header lacks and the columns it has."""
    missing = [c for c in columns if c not in found]
    if missing:
        stripped = [c for c in missing if c in [f.strip().strip('"') for f in found]]
        hint = (f" ({', '.join(stripped)} with spaces or quotes around the name)" if stripped else "")
        raise SystemExit(f"error: {path}: the header lacks column{'s' * (len(missing) > 1)} {', '.join(missing)}"
                         f"{hint}; it has {', '.join(repr(f) for f in found) or 'no columns (an empty file?)'}. "
                         f"Fix the header line (line 1)")


def no_items(n, batch_size, what="training items"):
    """The error for a split too small for one batch. With no usable row at all it says why (the bad-row count and
    the first reasons), never to lower --batch_size to 0."""
    if n:
        return SystemExit(f"error: {n} {what}, fewer than --batch_size={batch_size}: no batch can be drawn; use "
                          f"--batch_size={n} or less")
    if not _SKIPPED:
        return SystemExit(f"error: no {what}: the split's annotation file holds no rows; check --data_root and "
                          f"the split's files")
    first = "; ".join(_SKIPPED[:3])
    return SystemExit(f"error: no {what}: every row was unusable ({len(_SKIPPED)} bad rows skipped; first: {first}). "
                      f"Fix the annotation file (`python -m data.check` lists every problem)")


def read_json(path):
    """A whole JSON file; a syntax error or non-UTF-8 bytes are an error naming the file, line and column (a JSON
    file is one record: it cannot be skipped row by row; its entries can, with `bad_row(path, key, why)`)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark is dropped)
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
