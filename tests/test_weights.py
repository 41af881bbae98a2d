"""Tests for common/weights.py and the three paper files' key maps, on state dicts built here with the public
names and shapes of timm's `vit_base_patch16_224` / `deit_tiny_patch16_224` / `deit_small_distilled_patch16_224`,
transformers' `DistilBertModel` / `DistilBertForMaskedLM` / `BertModel` / `BertForPreTraining`, and the releases'
checkpoint layouts (EgoVLP, Frozen / OA-Trans, All-in-one's Lightning .ckpt). Small widths keep them fast; the
full-size key sets are checked on the meta device. Imported encoders are compared with plain forwards written
below from the same tensors.

    python -m pytest -q tests/test_weights.py
"""
import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import all_in_one as aio
import egovlp
import oa_trans as oa
from common.weights import find_state_dict, load_into, read_checkpoint, read_state_dict, resize_pos_embed


# ------------------------------------------------------------------------------------ state dicts with real names

def maker(device, generator):
    """A tensor factory: shapes only on the meta device (no memory), else small random values."""
    if device == "meta":
        return lambda *shape: torch.empty(shape, device="meta")
    return lambda *shape: torch.randn(*shape, generator=generator) * 0.1


def timm_vit(D, depth, img=224, patch=16, classes=1000, distilled=False, device=None, seed=0):
    """The keys and shapes of timm's VisionTransformer (vit_base_patch16_224: D=768, depth 12; deit_tiny: 192)."""
    g = torch.Generator().manual_seed(seed)
    r = maker(device, g)
    n = (img // patch) ** 2
    sd = {"cls_token": r(1, 1, D), "pos_embed": r(1, n + 1 + distilled, D),
          "patch_embed.proj.weight": r(D, 3, patch, patch), "patch_embed.proj.bias": r(D)}
    if distilled:
        sd["dist_token"] = r(1, 1, D)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D),
                   b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D),
                   b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D),
                   b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D),
                   b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                   b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)})
    sd.update({"norm.weight": 1 + r(D), "norm.bias": r(D), "head.weight": r(classes, D), "head.bias": r(classes)})
    if distilled:
        sd.update({"head_dist.weight": r(classes, D), "head_dist.bias": r(classes)})
    return sd


def hf_distilbert(D, layers, vocab=30522, positions=512, ffn=None, masked_lm=False, device=None, seed=1):
    """transformers' DistilBertModel keys (DistilBertForMaskedLM: under "distilbert." plus the MLM head)."""
    g = torch.Generator().manual_seed(seed)
    r = maker(device, g)
    ffn = ffn or 4 * D
    sd = {"embeddings.word_embeddings.weight": r(vocab, D), "embeddings.position_embeddings.weight": r(positions, D),
          "embeddings.LayerNorm.weight": 1 + r(D), "embeddings.LayerNorm.bias": r(D)}
    for i in range(layers):
        b = f"transformer.layer.{i}."
        for lin in ("q_lin", "k_lin", "v_lin", "out_lin"):
            sd.update({b + f"attention.{lin}.weight": r(D, D), b + f"attention.{lin}.bias": r(D)})
        sd.update({b + "sa_layer_norm.weight": 1 + r(D), b + "sa_layer_norm.bias": r(D),
                   b + "ffn.lin1.weight": r(ffn, D), b + "ffn.lin1.bias": r(ffn),
                   b + "ffn.lin2.weight": r(D, ffn), b + "ffn.lin2.bias": r(D),
                   b + "output_layer_norm.weight": 1 + r(D), b + "output_layer_norm.bias": r(D)})
    if masked_lm:
        sd = {"distilbert." + k: v for k, v in sd.items()}
        sd.update({"vocab_transform.weight": r(D, D), "vocab_transform.bias": r(D), "vocab_layer_norm.weight": r(D),
                   "vocab_layer_norm.bias": r(D), "vocab_projector.weight": r(vocab, D),
                   "vocab_projector.bias": r(vocab)})
    return sd


