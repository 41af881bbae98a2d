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
import functools
import hashlib
import io
import json
import os
import shutil

import numpy as np

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
    real_root = _realpath(os.path.abspath(root))  # (absolute first: a relative root follows the working directory)
    if all(p and p not in (".", "..") and os.sep not in p for p in parts):  # plain names: only a symlink can leave
        real = real_root  # (the same answer as below, with one lstat per part instead of one per component, and
        for k, p in enumerate(parts):  # the folders' answers kept: WebVid repeats each page_dir 50 times)
            real = real.rstrip(os.sep) + os.sep + p
            if (_is_link_cached if k < len(parts) - 1 else os.path.islink)(real):
                real = os.path.realpath(real)
        leaves = not real.startswith(real_root.rstrip(os.sep) + os.sep)
    else:
        leaves = os.path.commonpath([real_root, os.path.realpath(path)]) != real_root
    if leaves:
        raise BadRow(f"path {os.path.join(*parts)!r} leaves the data root {root}")
    return path


@functools.lru_cache(maxsize=64)
def _realpath(root):
    return os.path.realpath(root)


@functools.lru_cache(maxsize=1 << 16)
def _is_link_cached(path):
    return os.path.islink(path)


# -----------------------------------------------------------------------------
# columnar index: the large tables (WebVid, EgoClip) at millions of rows
#
# A list of 10 M dicts takes ~750 bytes a row and minutes to parse, and every DataLoader worker that touches the
# rows copies their pages (reference counts live in the objects). `read_table` parses the file once under the same
# bad-row policy as `read_rows`, stores the parsed rows as columns (numbers as typed numpy arrays, strings as one
# UTF-8 buffer plus offsets, a string column with few distinct values as codes into its distinct values, a list
# of ints as values plus offsets) in `<file>.index/`, one .npy per array, and later runs memory-map those files:
# start-up reads a few bytes, and the pages are shared by every worker process (the OS's page cache, no copy).
# The cache records the file's size, modification time and a hash of its ends, and the reader's `version`; a
# change rebuilds it.
# Bad rows met while building are stored with it and reported again (or stop a --strict run) at every load.

INDEX_FORMAT = 1


class StringColumn:
    """n strings held as one UTF-8 buffer (uint8) and n + 1 offsets: item i is buffer[offsets[i]:offsets[i+1]]."""

    def __init__(self, buffer, offsets):
        self.buffer, self.offsets = buffer, offsets

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


class CodedColumn:
    """n strings with few distinct values: codes (int32) into `values` (a StringColumn)."""

    def __init__(self, codes, values):
        self.codes, self.values = codes, values

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, i):
        return self.values[int(self.codes[i])]


class ListColumn:
    """n lists of ints: values (int32) and n + 1 offsets."""

    def __init__(self, values, offsets):
        self.values, self.offsets = values, offsets

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.values[self.offsets[i]:self.offsets[i + 1]].tolist()


