"""Command-line configuration: one dataclass per paper file, overridden as `--key=value`.

Each paper file declares a flat dataclass whose fields carry a `# comment` on their line (meaning, typical range,
the paper's value). `parse_config` turns a command line into an instance:

    python all_in_one.py --pretrain --batch_size=32 --temporal=mean --resume

- `--key=value` sets a field; the value is checked against the field's type (int, float, str, bool, or a tuple /
  list of numbers or strings written as a comma list: `--lr_steps=10,20`).
- `--key` alone sets a bool field to True.
- `--<preset>` applies a named preset (a dict of field values declared in the paper file). Presets are applied
  first, in the order given, and explicit `--key=value` overrides win whatever their position.
- Unknown keys are an error that suggests the closest field names; `--help` lists every field with its default
  and its comment, read from the dataclass source.
- `choices` ({field: allowed values}) and `ranges` ({field: (low, high)}, inclusive, None = open) declared next to
  the dataclass are checked on the final values (presets included): `--objects=maybe` or `--batch_size=0` is a
  one-line error naming the field and what it accepts, never a bare assertion deep in the run.
"""

import dataclasses
import difflib
import inspect
import os
import re
import sys
import typing


def _field_comments(cfg_cls):
    """-> ({field name: the `# comment` on its line}, {field name: the `# --- group` line just above it})."""
    try:
        source = inspect.getsource(cfg_cls)
    except (OSError, TypeError):
        return {}, {}
    comments, groups, group = {}, {}, None
    for line in source.splitlines():
        header = re.match(r"\s*# --- (.*)$", line)
        if header:
            group = header.group(1).strip()
            continue
        m = re.match(r"\s*(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
            if group:
                groups[m.group(1)], group = group, None
    return comments, groups


def _convert(name, value, typ):
    """Parse the string `value` as `typ`; raise ValueError with a message naming the field."""
    origin = typing.get_origin(typ)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(typ) if a is not Ellipsis] or [str]
        items = [v for v in value.split(",") if v != ""]
        parsed = [_convert(name, v, args[0] if len(args) == 1 else args[i]) for i, v in enumerate(items)]
        return tuple(parsed) if origin is tuple else parsed
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects a bool (true/false), got {value!r}")
    if typ is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"--{name} expects an int, got {value!r}") from None
    if typ is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"--{name} expects a float, got {value!r}") from None
    return value  # str


def format_help(cfg_cls, presets=None, prog=None):
    """The `--help` text: usage, presets, then one line per field (name, type, default, comment)."""
    comments, groups = _field_comments(cfg_cls)
    hints = typing.get_type_hints(cfg_cls)
    lines = [f"usage: python {prog or os.path.basename(sys.argv[0])} [--preset] [--key=value ...]", ""]
    if presets:
        lines.append("presets (applied first, explicit --key=value wins):")
        for name, values in presets.items():
            lines.append(f"  --{name:<14} " + (" ".join(f"{k}={v}" for k, v in values.items()) or "(the defaults)"))
    rows = []
    for f in dataclasses.fields(cfg_cls):
        typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, f"--{f.name}={default!s}", typ))
    width = min(32, max(len(left) for _, left, _ in rows))
    lines += ["", "fields:"]
    for name, left, typ in rows:
        if name in groups:
            lines.append(f" {groups[name]}:")
        lines.append(f"  {left:<{width}} {typ:<5}  {comments.get(name, '')}")
    return "\n".join(lines)


def check_values(cfg, choices=None, ranges=None):
    """SystemExit naming the first field whose value is not among its `choices` or outside its `ranges`."""
    for name, allowed in (choices or {}).items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"error: --{name} must be one of {', '.join(repr(a) for a in allowed)}; "
                             f"got {getattr(cfg, name)!r}")
    for name, (low, high) in (ranges or {}).items():
        value = getattr(cfg, name)
        if (low is not None and value < low) or (high is not None and value > high):
            want = (f"between {low} and {high}" if low is not None and high is not None
                    else f">= {low}" if low is not None else f"<= {high}")
            raise SystemExit(f"error: --{name} must be {want}; got {value}")
    return cfg


def parse_config(cfg_cls, argv=None, presets=None, choices=None, ranges=None):
    """Build a `cfg_cls` instance from `argv` (defaults to sys.argv[1:]); see the module docstring."""
    argv = sys.argv[1:] if argv is None else list(argv)
    presets = presets or {}
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    hints = typing.get_type_hints(cfg_cls)

    if "--help" in argv or "-h" in argv:
        print(format_help(cfg_cls, presets))
        raise SystemExit(0)

    chosen_presets, overrides = [], {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"error: arguments look like --key=value, got {arg!r} (see --help)")
        key, has_value, value = arg[2:].partition("=")
        if not has_value and key in presets:
            chosen_presets.append(key)
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields) + list(presets), n=3)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise SystemExit(f"error: unknown option --{key}{hint} (see --help)")
        if not has_value:
            if hints[key] is not bool:
                raise SystemExit(f"error: --{key} needs a value: --{key}=...")
            value = "true"
        try:
            overrides[key] = _convert(key, value, hints[key])
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None

    values = {}
    for name in chosen_presets:
        values.update(presets[name])
    values.update(overrides)
    unknown = set(values) - set(fields)
    if unknown:  # a preset naming a field that does not exist is a bug in the paper file
        raise ValueError(f"presets set unknown fields: {sorted(unknown)}")
    return check_values(cfg_cls(**values), choices, ranges)


def config_to_dict(cfg):
    """A plain dict of the config, for checkpoints and logs."""
    return dataclasses.asdict(cfg)