def hf_bert(D, layers, vocab=30522, positions=512, pretraining=False, device=None, seed=2):
    """transformers' BertModel keys; BertForPreTraining's original file: "bert." prefix, LayerNorm.gamma / beta,
    and the cls.* heads."""
    g = torch.Generator().manual_seed(seed)
    r = maker(device, g)
    ln_w, ln_b = ("gamma", "beta") if pretraining else ("weight", "bias")
    sd = {"embeddings.word_embeddings.weight": r(vocab, D), "embeddings.position_embeddings.weight": r(positions, D),
          "embeddings.token_type_embeddings.weight": r(2, D), f"embeddings.LayerNorm.{ln_w}": 1 + r(D),
          f"embeddings.LayerNorm.{ln_b}": r(D), "embeddings.position_ids": torch.arange(positions)[None]}
    for i in range(layers):
        b = f"encoder.layer.{i}."
        for name, shape in (("attention.self.query", (D, D)), ("attention.self.key", (D, D)),
                            ("attention.self.value", (D, D)), ("attention.output.dense", (D, D)),
                            ("intermediate.dense", (4 * D, D)), ("output.dense", (D, 4 * D))):
            sd.update({b + name + ".weight": r(*shape), b + name + ".bias": r(shape[0])})
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd.update({b + f"{name}.{ln_w}": r(D), b + f"{name}.{ln_b}": r(D)})
    sd.update({"pooler.dense.weight": r(D, D), "pooler.dense.bias": r(D)})
    if pretraining:
        sd = {"bert." + k: v for k, v in sd.items()}
        sd.update({"cls.predictions.bias": r(vocab), "cls.predictions.transform.dense.weight": r(D, D),
                   "cls.predictions.transform.dense.bias": r(D), f"cls.predictions.transform.LayerNorm.{ln_w}": r(D),
                   f"cls.predictions.transform.LayerNorm.{ln_b}": r(D), "cls.predictions.decoder.weight": r(vocab, D),
                   "cls.seq_relationship.weight": r(2, D), "cls.seq_relationship.bias": r(2)})
    return sd


# ------------------------------------------------------------------------------------------- plain references

def layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def linear(x, sd, name):
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def attend(q, k, v, heads, keep=None):
    """Softmax attention written out: (B, L, D) each -> (B, L, D); keep (B, L) masks keys."""
    B, L, D = q.shape
    q, k, v = (z.reshape(B, -1, heads, D // heads).transpose(1, 2) for z in (q, k, v))  # (B, H, L, e)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)


def plain_vit(sd, img, heads, patch, extra=None):
    """A ViT on images (B, 3, S, S) from a timm state dict -> all tokens after the final norm (B, 1 + N, D).
    `extra` (D,) is added to every token after the position embedding (All-in-one's modality row)."""
    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat([sd["cls_token"].expand(len(img), -1, -1), x], 1) + sd["pos_embed"]
    if extra is not None:
        x = x + extra
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        h = layer_norm(x, sd, b + "norm1", 1e-6)
        q, k, v = linear(h, sd, b + "attn.qkv").chunk(3, dim=-1)
        x = x + linear(attend(q, k, v, heads), sd, b + "attn.proj")
        h = layer_norm(x, sd, b + "norm2", 1e-6)
        x = x + linear(F.gelu(linear(h, sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return layer_norm(x, sd, "norm", 1e-6)


def plain_distilbert(sd, ids, mask, heads):
    """DistilBertModel's last_hidden_state (B, L, D), dropout off."""
    x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = layer_norm(x, sd, "embeddings.LayerNorm", 1e-12)
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.layer.")})
    for i in range(layers):
        b = f"transformer.layer.{i}."
        q, k, v = (linear(x, sd, b + f"attention.{n}") for n in ("q_lin", "k_lin", "v_lin"))
        x = layer_norm(x + linear(attend(q, k, v, heads, mask.bool()), sd, b + "attention.out_lin"), sd,
                       b + "sa_layer_norm", 1e-12)
        h = linear(F.gelu(linear(x, sd, b + "ffn.lin1")), sd, b + "ffn.lin2")
        x = layer_norm(x + h, sd, b + "output_layer_norm", 1e-12)
    return x


def params_untouched(model, before, report):
    """Model parameters whose value did not change and that the report does not call new."""
    after = model.state_dict()
    return [k for k in after if torch.equal(after[k], before[k]) and k not in report.new]


# ------------------------------------------------------------------------------------------------ safe reading

def test_a_release_style_checkpoint_reads_without_running_its_objects(tmp_path):
    """A "config" object (Frozen saves a ConfigParser, Lightning a Namespace) is replaced by an inert placeholder;
    the tensors come through, DDP's "module." stripped."""
    path = tmp_path / "release.pth"
    torch.save({"state_dict": {"module.a.weight": torch.ones(2)}, "config": argparse.Namespace(lr=3),
                "epoch": 3}, path)
    ckpt = read_checkpoint(str(path))
    assert ckpt["epoch"] == 3 and not isinstance(ckpt["config"], argparse.Namespace)
    assert read_state_dict(str(path)).keys() == {"a.weight"}


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["WEIGHTS_TEST_MARKER"],))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("WEIGHTS_TEST_MARKER", str(marker))
    torch.save({"model": {"w": torch.ones(1)}, "x": _RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(Exception):
        read_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_safetensors_reader(tmp_path):
    """A file written here byte by byte in the safetensors layout reads back exactly (f32, bf16, i64)."""
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4).to(torch.bfloat16), "c": torch.arange(5)}
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    (tmp_path / "m.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    back = read_state_dict(str(tmp_path / "m.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_unmapped_keys_fail_with_a_message_that_lists_them():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    state = {"0.weight": torch.zeros(3, 2), "extra.thing": torch.zeros(1)}  # 0.bias missing, extra.thing unused
    with pytest.raises(ValueError) as err:
        load_into(model, state, source="x.pth")
    assert "extra.thing" in str(err.value) and "0.bias" in str(err.value)
    with pytest.raises(ValueError, match=r"0\.weight: \(4, 2\)"):
        load_into(model, {"0.weight": torch.zeros(4, 2), "0.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="fc.weight and 0.weight both map to 0.weight"):
        load_into(model, {"fc.weight": torch.zeros(3, 2), "0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3)},
                  rules=[(r"^fc\.", "0.")])


def test_pos_embed_resize_keeps_cls_and_a_constant_grid_and_drops_the_distillation_row():
    pe = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 196, 4), 2.0)], 1)  # 14 x 14 grid
    out = resize_pos_embed(pe, 1 + 16)
    assert out.shape == (1, 17, 4) and torch.equal(out[:, 0], pe[:, 0])
    assert torch.allclose(out[:, 1:], torch.full((1, 16, 4), 2.0))
    distilled = torch.cat([pe[:, :1], torch.full((1, 1, 4), -5.0), pe[:, 1:]], 1)  # (1, 198, 4), DeiT-S
    assert torch.equal(resize_pos_embed(distilled, 197), pe)


# --------------------------------------------------------------------------- Frozen-style video encoder + DistilBERT

EGO_TINY = dict(img_size=32, patch_size=16, vit_width=32, vit_depth=2, vit_heads=2, text_width=32,
                text_layers=2, text_heads=2, text_ffn=128, text_positions=16, embed_dim=16, num_frames=4)
OA_TINY = dict(img_size=32, patch_size=16, vit_width=32, vit_depth=2, vit_heads=2, text_width=32, text_layers=2,
               text_heads=2, text_positions=16, text_ffn=128, embed_dim=16, num_frames=4)


def ego_model(**kw):
    return egovlp.FrozenInTime(egovlp.Config(**{**EGO_TINY, **kw}), 50).init_weights(kw.get("time_init", "live"))


def oa_model(**kw):
    return oa.OATrans(oa.Config(**{**OA_TINY, **kw}), 50)


@pytest.mark.parametrize("paper,time_init", [("egovlp", "live"), ("egovlp", "release"), ("oa_trans", "live"),
                                             ("oa_trans", "release")])
def test_timm_vit_into_the_video_encoder_equals_a_plain_vit(paper, time_init):
    """One frame through the divided space-time encoder = the image ViT of the same tensors (the temporal branch
    starts as identity, with either temporal init); every parameter outside the temporal branch and the text
    side is overwritten."""
    torch.manual_seed(0)
    model = (ego_model(time_init=time_init) if paper == "egovlp" else oa_model(time_init=time_init)).eval()
    keys = egovlp.VIT_INIT if paper == "egovlp" else oa.VIT_INIT
    sd = timm_vit(32, 2, img=32, patch=16, classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_into(model, sd, **keys)
    assert report.dropped == ["head.weight", "head.bias"]
    assert all(k.startswith("text_model.") or k.startswith(("txt_proj", "vid_proj")) or "timeattn" in k
               or "norm3" in k or k.endswith("temporal_embed") for k in report.new)
    assert params_untouched(model, before, report) == []
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.video_model(img[:, None])[:, 0]  # the [CLS] token
        assert torch.allclose(ours, plain_vit(sd, img, heads=2, patch=16)[:, 0], atol=1e-5)


@pytest.mark.parametrize("paper", ["egovlp", "oa_trans"])
@pytest.mark.parametrize("masked_lm", [False, True])
def test_hf_distilbert_into_the_text_encoder_equals_a_plain_distilbert(paper, masked_lm):
    torch.manual_seed(1)
    model = (ego_model() if paper == "egovlp" else oa_model()).eval()
    keys = egovlp.DISTILBERT_INIT if paper == "egovlp" else oa.DISTILBERT_INIT
    sd = hf_distilbert(32, 2, vocab=50, positions=40, masked_lm=masked_lm)  # 40 positions cut to 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_into(model, sd, **keys)
    assert list(report.reshaped) == ["text_model.embeddings.position_embeddings.weight"]
    assert len(report.dropped) == (6 if masked_lm else 0)
    assert params_untouched(model, before, report) == []
    assert not any(k.startswith("text_model.") for k in report.new)
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 11, 12, 13, 14, 3]])
    mask = (ids != 0).long()
    plain = {k.removeprefix("distilbert."): v for k, v in sd.items()}
    with torch.no_grad():
        assert torch.allclose(model.text_model(ids, mask), plain_distilbert(plain, ids, mask, heads=2), atol=1e-5)


def test_egovlp_release_checkpoint_loads_every_key(tmp_path):
    """The release layout: {"state_dict": {"module." + our names}}, a 16-row temporal_embed, HF's position_ids."""
    src = ego_model(num_frames=16)
    state = {"module." + k: v + 0.5 for k, v in src.state_dict().items()}
    state["module.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save({"state_dict": state, "arch": "FrozenInTime", "epoch": 2}, tmp_path / "egovlp.pth")
    model = ego_model()
    report = load_into(model, read_state_dict(str(tmp_path / "egovlp.pth")), **egovlp.FULL_MODEL)
    assert report.new == [] and report.dropped == ["text_model.embeddings.position_ids"]
    assert list(report.reshaped) == ["video_model.temporal_embed"]
    for k, v in model.state_dict().items():
        expected = state["module." + k][:, :4] if k.endswith("temporal_embed") else state["module." + k]
        assert torch.equal(v, expected), k


def test_oa_trans_frozen_layout_checkpoint_loads_every_key():
    """Frozen / OA-Trans release: vid_proj is Sequential(Linear) (vid_proj.0.*), a 1-frame temporal_embed
    zero-padded to 4 frames, "module." from DDP."""
    src = oa_model(num_frames=1)
    state = {"module." + k.replace("vid_proj.", "vid_proj.0."): v for k, v in src.state_dict().items()}
    model = oa_model()
    report = load_into(model, find_state_dict({"state_dict": state}), **oa.FULL_MODEL)
    assert report.new == [] and report.dropped == [] and len(report.loaded) == len(model.state_dict())
    te = model.state_dict()["video_model.temporal_embed"]
    assert torch.equal(te[:, :1], src.video_model.temporal_embed) and not te[:, 1:].any()
    assert torch.equal(model.vid_proj.weight, src.vid_proj.weight)


def test_full_size_key_sets_on_the_meta_device():
    """The paper-size models take every tensor of the real-size files: vit_base_patch16_224 and
    distilbert-base-uncased into egovlp / oa_trans --paper, deit_tiny and deit_small_distilled and
    vit_base into All-in-one Ti / S / B, bert-base-uncased's embeddings into All-in-one B."""
    with torch.device("meta"):
        ego = egovlp.FrozenInTime(egovlp.Config(**egovlp.PRESETS["paper"]), 30522)
        oat = oa.OATrans(oa.Config(**oa.PRESETS["paper"]), 30522)
        aio_models = {p: aio.AllInOne(aio.Config(**aio.PRESETS[p])) for p in ("Ti", "S", "B")}
    vit_b, bert = timm_vit(768, 12, device="meta"), hf_distilbert(768, 6, device="meta")
    for model, m in ((ego, egovlp), (oat, oa)):
        r = load_into(model, vit_b, **m.VIT_INIT)
        assert len(r.loaded) == len(vit_b) - 2 and r.dropped == ["head.weight", "head.bias"]
        r = load_into(model, bert, **m.DISTILBERT_INIT)
        assert len(r.loaded) == len(bert) == 100  # DistilBertModel's 100 tensors (transformers >= 4.31)
    for preset, sd in (("Ti", timm_vit(192, 12, device="meta")),
                       ("S", timm_vit(384, 12, distilled=True, device="meta")), ("B", vit_b)):
        r = load_into(aio_models[preset], sd, **aio.VIT_INIT)
        n_drop = 5 if preset == "S" else 2  # head (+ head_dist, dist_token)
        assert len(r.dropped) == n_drop and len(r.loaded) == len(sd) - n_drop
        assert r.new.count("transformer.temporal_embed") == 1
    r = load_into(aio_models["B"], hf_bert(768, 12, device="meta"), **aio.BERT_INIT)
    assert sorted(r.loaded) == sorted("text_embeddings." + k for k in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight",
        "LayerNorm.bias"))


# ------------------------------------------------------------------------------------------------- All-in-one

AIO_TINY = dict(width=32, depth=2, heads=2, patch_size=16, img_size=32, num_frames=3, max_text_len=12,
                vocab_size=50, embed_dim=16, temporal="mean", roll_tokens="fixed")


@pytest.mark.parametrize("distilled", [False, True])
def test_timm_vit_into_all_in_one_equals_a_plain_vit(distilled):
    """A frame through the video-only pass = a plain ViT of the same tensors, plus the modality row (new)."""
    torch.manual_seed(2)
    model = aio.AllInOne(aio.Config(**AIO_TINY, time_init=0.0)).eval()  # main() zeroes it after --init_video
    sd = timm_vit(32, 2, img=64, patch=16, classes=10, distilled=distilled)  # pos_embed resampled 4x4 -> 2x2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_into(model, sd, **aio.VIT_INIT)
    assert list(report.reshaped) == ["transformer.pos_embed"]
    assert params_untouched(model, before, report) == []
    assert all(not k.startswith("transformer.") or k == "transformer.temporal_embed" for k in report.new)
    plain = {k: v for k, v in sd.items() if k != "dist_token"}
    plain["pos_embed"] = resize_pos_embed(sd["pos_embed"], 5)
    img = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.forward_frames(img[:, None])[:, 0]  # (B, 1 + N, D), temporal_embed row 0 is zero
        expected = plain_vit(plain, img, heads=2, patch=16, extra=model.token_type_embeddings.weight[1])
        assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("pretraining", [False, True])
def test_bert_embeddings_into_all_in_one(pretraining):
    model = aio.AllInOne(aio.Config(**AIO_TINY)).eval()
    sd = hf_bert(32, 2, vocab=50, positions=40, pretraining=pretraining)
    report = load_into(model, sd, **aio.BERT_INIT)
    assert len(report.loaded) == 5 and list(report.reshaped) == ["text_embeddings.position_embeddings.weight"]
    p = "bert." if pretraining else ""
    ln = ("gamma", "beta") if pretraining else ("weight", "bias")
    ids = torch.tensor([[2, 7, 9, 3]])
    x = (sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][:4]
         + sd[p + "embeddings.token_type_embeddings.weight"][0])
    x = F.layer_norm(x, (32,), sd[p + f"embeddings.LayerNorm.{ln[0]}"], sd[p + f"embeddings.LayerNorm.{ln[1]}"], 1e-12)
    with torch.no_grad():
        assert torch.allclose(model.text_embeddings(ids), x, atol=1e-6)


