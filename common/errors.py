"""One error policy for the three paper files, `data.check` and the corpus generator.

A failure the user can fix (a flag, a path, a data file, a weights file, a full disk, a permission) ends in ONE
line, `error: <what / where>: <cause>; <what to do>`, and exit status 1, without a traceback. A failure the user
cannot fix (a bug) keeps its traceback: that is what a bug report needs.

How: a fixable failure is raised as `UserError(message)`, a SystemExit, so Python prints its text alone and exits
with 1 (the older `raise SystemExit("error: ...")` lines across the code behave the same way). The `@user_errors`
decorator on each script's `main()` turns the fixable failures that Python and the libraries raise on their own
into one: an OSError of a path (missing, not readable, not writable, a file where a folder should be, a full or
read-only disk) and an `UnusableFile` (weights whose tensors do not fit the model: the report lists every
offending key; a vocab without the special tokens). Anything else propagates unchanged, traceback and all.
"""

import errno
import functools
import os


# what to do, by the OS's reason (errno); a reason not listed here is printed without advice
ADVICE = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.ENOSPC: "free some space on that disk, or choose an --out_dir on another disk",
    errno.EDQUOT: "free some space (disk quota), or choose an --out_dir on another disk",
    errno.EROFS: "the disk is read-only: choose another path",
    errno.EISDIR: "a folder where a file is expected: check the path",
    errno.ENOTDIR: "a file where a folder is expected: check the path",
    errno.EEXIST: "a file already holds that name: move it away or choose another path",
    errno.EIO: "the disk reported an I/O error: check the disk",
    errno.ENAMETOOLONG: "choose a shorter path",
}


class UnusableFile(ValueError):
    """A file the user named that cannot be used: weights whose tensors do not fit the model (common/weights.py's
    load_into; the message lists every offending key), a vocab without BERT's special tokens (common/text.py).
    A ValueError for the code that calls these functions directly; the scripts print it as one error."""


class UserError(SystemExit):
    """A failure the user can fix: printed as the one line `error: <message>`, exit status 1, no traceback."""

    def __init__(self, message):
        super().__init__(message if message.startswith("error: ") else f"error: {message}")


def os_reason(e):
    """'no space left on device' (the OS's wording, lower case) for an OSError."""
    reason = e.strerror or (str(e.args[0]) if e.args else type(e).__name__)
    return reason[:1].lower() + reason[1:]


def os_error(e, path=None, doing=None, note=None):
    """A UserError for an OSError: the path, the OS's reason, what to do (and a `note`), e.g.
    'error: cannot write runs/x/ckpt.pt: no space left on device; free some space on that disk, or ...'."""
    path = path if path is not None else e.filename
    where = " ".join(str(w) for w in (doing, path) if w is not None)
    cause = f"{where}: {os_reason(e)}" if where else os_reason(e)  # (an OSError without a path names it itself)
    return UserError("; ".join(filter(None, (cause, ADVICE.get(e.errno), note))))


def fixable(e):
    """True for the OSErrors a user fixes (a path, a permission, the disk) rather than a bug in this code."""
    return isinstance(e, OSError) and (e.errno in ADVICE or isinstance(e, (FileNotFoundError, PermissionError,
                                                                           IsADirectoryError, NotADirectoryError)))


def user_errors(main):
    """Decorator for a script's main(): the fixable failures raised inside become one `error:` line (UserError);
    every other exception keeps its traceback. Tests calling main() directly see the UserError (a SystemExit)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UnusableFile as e:  # (a refused weights file: its report, every offending key, is the message)
            raise UserError(str(e)) from None
        except OSError as e:
            if not fixable(e):
                raise
            raise os_error(e) from None
    return wrapper


def check_file(path, flag):
    """A file a flag names (--init, --vocab_file, ...) must exist: a one-line error naming the flag otherwise."""
    if not os.path.exists(path):
        raise UserError(f"{flag}={path}: no such file; check the path")
    if os.path.isdir(path):
        raise UserError(f"{flag}={path} is a folder; it names a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{flag}={path}: not readable (permission denied); check its permissions")


def check_data_root(root, needs, default_root=None):
    """--data_root must be a folder holding `needs` (paths relative to it: what the task reads), checked before any
    model is built. For the default root the advice is `bash run.sh data`, which generates it."""
    fix = (f"`bash run.sh data` (or `python -m data.synthetic --out {root}`) makes it" if root == default_root
           else "pass the folder that holds the dataset (data/README.md shows the layout)")
    if not os.path.isdir(root):
        raise UserError(f"--data_root={root} " + ("is a file, not a folder" if os.path.exists(root)
                                                  else "does not exist") + f"; {fix}")
    missing = [p for p in needs if not os.path.exists(os.path.join(root, p))]
    if missing:
        raise UserError(f"--data_root={root} lacks {', '.join(missing)} (what this task reads); {fix}")


def check_inputs(cfg, needs, default_root):
    """The paper files' start-up checks, before any model is built: --data_root holds `needs` (and vocab.txt unless
    --vocab_file is given), and every file that --vocab_file / --init / --init_video / --init_text names exists."""
    check_data_root(cfg.data_root, list(needs) + ([] if cfg.vocab_file else ["vocab.txt"]), default_root)
    for flag in ("vocab_file", "init", "init_video", "init_text"):
        if getattr(cfg, flag, ""):
            check_file(getattr(cfg, flag), f"--{flag}")