class NumberColumn:
    """A typed numpy array whose items come out as python numbers (what the parsed rows held)."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, i):
        return self.array[i].item()


class Table:
    """Parsed rows held as columns; `table[i]` is row i as the dict `parse` returned, `len(table)` the row count,
    `table.columns[name]` a column (its numpy arrays: .array, .codes / .values, .buffer / .offsets). Indexable
    like the list `read_rows` returns, without a python object per row."""

    def __init__(self, columns, n):
        self.columns, self.n = columns, n
        self.extra = None  # optional fn(row, i) -> dict of fields computed at access (e.g. a path under the root)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):  # a list of rows, as a list's slice
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        i = i % self.n
        row = {name: col[i] for name, col in self.columns.items()}
        if self.extra is not None:
            row.update(self.extra(row, i))
        return row

    def distinct(self, name):
        """The set of values of a column (fast for a coded string column: its distinct values are stored)."""
        if not self.n:  # (an empty table has no columns)
            return set()
        col = self.columns[name]
        if isinstance(col, CodedColumn):
            return {col.values[k] for k in np.unique(col.codes).tolist()}
        return {col[i] for i in range(len(col))}

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def tolist(self):
        """Every row as a list of dicts (what read_rows returns; python objects again, for small tables)."""
        return list(self)

    def nbytes(self):
        """Bytes of the arrays (what a process maps; shared between processes)."""
        return sum(a.nbytes for col in self.columns.values() for a in _arrays(col).values())


def _arrays(col):
    """name suffix -> numpy array of a column (how it is saved)."""
    if isinstance(col, StringColumn):
        return {"buffer": col.buffer, "offsets": col.offsets}
    if isinstance(col, CodedColumn):
        return {"codes": col.codes, "values.buffer": col.values.buffer, "values.offsets": col.values.offsets}
    if isinstance(col, ListColumn):
        return {"values": col.values, "offsets": col.offsets}
    return {"array": col.array}


def _offsets(lengths):
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets.astype(np.uint32) if offsets[-1] < 2 ** 32 else offsets


def _strings(values):
    data = [v.encode("utf-8") for v in values]
    return StringColumn(np.frombuffer(b"".join(data), dtype=np.uint8), _offsets([len(d) for d in data]))


class _ColumnBuilder:
    """Collects one column's python values and packs them every CHUNK rows (a build's memory stays near the size of
    the packed arrays); `pack` joins the chunks, typed by the first value."""

    CHUNK = 1 << 18

    def __init__(self):
        self.values, self.chunks, self.n = [], [], 0
        self.code = {}  # string -> code, while the column still looks coded (few distinct values)

    def add(self, value):
        self.values.append(value)
        if len(self.values) == self.CHUNK:
            self.flush()

    def flush(self):
        v, self.values = self.values, []
        if not v:
            return
        self.n += len(v)
        if isinstance(v[0], str):
            data = [x.encode("utf-8") for x in v]
            codes = None
            if self.code is not None:
                codes = np.array([self.code.setdefault(x, len(self.code)) for x in v], dtype=np.int32)
                if len(self.code) > max(1000, self.n // 4):  # many distinct values: a plain string column
                    self.code, codes = None, None
            self.chunks.append((b"".join(data), np.array([len(d) for d in data], dtype=np.int64), codes))
        elif isinstance(v[0], list):
            flat = np.array([x for item in v for x in item], dtype=np.int32)
            self.chunks.append((flat, np.array([len(item) for item in v], dtype=np.int64)))
        else:
            dtype = bool if isinstance(v[0], bool) else np.int64 if isinstance(v[0], int) else np.float64
            if not isinstance(v[0], (bool, int, float)):
                raise TypeError(f"read_table cannot store a column of {type(v[0]).__name__}")
            self.chunks.append((np.array(v, dtype=dtype),))

    def pack(self):
        self.flush()
        first = self.chunks[0]
        if isinstance(first[0], bytes):
            if self.code is not None and len(self.code) <= self.n // 4:  # few distinct values (video ids): codes
                return CodedColumn(np.concatenate([c[2] for c in self.chunks]), _strings(list(self.code)))
            buffer = np.frombuffer(b"".join(c[0] for c in self.chunks), dtype=np.uint8)
            return StringColumn(buffer, _offsets(np.concatenate([c[1] for c in self.chunks])))
        if len(first) == 2:
            return ListColumn(np.concatenate([c[0] for c in self.chunks]),
                              _offsets(np.concatenate([c[1] for c in self.chunks])))
        return NumberColumn(np.concatenate([c[0] for c in self.chunks]))


def _iter_rows(path, fmt, columns=()):
    """(line number, row) of a csv / tsv file with a header, read as a stream (read_rows reads the whole text), as
    read_text opens it (a byte-order mark dropped, LF or CRLF) and with read_rows' header check."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
        check_header(path, reader.fieldnames or [], columns)
        for row in reader:
            yield reader.line_num, row


def _check_row(row):
    """read_rows' checks before `parse`: the same BadRow messages."""
    try:
        ascii_row = "".join(row.values()).isascii()  # (fast; a row with missing or extra cells holds None or a list)
    except TypeError:
        ascii_row = False
    if not ascii_row and _not_utf8(row.values()):
        raise BadRow("bytes that are not UTF-8")
    if None in row or None in row.values():
        raise BadRow(f"{len([v for v in row.values() if v is not None]) + len(row.get(None) or [])} "
                     f"columns, the header has {len([k for k in row if k is not None])}")


def _stamp(path, fmt, columns, version):
    """What a cached index must match: the file's size, modification time and a hash of its first and last MiB
    (the whole of a small file: an edit that keeps the size within one clock tick is still seen), the format and
    the reader's version."""
    st = os.stat(path)
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
        elif st.st_size > 1 << 20:
            digest.update(f.read())
    return dict(format=INDEX_FORMAT, size=st.st_size, mtime_ns=st.st_mtime_ns, sample_sha1=digest.hexdigest(),
                fmt=fmt, columns=list(columns), version=version)