def release_all_in_one_state(model):
    """Our All-in-one's tensors under the release's names (AllinoneTransformerSS): heads.py's Pooler / ITMHead /
    MLMHead, timm's Mlp, BertEmbeddings' position_ids, the MC ranking copy of the ITM match row."""
    names = {"pooler.": "pooler.dense.", "itm_score.": "itm_score.fc.",
             "mlm_transform.0.": "mlm_score.transform.dense.", "mlm_transform.2.": "mlm_score.transform.LayerNorm.",
             "mlm_decoder.weight": "mlm_score.decoder.weight", "mlm_decoder.bias": "mlm_score.bias",
             ".mlp.0.": ".mlp.fc1.", ".mlp.3.": ".mlp.fc2.", "heads.": ""}
    state = {}
    for k, v in model.state_dict().items():
        for ours, theirs in names.items():
            k = k.replace(ours, theirs)
        state[k] = v
    state["text_embeddings.position_ids"] = torch.arange(12)[None]
    state["rank_output.weight"] = state["itm_score.fc.weight"][1:]
    state["rank_output.bias"] = state["itm_score.fc.bias"][1:]
    return state


def test_all_in_one_release_checkpoint_maps_every_key(tmp_path):
    src = aio.AllInOne(aio.Config(**AIO_TINY))
    src.add_task_head("mc")
    state = release_all_in_one_state(src)
    assert {"mlm_score.bias", "pooler.dense.weight", "itm_score.fc.weight", "mc_vqa_classifier.1.weight",
            "transformer.blocks.1.mlp.fc2.bias"} <= state.keys()
    torch.save({"state_dict": state, "hyper_parameters": {"config": {"hidden_size": 32}}, "epoch": 9},
               tmp_path / "release.ckpt")
    torch.manual_seed(9)
    model = aio.AllInOne(aio.Config(**AIO_TINY))
    model.add_task_head("mc")
    report = load_into(model, read_state_dict(str(tmp_path / "release.ckpt")), **aio.FULL_MODEL)
    assert report.new == [] and sorted(report.dropped) == ["rank_output.bias", "rank_output.weight",
                                                           "text_embeddings.position_ids"]
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.state_dict().items())
    # a model without the MC head drops the release's head on purpose and says so
    report = load_into(aio.AllInOne(aio.Config(**AIO_TINY)), state, **aio.FULL_MODEL)
    assert "mc_vqa_classifier.1.weight" in report.dropped


