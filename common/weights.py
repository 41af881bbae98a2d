"""Pretrained weights in, with every tensor accounted for: safe reading, key maps, and a report.

A checkpoint someone downloaded is read without running any code it holds: `torch.load(weights_only=True)`
for .pth / .pt / .bin / .ckpt, and a 20-line reader for .safetensors (a JSON header and raw bytes; no
`safetensors` package needed). Objects that are not tensors or plain containers (an `argparse.Namespace` or a
`ConfigParser` in the `config` entry of a release checkpoint, a numpy scalar in `monitor_best`) are replaced by
inert placeholders: their class is never imported, their constructor never called. Modules that no checkpoint
has a reason to name (os, subprocess, builtins' eval, ...) stay refused by torch, so such a file fails to load.

The key maps themselves live in the paper files, next to the modules they name: a list of (regex, replacement)
rules applied in order to every key of the source, a list of source keys to drop on purpose (an ImageNet
classifier head, a buffer), and a list of model keys that the source is not expected to provide (a temporal
branch a ViT never had). `load_into` then loads the rest strictly: a source tensor that maps to no parameter, a
parameter that nothing provides, or a shape it cannot adapt is an error that lists every offending key.

Shapes adapted on the way (each one is written into the report):
  *.temporal_embed              (1, T_ckpt, D) -> (1, T, D): cut to the first rows, or zero-padded (Frozen's
                                "zeros" inflation: the new frames start without a temporal offset)
  *.pos_embed                   (1, 1 + g*g, D) -> (1, 1 + G*G, D): the patch grid resampled bicubically
                                (timm's resample for another image size); a DeiT-distilled table (1, 2 + g*g, D)
                                first loses the distillation token's row
  *.position_embeddings.weight  (P_ckpt, D) -> (P, D) with P < P_ckpt: the first P positions kept
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common.errors import UnusableFile  # a ValueError; the scripts' main() prints it as one error, no traceback


# ---------------------------------------------------------------------------------------------------------------
# Reading

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """The safetensors format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw little-endian tensor bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(data[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        state[name] = flat.reshape(info["shape"])
    return state


def _placeholder(name):
    """An inert stand-in for a class a checkpoint names: built from any arguments, it keeps nothing."""
    return type(name.rsplit(".", 1)[-1], (), {
        "__new__": lambda cls, *args, **kwargs: object.__new__(cls),
        "__init__": lambda self, *args, **kwargs: None,
        "__setstate__": lambda self, state: None,
        "__repr__": lambda self: f"<not read: {name}>",
    })


def read_checkpoint(path):
    """Whatever object the file holds, read without executing its pickled code (see the module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    others = []
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):  # torch >= 2.5, zip-format files
        try:
            others = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # a legacy (pre-1.6) file: torch's own weights_only load says what it cannot read
            others = []
    if not others:
        return torch.load(path, map_location="cpu", weights_only=True)
    with torch.serialization.safe_globals([(_placeholder(n), n) for n in others]):
        return torch.load(path, map_location="cpu", weights_only=True)


def find_state_dict(obj):
    """The tensors of a checkpoint: under "state_dict" (Lightning, Frozen / EgoVLP, OA-Trans), "model" (ours,
    DeiT's releases) or "module", else the object itself; a DDP "module." prefix is stripped."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_state_dict(path):
    return find_state_dict(read_checkpoint(path))


def map_key(key, rules):
    """Apply the (regex, replacement) rules, in order, to one key."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


# ---------------------------------------------------------------------------------------------------------------
# Shape adaptation

def fit_temporal_embed(te, num_frames):
    """(1, T_ckpt, D) -> (1, num_frames, D): the first rows, or zero rows appended (Frozen's "zeros" mode; a
    4-frame model fine-tuned at 16 frames starts with rows 5-16 at zero)."""
    if te.shape[1] >= num_frames:
        return te[:, :num_frames]
    return torch.cat([te, te.new_zeros(1, num_frames - te.shape[1], te.shape[2])], dim=1)


def resize_pos_embed(pe, rows):
    """(1, 1 + g*g, D) -> (1, rows, D) with rows = 1 + G*G: [CLS]'s row kept, the g x g grid resampled bicubically
    to G x G (align_corners=False, as timm). A (1, 2 + g*g, D) DeiT-distilled table first drops row 1."""
    if not _is_square(pe.shape[1] - 1) and _is_square(pe.shape[1] - 2):
        pe = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)  # the distillation token's row
    g, G = math.isqrt(pe.shape[1] - 1), math.isqrt(rows - 1)
    if g == G:
        return pe
    grid = pe[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=(G, G), mode="bicubic", align_corners=False)
    return torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, G * G, -1).to(pe.dtype)], dim=1)


def _is_square(n):
    return n > 0 and math.isqrt(n) ** 2 == n


def adapt_shape(key, src, shape):
    """(tensor, how) for the three tables that legitimately change shape, else None (a real mismatch)."""
    how = f"{tuple(src.shape)} -> {tuple(shape)}"
    if key.endswith("temporal_embed") and src.ndim == 3 and src.shape[2] == shape[2]:
        verb = "cut to the first rows" if src.shape[1] > shape[1] else "zero rows appended"
        return fit_temporal_embed(src, shape[1]), f"{how}, {verb}"
    if key.endswith("pos_embed") and src.ndim == 3 and src.shape[2] == shape[2] and _is_square(shape[1] - 1) \
            and (_is_square(src.shape[1] - 1) or _is_square(src.shape[1] - 2)):
        out = resize_pos_embed(src, shape[1])
        if out.shape == shape:
            distilled = not _is_square(src.shape[1] - 1)
            g, G = math.isqrt(src.shape[1] - 1 - distilled), math.isqrt(shape[1] - 1)
            steps = ([f"the {g}x{g} patch grid resampled bicubically to {G}x{G}"] if g != G else []) + \
                    (["the distillation token's row dropped"] if distilled else [])
            return out, f"{how}, " + ", ".join(steps)
    if key.endswith("position_embeddings.weight") and src.ndim == 2 and src.shape[1] == shape[1] \
            and src.shape[0] > shape[0]:
        return src[:shape[0]], f"{how}, the first {shape[0]} positions kept"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Loading with a report

@dataclass
class Report:
    """What a load did with every tensor. Lists of keys (model names, except `dropped`: source names)."""
    source: str
    loaded: list = field(default_factory=list)
    reshaped: dict = field(default_factory=dict)  # model key -> how
    dropped: list = field(default_factory=list)   # source keys discarded on purpose
    new: list = field(default_factory=list)       # model keys the source does not provide, kept at their init
    source_keys: list = field(default_factory=list, repr=False)
    model_keys: list = field(default_factory=list, repr=False)

    def __str__(self):
        lines = [f"{self.source}: {len(self.loaded)} tensors loaded"]
        lines += [f"  reshaped {k}: {how}" for k, how in self.reshaped.items()]
        if self.dropped:
            lines.append(f"  dropped on purpose ({len(self.dropped)}): "
                         + ", ".join(collapse(self.dropped, self.source_keys)))
        if self.new:
            lines.append(f"  new, kept at their init ({len(self.new)}): "
                         + ", ".join(collapse(self.new, self.model_keys)))
        return "\n".join(lines)


def collapse(keys, every):
    """Short names for a list of keys: a top-level module all of whose keys (in `every`) are listed becomes
    'name.*', and layer indices fold into '*' (blocks.0.norm3.weight ... blocks.11.norm3.weight: one entry)."""
    listed, top = set(keys), lambda k: k.split(".")[0]
    whole = {t for t in map(top, keys) if all(k in listed for k in every if top(k) == t)}
    return list(dict.fromkeys(f"{top(k)}.*" if top(k) in whole and "." in k else re.sub(r"\.\d+\.", ".*.", k)
                              for k in keys))


def _matches(key, patterns):
    return any(re.search(p, key) for p in patterns)


def load_into(model, state, rules=(), drop=(), new=(), source="checkpoint"):
    """Load `state` (source names) into `model` strictly and return a Report.

    rules: (regex, replacement) pairs mapping source names to the model's (see `map_key`).
    drop:  regexes over source names (or their mapped names): tensors the model has no place for, discarded on
           purpose (only when the model lacks the mapped key; a key the model has is always loaded).
    new:   regexes over model names: parameters the source is not expected to provide (only when it doesn't).
    Anything else left over on either side, or a shape that adapt_shape cannot adapt, raises an UnusableFile (a
    ValueError) that lists every such key. Nothing is loaded when it raises.
    """
    own = model.state_dict()
    report = Report(source, source_keys=list(state), model_keys=list(own))
    mapped, collisions = {}, []
    for src_key, value in state.items():
        key = map_key(src_key, rules)
        if key not in own and (_matches(src_key, drop) or _matches(key, drop)):
            report.dropped.append(src_key)
        elif key in mapped:
            collisions.append(f"{mapped[key][0]} and {src_key} both map to {key}")
        else:
            mapped[key] = (src_key, value)
    unused = [f"{s} (as {k})" if s != k else s for k, (s, _) in mapped.items() if k not in own]
    missing = [k for k in own if k not in mapped and not _matches(k, new)]
    report.new = [k for k in own if k not in mapped and _matches(k, new)]
    bad_shapes, weights = [], {}
    for key, (src_key, value) in mapped.items():
        if key not in own:
            continue
        if value.shape != own[key].shape:
            adapted = adapt_shape(key, value, own[key].shape)
            if adapted is None:
                bad_shapes.append(f"{key}: {tuple(value.shape)} in the source, {tuple(own[key].shape)} here")
                continue
            value, report.reshaped[key] = adapted
        weights[key] = value
        report.loaded.append(key)
    errors = [f"{len(collisions)} model keys have two sources:\n    " + "\n    ".join(collisions)] if collisions else []
    if unused:
        errors.append(f"{len(unused)} source tensors map to no parameter of the model:\n    " + "\n    ".join(unused))
    if missing:
        errors.append(f"{len(missing)} model parameters are not in the source:\n    " + "\n    ".join(missing))
    if bad_shapes:
        errors.append(f"{len(bad_shapes)} shapes differ (is the model built with the checkpoint's sizes?):\n    "
                      + "\n    ".join(bad_shapes))
    if errors:
        raise UnusableFile(f"cannot load {source}:\n  " + "\n  ".join(errors))
    model.load_state_dict(weights, strict=False)  # strict=False only because `new` keys stay at their init
    return report


def load_weights(model, sources, paper, log=print):
    """Load each (path, key map) of `sources` whose path is set, in order (e.g. --init_video, --init_text, --init),
    printing each Report. A file may be ours ({"model": ...}), a release's ({"state_dict": ...}) or the tensors
    themselves (timm / Hugging Face); `paper` refuses a checkpoint of another paper file (common/train.py)."""
    from common.train import load_checkpoint  # (common/train.py imports this module)
    for path, key_map in sources:
        if path:
            log(load_into(model, find_state_dict(load_checkpoint(path, paper=paper)), **key_map, source=path))