def index_dir(path):
    return str(path) + ".index"


def build_table(path, parse, fmt="csv", columns=()):
    """Parse a csv / tsv file row by row under the bad-row policy -> (Table, [(where, why)] of the skipped rows)."""
    builders, bad, n = {}, [], 0
    for line, row in _iter_rows(path, fmt, columns):
        try:
            _check_row(row)
            parsed = parse(row)
        except (BadRow, KeyError, ValueError, TypeError, SyntaxError) as e:
            why = str(e) if isinstance(e, BadRow) else f"malformed row ({type(e).__name__}: {e})"
            bad_row(path, f"line {line}", why)
            bad.append((f"line {line}", why))
            continue
        if not builders:
            builders = {name: _ColumnBuilder() for name in parsed}
        if parsed.keys() != builders.keys():
            raise TypeError(f"read_table: parse returned the keys {sorted(parsed)}, earlier rows {sorted(builders)}")
        for name, value in parsed.items():
            builders[name].add(value)
        n += 1
    return Table({name: b.pack() for name, b in builders.items()}, n), bad


def save_table(table, bad, directory, stamp):
    """Write the arrays and meta.json into a fresh sibling folder, then rename it into place (a killed build
    leaves no half index)."""
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    kinds = {}
    for name, col in table.columns.items():
        kinds[name] = type(col).__name__
        for suffix, array in _arrays(col).items():
            np.save(os.path.join(tmp, f"{name}.{suffix}.npy"), array)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(dict(stamp=stamp, rows=table.n, columns=kinds, bad_rows=bad), f)
    shutil.rmtree(directory, ignore_errors=True)
    try:
        os.rename(tmp, directory)
    except OSError:  # another process (a second rank) renamed its own copy first: that one is used
        shutil.rmtree(tmp, ignore_errors=True)
        if load_table(directory, stamp) is None:
            raise


def load_table(directory, stamp):
    """The cached Table, memory-mapped, with its skipped rows, or None when absent or stale."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
        if meta["stamp"] != stamp:
            return None
        load = lambda name: np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
        columns = {}
        for name, kind in meta["columns"].items():
            if kind == "StringColumn":
                columns[name] = StringColumn(load(f"{name}.buffer"), load(f"{name}.offsets"))
            elif kind == "CodedColumn":
                columns[name] = CodedColumn(load(f"{name}.codes"), StringColumn(load(f"{name}.values.buffer"),
                                                                                load(f"{name}.values.offsets")))
            elif kind == "ListColumn":
                columns[name] = ListColumn(load(f"{name}.values"), load(f"{name}.offsets"))
            else:
                columns[name] = NumberColumn(load(f"{name}.array"))
        return Table(columns, meta["rows"]), [tuple(b) for b in meta["bad_rows"]]
    except (OSError, ValueError, KeyError):  # absent, half-written by hand, or from another format: rebuild
        return None


def read_table(path, parse, fmt="csv", columns=(), version="", cache=True):
    """`read_rows` for the large tables: the same rows (parse returns a dict of str / int / float / bool /
    list[int], the same keys on every row) and the same bad-row messages, held as a columnar Table and cached in
    `<path>.index/` (see above). `columns`: the header's required columns, as for read_rows (checked when the index
    is built). `version` names the parse function's behaviour: change it when `parse` changes, so old caches are
    rebuilt. Without write access beside the file the table is built in memory each run."""
    if fmt not in ("csv", "tsv"):
        raise ValueError(f"read_table reads csv / tsv files, not {fmt}")
    stamp = _stamp(path, fmt, columns, version)
    directory = index_dir(path)
    found = load_table(directory, stamp) if cache else None
    if found is not None:
        table, bad = found
        for where, why in bad:  # reported (or, --strict, an error) as when the file was read
            bad_row(path, where, why)
        return table
    table, bad = build_table(path, parse, fmt, columns)
    if cache and table.n:
        try:
            save_table(table, bad, directory, stamp)
            found = load_table(directory, stamp)  # memory-mapped from now on: shared by the workers
            table = found[0] if found else table
        except OSError as e:
            print(f"warning: cannot write the annotation index {directory} ({e}); it is rebuilt at every start")
    return table