def test_all_in_one_eval_from_a_release_checkpoint_end_to_end(tiny_corpus, tmp_path):
    """--init=<Lightning .ckpt> with the release's names: read safely, every key mapped, then evaluated."""
    from common.text import Tokenizer
    vocab = Tokenizer(str(tiny_corpus / "vocab.txt")).vocab_size
    cfg = aio.Config(**{**aio.PRESETS["tiny"], "img_size": 32, "vocab_size": vocab})
    src = aio.AllInOne(cfg)
    torch.save({"state_dict": release_all_in_one_state(src), "hyper_parameters": {"config": argparse.Namespace()}},
               tmp_path / "release.ckpt")
    m = aio.main(["--tiny", f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'ev'}", "--img_size=32",
                  "--eval=retrieval", f"--init={tmp_path / 'release.ckpt'}", "--max_eval_items=8"])
    assert 0.0 <= m["retrieval/t2v_R@1"] <= 100.0


def write_safetensors(path, tensors):
    """The safetensors layout, byte by byte (f32 only): what a hub's model.safetensors holds."""
    header, blobs, offset = {}, [], 0
    for k, t in tensors.items():
        raw = t.float().contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_egovlp_main_starts_from_timm_vit_and_hf_distilbert_files(tiny_corpus, tmp_path):
    """--init_video=<timm .pth> --init_text=<HF .safetensors> through main, then an evaluation."""
    from common.text import Tokenizer
    vocab = Tokenizer(str(tiny_corpus / "vocab.txt")).vocab_size
    torch.save(timm_vit(32, 2, img=224, patch=16), tmp_path / "vit.pth")  # pos_embed resampled 14x14 -> 2x2
    write_safetensors(tmp_path / "distilbert.safetensors", hf_distilbert(32, 1, vocab=vocab, positions=512, ffn=64))
    tiny = dict(img_size=32, patch_size=16, vit_width=32, vit_depth=2, vit_heads=2, text_width=32, text_layers=1,
                text_heads=2, text_ffn=64, embed_dim=16)
    m = egovlp.main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'ev'}", "--eval=egomcq",
                     "--num_workers=0", "--eval_batch_size=16", "--max_eval_items=4",
                     f"--init_video={tmp_path / 'vit.pth'}", f"--init_text={tmp_path / 'distilbert.safetensors'}"]
                    + [f"--{k}={v}" for k, v in tiny.items()])
    assert 0 <= m["egomcq/inter_acc"] <= 100


def test_oa_trans_main_evaluates_a_frozen_layout_release_file(tiny_corpus, tmp_path):
    """Frozen's file layout through main: a ConfigParser-like object beside the weights, "module.", vid_proj.0,
    a 1-frame temporal embedding zero-padded to the 2 frames asked for."""
    from common.text import Tokenizer
    vocab = Tokenizer(str(tiny_corpus / "vocab.txt")).vocab_size
    flags = dict(img_size=32, patch_size=8, vit_width=32, vit_depth=1, vit_heads=2, text_width=32, text_layers=1,
                 text_heads=2)
    src = oa.OATrans(oa.Config(**flags, num_frames=1), vocab)
    state = {"module." + k.replace("vid_proj.", "vid_proj.0."): v for k, v in src.state_dict().items()}
    torch.save({"arch": "FrozenInTime", "epoch": 3, "state_dict": state, "config": argparse.Namespace(n=1)},
               tmp_path / "frozen.pth.tar")
    m = oa.main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'ev'}", "--eval=retrieval",
                 f"--init={tmp_path / 'frozen.pth.tar'}", "--num_frames=2", "--num_workers=0", "--precision=fp32",
                 "--eval_batch_size=8"] + [f"--{k}={v}" for k, v in flags.items()])
    assert 0 <= m["retrieval/t2v_R@1"] <= 100


def test_all_in_one_release_b_checkpoint_key_set_on_the_meta_device():
    """All-in-one-B as released (AllinoneTransformerSS built with VTC off, the ViT without temporal_embed):
    BertEmbeddings + modality table + timm ViT-B/16 without head + Pooler + ITMHead + MLMHead = 167 tensors,
    written here from the release's module names. All map: 166 loaded, position_ids dropped, and the model's
    temporal_embed and VTC projections reported new (5)."""
    D, V = 768, 30522
    m = lambda *s: torch.empty(s, device="meta")
    sd = {"text_embeddings.word_embeddings.weight": m(V, D), "text_embeddings.position_embeddings.weight": m(40, D),
          "text_embeddings.token_type_embeddings.weight": m(2, D), "text_embeddings.LayerNorm.weight": m(D),
          "text_embeddings.LayerNorm.bias": m(D), "text_embeddings.position_ids": torch.arange(40)[None],
          "token_type_embeddings.weight": m(2, D),
          "pooler.dense.weight": m(D, D), "pooler.dense.bias": m(D), "itm_score.fc.weight": m(2, D),
          "itm_score.fc.bias": m(2), "mlm_score.transform.dense.weight": m(D, D),
          "mlm_score.transform.dense.bias": m(D),
          "mlm_score.transform.LayerNorm.weight": m(D), "mlm_score.transform.LayerNorm.bias": m(D),
          "mlm_score.decoder.weight": m(V, D), "mlm_score.bias": m(V)}
    sd.update({"transformer." + k: v for k, v in timm_vit(D, 12, device="meta").items() if not k.startswith("head.")})
    assert len(sd) == 167
    with torch.device("meta"):
        model = aio.AllInOne(aio.Config(**aio.PRESETS["B"]))
    report = load_into(model, sd, **aio.FULL_MODEL)
    assert len(report.loaded) == 166 and report.dropped == ["text_embeddings.position_ids"]
    assert sorted(report.new) == ["transformer.temporal_embed", "txt_proj.bias", "txt_proj.weight", "vid_proj.bias",
                                  "vid_proj.weight"]


def frozen_release_state(frames, D=768, depth=12, device="meta"):
    """The Frozen-in-Time / EgoVLP release layout, written from its namespaces (shared/papers/egovlp.md §1.5):
    module.video_model.* (timm names, no head, + temporal_embed, norm3, timeattn), module.text_model.* (HF
    DistilBertModel, with position_ids), module.txt_proj.1, module.vid_proj.0."""
    m = lambda *s: torch.empty(s, device=device)
    video = {k: v for k, v in timm_vit(D, depth, device=device).items() if not k.startswith("head.")}
    video["temporal_embed"] = m(1, frames, D)
    for i in range(depth):
        b = f"blocks.{i}."
        video.update({b + "norm3.weight": m(D), b + "norm3.bias": m(D), b + "timeattn.qkv.weight": m(3 * D, D),
                      b + "timeattn.qkv.bias": m(3 * D), b + "timeattn.proj.weight": m(D, D),
                      b + "timeattn.proj.bias": m(D)})
    text = hf_distilbert(D, 6, device=device)
    text["embeddings.position_ids"] = torch.arange(512)[None]
    state = {**{"video_model." + k: v for k, v in video.items()}, **{"text_model." + k: v for k, v in text.items()},
             "txt_proj.1.weight": m(256, D), "txt_proj.1.bias": m(256), "vid_proj.0.weight": m(256, D),
             "vid_proj.0.bias": m(256)}
    return {"module." + k: v for k, v in state.items()}


@pytest.mark.parametrize("paper", ["egovlp", "oa_trans"])
def test_frozen_layout_release_full_size_on_the_meta_device(paper):
    """EgoVLP_PT_BEST (16 temporal rows) into egovlp --paper, Frozen's 4-frame release into oa_trans --paper:
    all 327 parameters loaded, position_ids dropped, nothing new."""
    state = find_state_dict({"state_dict": frozen_release_state(16 if paper == "egovlp" else 4)})
    with torch.device("meta"):
        model = (egovlp.FrozenInTime(egovlp.Config(**egovlp.PRESETS["paper"]), 30522) if paper == "egovlp"
                 else oa.OATrans(oa.Config(**oa.PRESETS["paper"]), 30522))
    report = load_into(model, state, **(egovlp.FULL_MODEL if paper == "egovlp" else oa.FULL_MODEL))
    assert len(report.loaded) == len(model.state_dict()) == 327 and report.new == []
    assert report.dropped == ["text_model.embeddings.position_ids"]
    assert list(report.reshaped) == (["video_model.temporal_embed"] if paper == "egovlp" else [])


def test_all_in_one_main_starts_the_time_code_at_zero_from_image_weights(tiny_corpus, tmp_path):
    """Departure 10: from scratch the temporal embedding starts at std time_init; from timm weights (--init_video)
    at zero, as released. lr=0 keeps the initial values in the checkpoint."""
    torch.save(timm_vit(32, 2, img=224, patch=16), tmp_path / "vit.pth")
    common = ["--tiny", f"--data_root={tiny_corpus}", "--img_size=32", "--max_steps=1", "--lr=0", "--eval_every=10"]
    for name, extra in (("scratch", []), ("timm", [f"--init_video={tmp_path / 'vit.pth'}"])):
        aio.main(common + [f"--out_dir={tmp_path / name}"] + extra)
    code = {n: torch.load(tmp_path / n / "ckpt.pt", weights_only=False)["model"]["transformer.temporal_embed"]
            for n in ("scratch", "timm")}
    assert code["scratch"].std().item() > 0.5 and code["timm"].abs().max().item() == 0
