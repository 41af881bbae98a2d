"""Tests for oa_trans.py: the object-aware pieces against naive references, the losses, the detection reader,
the parameter count of the paper model, and a tiny end-to-end run with --resume.

    cd /work/main && python -m pytest -q tests/test_oa_trans.py
"""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import oa_trans as oa
from common.video import VideoTransform
from common.weights import fit_temporal_embed


def tiny_cfg(**kw):
    base = dict(img_size=32, patch_size=8, vit_width=32, vit_depth=2, vit_heads=2, text_width=32, text_layers=1,
                text_heads=2, text_positions=48, embed_dim=16, num_frames=3,
                text_dropout=0.0)  # no dropout: tests compare forward passes in train mode
    base.update(kw)
    return oa.Config(**base)


# ----------------------------------------------------------------------------- model size

def test_paper_parameter_count_on_meta_device():
    """ViT-B/16 divided space-time (4 frames) + DistilBERT + two 768->256 heads = 180,925,184 (note section 1.4)."""
    cfg = oa.parse_config(oa.Config, ["--paper"], oa.PRESETS)
    with torch.device("meta"):
        model = oa.OATrans(cfg, cfg.vocab_size)
    assert sum(p.numel() for p in model.parameters()) == 180_925_184
    assert sum(p.numel() for p in model.video_model.parameters()) == 114_168_576
    assert sum(p.numel() for p in model.text_model.parameters()) == 66_362_880


def test_default_augmentation_is_label_preserving_and_paper_is_the_release():
    """The synthetic captions say "to the left / right" and name colours: the CPU default must not flip, jitter
    or gray a clip (an asymmetric clip comes out unmirrored for every draw). --paper restores the release's
    Resize(242) -> RandomCrop(224), ColorJitter(0.5, 0.5, 0.5, 0.1) at p 0.8, RandomGrayscale(0.3), no flip."""
    cfg = tiny_cfg()
    t = oa.clip_transform(cfg, True)
    assert not t.flip and t.jitter is None and t.grayscale_p == 0
    frames = np.zeros((1, 32, 32, 3), np.uint8)
    frames[:, :, :16, 0] = 255  # red on the left half
    rng = random.Random(0)
    for _ in range(30):
        video, _ = t(frames, rng=rng)
        left, right = video[0, 0, :, :8].mean(), video[0, 0, :, -8:].mean()
        assert left > right  # never mirrored
    paper = oa.parse_config(oa.Config, ["--paper"], oa.PRESETS)
    t = oa.clip_transform(paper, True)
    assert (t.crop, t.flip, t.jitter, t.jitter_p, t.grayscale_p) == ("resize_random", False, (0.5, 0.5, 0.5, 0.1),
                                                                      0.8, 0.3)
    assert t.resize_ratio * 224 == pytest.approx(242)
    ft = oa.parse_config(oa.Config, ["--paper", "--paper_ft"], oa.PRESETS)
    t = oa.clip_transform(ft, True)
    assert (t.jitter, t.grayscale_p) == ((0.4, 0.4, 0.4, 0.1), 0.2) and t.resize_ratio * 224 == pytest.approx(238)


def test_objects_off_is_the_two_stream_model():
    """objects=on and objects=off build the same parameters, and the same weights give the same V/T embeddings;
    with objects off the loss is exactly L(t, v)."""
    torch.manual_seed(0)
    on = oa.OATrans(tiny_cfg(objects="on"), 50)
    torch.manual_seed(0)
    off = oa.OATrans(tiny_cfg(objects="off"), 50)
    s_on, s_off = on.state_dict(), off.state_dict()
    assert s_on.keys() == s_off.keys()
    assert all(torch.equal(s_on[k], s_off[k]) for k in s_on)
    video = torch.randn(2, 5, 3, 32, 32)  # 5 frames through 3 temporal rows: both give frames 4-5 zeros
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    e_on, e_off = on(video, (ids, mask)), off(video, (ids, mask))
    assert e_off.keys() == {"video", "text"}
    assert torch.equal(e_on["video"], e_off["video"]) and torch.equal(e_on["text"], e_off["text"])
    loss, parts = oa.oa_trans_loss(e_off, oa.LOSS_TERMS["paper"], dict(main_weight=1, tags_weight=1, regions_weight=1), 0.05)
    assert list(parts) == ["text-video"]
    assert torch.allclose(loss.double(), naive_nce(e_off["text"], e_off["video"], 0.05), atol=1e-4)


# ----------------------------------------------------------------------------- video encoder

def test_divided_attention_matches_naive_loops():
    """Space / time attention with the CLS prepended, and the CLS attending to all tokens, checked token by token."""
    torch.manual_seed(0)
    B, T, N, D, H = 2, 3, 4, 8, 2
    attn = oa.DividedAttention(D, H)
    x = torch.randn(B, 1 + T * N, D)

    def attend(q, k, v):  # q (D,), k/v (M, D), per head
        out = []
        for h in range(H):
            s = slice(h * D // H, (h + 1) * D // H)
            w = torch.softmax(k[:, s] @ q[s] / math.sqrt(D // H), dim=0)
            out.append(w @ v[:, s])
        return torch.cat(out)

    q, k, v = attn.qkv(x).split(D, dim=-1)
    for axis in ("space", "time"):
        expected = torch.zeros(B, 1 + T * N, D)
        for b in range(B):
            expected[b, 0] = attend(q[b, 0], k[b], v[b])
            for t in range(T):
                for n in range(N):
                    i = 1 + t * N + n
                    group = [1 + t * N + m for m in range(N)] if axis == "space" else [1 + f * N + n for f in range(T)]
                    keys = [0] + group
                    expected[b, i] = attend(q[b, i], k[b, keys], v[b, keys])
        assert torch.allclose(attn(x, axis, T, N), attn.proj(expected), atol=1e-5), axis


def test_time_attention_starts_as_identity_and_temporal_embed_inflates():
    """Frozen's init: TimeAttn outputs 0, so a fresh model embeds each frame like an image ViT; a 1-frame
    checkpoint loads into a 3-frame model with zero-padded temporal rows."""
    torch.manual_seed(0)
    enc = oa.VideoEncoder(32, 8, 3, 32, 2, 2, 4.0).init_weights()
    x = torch.randn(5, 1 + 3 * 16, 32)
    assert torch.count_nonzero(enc.blocks[0].timeattn(x, "time", 3, 16)) == 0
    te = torch.randn(1, 1, 32)
    grown = fit_temporal_embed(te, 3)
    assert grown.shape == (1, 3, 32)
    assert torch.equal(grown[:, :1], te) and not grown[:, 1:].any()


def test_frozen_time_init_starves_the_temporal_branch_and_live_init_does_not():
    """With Frozen's init (qkv 0, out-proj weight 1) every output channel of TimeAttn is the same sum, LN1 removes
    it and qkv gets no gradient; with time_init=live (out-proj ~ N(0, 0.02)) it does. Both start as a no-op."""
    grads = {}
    for init in ("release", "live"):
        torch.manual_seed(0)
        enc = oa.VideoEncoder(32, 8, 3, 32, 2, 2, 4.0).init_weights(init)
        x = torch.randn(4, 1 + 3 * 16, 32)
        assert torch.count_nonzero(enc.blocks[0].timeattn(x, "time", 3, 16)) == 0
        enc(torch.randn(4, 3, 3, 32, 32))[:, 0].pow(2).sum().backward()
        grads[init] = max(blk.timeattn.qkv.weight.grad.abs().max().item() for blk in enc.blocks)
    assert grads["release"] < 1e-7 and grads["live"] > 1e-5, grads  # measured: ~1e-9 vs ~1e-3


def test_encoders_stay_in_step_with_egovlp_copies():
    """oa_trans.py and egovlp.py each carry a copy of Frozen's space-time ViT and of DistilBERT. The copies must
    not drift: the same config vocabulary builds both, egovlp's weights load into oa_trans's modules key for key,
    and the outputs agree -- in eval mode, and in train mode with the same dropout draws (same seed)."""
    import egovlp
    shared = dict(img_size=32, patch_size=8, num_frames=3, vit_width=32, vit_depth=2, vit_heads=2, vit_mlp_ratio=2.0,
                  text_width=32, text_layers=2, text_heads=2, text_ffn=48, text_positions=16, text_dropout=0.1,
                  time_init="release")
    ego_cfg, oa_cfg = egovlp.Config(**shared), tiny_cfg(**shared)
    torch.manual_seed(0)
    ego = egovlp.FrozenInTime(ego_cfg, 50).init_weights("live")
    oa_model = oa.OATrans(oa_cfg, 50)
    for name in ("video_model", "text_model"):
        ours, theirs = getattr(oa_model, name).state_dict(), getattr(ego, name).state_dict()
        assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours), name
        getattr(oa_model, name).load_state_dict(theirs)
    video = torch.randn(2, 5, 3, 32, 32)  # 5 frames through 3 temporal rows: both give frames 4-5 zeros
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    for train in (False, True):
        ego.train(train), oa_model.train(train)
        assert torch.allclose(oa_model.video_model(video), ego.video_model(video), atol=1e-5)
        torch.manual_seed(1)
        a = oa_model.text_model(ids, mask)
        torch.manual_seed(1)
        b = ego.text_model(ids, mask)
        assert torch.allclose(a, b, atol=1e-5), train
    ego.train(), oa_model.train()
    torch.manual_seed(2)
    a = oa_model.text_model(ids, mask)
    assert not torch.allclose(a, oa_model.text_model(ids, mask))  # dropout is active in training
    for name in ("release", "live"):  # the same time_init values build the same temporal-attention start
        assert egovlp.Config(time_init=name).time_init == oa.Config(time_init=name).time_init
        torch.manual_seed(0)
        e = egovlp.VideoEncoder(32, 8, 3, 32, 1, 2, 4.0).init_weights(name)
        o = oa.VideoEncoder(32, 8, 3, 32, 1, 2, 4.0).init_weights(name)
        assert torch.equal(e.blocks[0].timeattn.proj.weight == 1, o.blocks[0].timeattn.proj.weight == 1)
    shared_fields = {f for f in egovlp.Config.__dataclass_fields__} & {f for f in oa.Config.__dataclass_fields__}
    assert set(shared) <= shared_fields
    assert {"eval_every", "log_every", "schedule", "img_size"} <= shared_fields


def test_text_pooling_cls_or_mean_over_real_tokens():
    """text_pool=cls takes position 0; text_pool=mean averages the non-padding positions only."""
    ids = torch.randint(5, 50, (3, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    for pool in ("cls", "mean"):
        torch.manual_seed(0)
        model = oa.OATrans(tiny_cfg(text_pool=pool), 50).eval()  # eval: no dropout between the two calls
        hidden = model.text_model(ids, mask)
        if pool == "cls":
            expected = hidden[:, 0]
        else:
            expected = torch.stack([hidden[b, :int(mask[b].sum())].mean(0) for b in range(3)])
        assert torch.allclose(model.encode_text(ids, mask), model.txt_proj(expected), atol=1e-5), pool


# ----------------------------------------------------------------------------- anchor frame and masks

def test_detection_frames_and_anchor_selection():
    # 24 frames, 8 segments of 3: midpoints (a + b) // 2
    assert oa.detection_frames(24, 8) == [1, 4, 7, 10, 13, 16, 19, 22]
    # 10 frames: bounds int(linspace(0, 10, 9)) = 0 1 2 3 5 6 7 8 10
    assert oa.detection_frames(10, 8) == [0, 1, 2, 4, 5, 6, 7, 9]
    det = [1, 4, 7, 10, 13, 16, 19, 22]
    assert oa.anchor_position([0, 6, 12, 18], det) == 3  # mean 9 -> frame 10
    assert oa.anchor_position([2, 20], det) == 3  # mean 11 -> frame 10 (|10-11| = 1 < |13-11| = 2)
    assert oa.anchor_position([7, 10], det) == 2  # mean 8.5: tie between 7 and 10 -> the first
    assert oa.anchor_position([23], det) == 7
    assert oa.anchor_position([0, 0, 1, 1], det) == 0


def naive_patch_mask(boxes, img_size, p):
    """Patch (r, c) is kept iff some box overlaps the patch square with positive area (boxes clipped)."""
    g = img_size // p
    out = torch.zeros(len(boxes), g * g, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        x1, x2 = min(max(x1, 0), img_size), min(max(x2, 0), img_size)
        y1, y2 = min(max(y1, 0), img_size), min(max(y2, 0), img_size)
        for r in range(g):
            for c in range(g):
                ix = min(x2, (c + 1) * p) - max(x1, c * p)
                iy = min(y2, (r + 1) * p) - max(y1, r * p)
                out[k, r * g + c] = ix > 0 and iy > 0
    return out


def test_box_to_patch_mask_matches_naive_reference():
    rng = np.random.default_rng(0)
    boxes = [[0, 0, 8, 8],  # exactly one patch, on the border
             [0, 0, 64, 64],  # the whole image
             [60.5, 61, 64, 64],  # bottom-right corner, less than a patch
             [-10, 20, 5, 30],  # sticking out on the left
             [70, 5, 90, 20],  # fully outside
             [16, 16, 16, 40],  # zero width
             [8, 8, 16.01, 16]]  # a hair into the next column
    for _ in range(200):
        x1, y1 = rng.uniform(-10, 70, 2)
        w, h = rng.uniform(0, 40, 2)
        boxes.append([x1, y1, x1 + w, y1 + h])
    got = oa.boxes_to_patch_mask(np.array(boxes, np.float32), 64, 8)
    assert torch.equal(got, naive_patch_mask(np.array(boxes, np.float32).tolist(), 64, 8))
    assert got[0].nonzero().flatten().tolist() == [0]
    assert got[6].view(8, 8)[1].nonzero().flatten().tolist() == [1, 2]


def test_boxes_follow_the_crop_and_flip():
    """A white rectangle drawn where the box is: after the random crop / flip of training, the box goes where
    the pixels went, and the patches of its mask are exactly the patches that hold white pixels."""
    H = W = 64
    frames = np.zeros((2, H, W, 3), np.uint8)
    box = np.array([[20, 12, 44, 28]], np.float32)  # x1, y1, x2, y2
    frames[:, 12:28, 20:44] = 255
    tf = VideoTransform(32, train=True, scale=(0.3, 0.6), mean=(0, 0, 0), std=(1, 1, 1))
    checked = 0
    for seed in range(40):
        video, out = tf(frames, box, rng=random.Random(seed))
        white = video[0].mean(0) > 0.5  # (32, 32) pixels that are clearly box pixels
        if not white.any():
            continue
        ys, xs = white.nonzero(as_tuple=True)
        x1, y1, x2, y2 = out[0]
        assert abs(xs.min().item() - x1) <= 1.5 and abs(xs.max().item() + 1 - x2) <= 1.5, (seed, out)
        assert abs(ys.min().item() - y1) <= 1.5 and abs(ys.max().item() + 1 - y2) <= 1.5, (seed, out)
        mask = oa.boxes_to_patch_mask(out, 32, 8)[0].view(4, 4)
        bright = (video[0].mean(0) > 0.02).view(4, 8, 4, 8).any(3).any(1)  # patches holding any white
        core = white.view(4, 8, 4, 8).float().mean((1, 3)) > 0.5  # patches mostly white
        assert (core <= mask).all() and (mask <= bright).all(), seed
        checked += 1
    assert checked > 20


def test_region_embedding_ignores_everything_outside_the_boxes():
    """Object-guided masking: pixels outside the kept patches cannot change the region embedding, and the
    embedding equals the mean of the kept patch tokens of the blanked anchor, projected (naive recomputation)."""
    torch.manual_seed(0)
    model = oa.OATrans(tiny_cfg(), 50).eval()
    anchor = torch.randn(2, 3, 32, 32)
    regions = torch.zeros(2, 1, 16, dtype=torch.bool)
    regions[0, 0, [0, 1, 5]] = True
    regions[1, 0, [10, 15]] = True
    out = model.encode_regions(anchor, regions)
    noisy = anchor.clone()
    for b in range(2):
        for n in range(16):
            if not regions[b, 0, n]:
                r, c = divmod(n, 4)
                noisy[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = torch.randn(3, 8, 8) * 5
    assert torch.allclose(model.encode_regions(noisy, regions), out, atol=1e-5)
    black = -torch.tensor(oa.IMAGENET_MEAN) / torch.tensor(oa.IMAGENET_STD)
    for b in range(2):
        img = torch.empty(3, 32, 32)
        for n in range(16):
            r, c = divmod(n, 4)
            patch = anchor[b, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] if regions[b, 0, n] else black.view(3, 1, 1).expand(3, 8, 8)
            img[:, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = patch
        tokens = model.video_model(img[None, None])[0, 1:]  # (N, D)
        expected = model.vid_proj(tokens[regions[b, 0]].mean(0))
        assert torch.allclose(out[b], expected, atol=1e-5)


def test_release_pooling_is_mean_over_groups_of_group_means():
    torch.manual_seed(0)
    model = oa.OATrans(tiny_cfg(), 50).eval()
    hidden = torch.randn(1, 6, 32)
    groups = torch.zeros(1, 3, 6, dtype=torch.bool)
    groups[0, 0, [1, 2]] = True
    groups[0, 1, [4]] = True  # group 2 empty (padding): ignored
    got = model.pool_tags(hidden, groups)
    expected = (model.txt_proj(hidden[0, [1, 2]].mean(0)) + model.txt_proj(hidden[0, 4])) / 2
    assert torch.allclose(got[0], expected, atol=1e-6)


class FakeTokenizer:
    """Whitespace tokenizer with a growing vocab, ## pieces for words longer than 5 letters."""
    cls_id, sep_id, pad_id, unk_id = 1, 2, 0, 3

    def __init__(self):
        self.vocab = {}

    def tokenize(self, text):
        out = []
        for w in text.split():
            out += [w[:5]] + (["##" + w[5:]] if len(w) > 5 else [])
        for t in out:
            self.vocab.setdefault(t, 10 + len(self.vocab))
        return out


def test_tag_tokens_groups_exclude_the_distractor():
    tok = FakeTokenizer()
    ids, groups = oa.tag_tokens(tok, ["square", "circle", "sky"], 32, distractor="pebbles", rng=random.Random(1))
    inv = {v: k for k, v in tok.vocab.items()}
    words = ["".join(inv[ids[p]].replace("##", "") for p in g) for g in groups]
    assert words == ["square", "circle", "sky"]
    pooled = {p for g in groups for p in g}
    pebble = [p for p, i in enumerate(ids) if i in (tok.vocab["pebbl"], tok.vocab["##es"])]
    assert len(pebble) == 2 and not pooled & set(pebble)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) == 1 + 2 + 2 + 1 + 2 + 1
    # release variant: the caption comes first, the groups point after it
    ids, groups = oa.tag_tokens(tok, ["sky"], 32, caption="a red ball")
    assert groups == [[4]] and ids[1:4] == [tok.vocab[w] for w in ("a", "red", "ball")]
    # truncation keeps [SEP] last and drops groups that fall off
    ids, groups = oa.tag_tokens(tok, ["square", "circle", "sky"], 4)
    assert len(ids) == 4 and ids[-1] == tok.sep_id and groups == [[1, 2]]


# ----------------------------------------------------------------------------- losses

def naive_nce(a, b, tau):
    a, b = a.detach().double(), b.detach().double()
    S = [[float(F.cosine_similarity(a[i], b[j], dim=0)) / tau for j in range(len(b))] for i in range(len(a))]
    n = len(a)
    rows = -sum(S[i][i] - math.log(sum(math.exp(S[i][j]) for j in range(n))) for i in range(n)) / n
    cols = -sum(S[j][j] - math.log(sum(math.exp(S[i][j]) for i in range(n))) for j in range(n)) / n
    return torch.tensor(rows + cols, dtype=torch.float64)


def test_nce_loss_matches_naive_and_is_small_for_identity():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    got = oa.nce_loss(oa.cosine_sim(a, b), 0.05)
    assert torch.allclose(got.double(), naive_nce(a, b, 0.05), atol=1e-4)
    eye = torch.eye(6, 8)
    assert oa.nce_loss(oa.cosine_sim(eye, eye), 0.05) < 1e-6


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_object_aware_loss_terms_match_naive(variant):
    torch.manual_seed(1)
    emb = {k: torch.randn(5, 4) for k in ("video", "text", "regions", "tags", "caption_tags")}
    w = dict(main_weight=1.0, tags_weight=0.5, regions_weight=2.0)
    loss, parts = oa.oa_trans_loss(emb, oa.LOSS_TERMS[variant], w, 0.05)
    if variant == "paper":  # L(t, v) + L(tags, v) + L(t, regions): tags and regions contrast the OTHER modality
        pairs = [("text", "video", 1.0), ("tags", "video", 0.5), ("text", "regions", 2.0)]
    else:  # L(t, v) + L(caption+tags, v) + L(mean region, mean tag)
        pairs = [("text", "video", 1.0), ("caption_tags", "video", 0.5), ("regions", "tags", 2.0)]
    expected = sum(wt * naive_nce(emb[a], emb[b], 0.05) for a, b, wt in pairs)
    assert len(parts) == 3
    assert torch.allclose(loss.double(), expected, atol=1e-4)


# ----------------------------------------------------------------------------- detections

def test_detection_reader_top_level_arrays_and_pickle_guard(tmp_path):
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 2, 3, 4]], np.float32)
    safe = tmp_path / "safe.npz"
    np.savez(safe, bbox=boxes, objects_id=np.array([4, 7, 1]), objects_conf=np.array([0.2, 0.9, 0.5], np.float32),
             image_h=np.int64(48), image_w=np.int64(64), num_bbox=np.int64(3))
    det = oa.read_detections(safe)
    assert det["image_h"] == 48 and det["image_w"] == 64 and det["labels"].tolist() == [4, 7, 1]
    top, labels = oa.top_k_detections(det, 2)
    assert labels.tolist() == [7, 1] and np.array_equal(top, boxes[[1, 2]])

    pickled = tmp_path / "release.npz"  # the release's layout: class ids only inside a pickled dict
    info = {"objects_id": np.array([4, 7, 1]), "objects_conf": np.array([0.2, 0.9, 0.5]), "image_h": 48, "image_w": 64}
    np.savez(pickled, x=np.zeros((3, 2048), np.float32), bbox=boxes, num_bbox=3, image_h=48, image_w=64,
             info=np.array(info, dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        oa.read_detections(pickled)
    assert oa.read_detections(pickled, allow_pickle=True)["labels"].tolist() == [4, 7, 1]


# ----------------------------------------------------------------------------- end to end

def test_main_pretrain_resume_finetune(tiny_corpus, tmp_path):
    out = str(tmp_path / "run")
    common = [f"--data_root={tiny_corpus}", f"--out_dir={out}", "--img_size=32", "--patch_size=8", "--vit_width=32",
              "--vit_depth=1", "--vit_heads=2", "--text_width=32", "--text_layers=1", "--text_heads=2",
              "--batch_size=4", "--num_frames=2", "--eval_every=2", "--log_every=1", "--num_workers=0",
              "--precision=fp32", "--eval_batch_size=8"]
    m = oa.main(common + ["--max_steps=2"])
    assert {"retrieval/t2v_R@1", "retrieval/t2v_R@5", "retrieval/t2v_MdR", "retrieval_small/t2v_R@1"} <= m.keys()
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 2
    before = {k: v.clone() for k, v in ckpt["model"].items()}
    oa.main(common + ["--max_steps=4", "--resume"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 4
    assert any(not torch.equal(before[k], ckpt["model"][k]) for k in before)  # it trained on from the checkpoint
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl")) if "loss" in line]
    assert steps == [1, 2, 3, 4]  # the resumed run continued the step counter
    assert os.path.exists(os.path.join(out, "metrics.json"))
    ft = oa.main(common + ["--max_steps=1", "--finetune=retrieval", f"--init={out}/ckpt.pt",
                           f"--out_dir={tmp_path / 'ft'}"])
    assert 0 <= ft["retrieval/v2t_R@1"] <= 100


def test_resume_continues_the_data_order_of_a_checkpoint_from_before_its_rename(tiny_corpus, tmp_path):
    """A checkpoint keeps the order of the training batches (frames, seed, batches drawn) as "data_order"; one
    written before that name holds it as "stream". --resume continues the order either way: the same batches, the
    same losses (a checkpoint read without its order would start a new one, seeded by the step)."""
    import shutil
    flags = [f"--data_root={tiny_corpus}", "--img_size=32", "--patch_size=8", "--vit_width=32", "--vit_depth=1",
             "--vit_heads=2", "--text_width=32", "--text_layers=1", "--text_heads=2", "--batch_size=4",
             "--num_frames=2", "--curriculum=none", "--eval_every=2", "--log_every=1", "--num_workers=0",
             "--precision=fp32", "--eval_batch_size=8"]
    new, old = tmp_path / "new", tmp_path / "old"
    oa.main(flags + [f"--out_dir={new}", "--max_steps=2"])
    ck = torch.load(new / "ckpt.pt", weights_only=True)
    assert ck["data_order"] == {"frames": 2, "seed": 0, "drawn": 2} and "stream" not in ck
    shutil.copytree(new, old)
    ck["stream"] = ck.pop("data_order")  # the checkpoint as the code before the rename wrote it
    torch.save(ck, old / "ckpt.pt")
    for out in (new, old):
        oa.main(flags + [f"--out_dir={out}", "--max_steps=4", "--resume"])
    losses = {out: [json.loads(line)["loss"] for line in open(out / "log.jsonl") if '"loss"' in line]
              for out in (new, old)}
    assert len(losses[new]) == 4 and losses[old] == losses[new]
    assert torch.load(old / "ckpt.pt", weights_only=True)["data_order"]["drawn"] == 4  # written under the new name


# ----------------------------------------------------------------------------- 2-process gloo

def _oa_inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.rand(B, 1, 16, generator=g) > 0.5
    regions[:, 0, 0] = True
    tag_groups = torch.zeros(B, 1, 6, dtype=torch.bool)
    tag_groups[:, 0, 1:4] = True
    return dict(video=torch.randn(B, 2, 3, 32, 32, generator=g),
                text=(torch.randint(5, 50, (B, 7), generator=g), torch.ones(B, 7, dtype=torch.long)),
                anchor=torch.randn(B, 3, 32, 32, generator=g), regions=regions,
                tags=(torch.randint(5, 50, (B, 6), generator=g), torch.ones(B, 6, dtype=torch.long)),
                tag_groups=tag_groups)


def _oa_loss_step(model, inputs, gather):
    emb = {k: gather(v) for k, v in model(**inputs).items()}
    return oa.oa_trans_loss(emb, oa.LOSS_TERMS["paper"], dict(main_weight=1.0, tags_weight=1.0, regions_weight=1.0), 0.05)[0]


def _ddp_worker(rank, world, port, results):
    import torch.distributed as torch_dist
    from common.dist import all_gather_with_grad
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = oa.OATrans(tiny_cfg(num_frames=2), 50)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    full = _oa_inputs(4 * world)
    local = {k: tuple(t[rank * 4:(rank + 1) * 4] for t in v) if isinstance(v, tuple) else v[rank * 4:(rank + 1) * 4]
             for k, v in full.items()}
    loss = _oa_loss_step(ddp, local, all_gather_with_grad)
    loss.backward()
    results[rank] = {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if n in ("vid_proj.weight", "txt_proj.1.weight",
                                                             "video_model.pos_embed")}}
    torch_dist.destroy_process_group()


def test_two_process_loss_and_gradients_equal_single_process():
    """All four streams gathered across 2 gloo ranks under DDP give the single-process loss and gradients."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    torch.manual_seed(0)
    model = oa.OATrans(tiny_cfg(num_frames=2), 50)
    loss = _oa_loss_step(model, _oa_inputs(8), lambda x: x)
    loss.backward()
    grads = dict(model.named_parameters())
    for rank in range(2):
        assert abs(results[rank]["loss"] - loss.item()) < 1e-4
        for n, g in results[rank]["grads"].items():
            torch.testing.assert_close(g, grads[n].grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "release"])
def test_dataset_batch_and_streams_on_the_tiny_corpus(tiny_corpus, variant):
    """A WebVid-style batch with detections: K region rows per clip, anchor frame, tag groups; the model returns
    the streams its loss variant contrasts."""
    from common.text import Tokenizer
    tok = Tokenizer(os.path.join(tiny_corpus, "vocab.txt"))
    cfg = tiny_cfg(oa_loss=variant, num_frames=2)
    ds = oa.WebVidObjects(str(tiny_corpus), "train", cfg, tok)
    items = [ds[i] for i in range(3)]
    assert all(it["regions"].shape == (cfg.top_k, 16) and it["regions"].any() for it in items)
    batch = oa.collate(items, tok, cfg)
    assert batch["video"].shape == (3, 2, 3, 32, 32) and batch["anchor"].shape == (3, 3, 32, 32)
    G = 1 if variant == "paper" else cfg.top_k
    assert batch["regions"].shape == (3, G, 16)
    assert batch["tag_groups"].shape[0] == 3 and batch["tag_groups"].any()
    names = set(ds.object_names)
    for b in range(3):  # every pooled tag token decodes to (part of) a detector class name
        pooled = batch["tags"][0][b][batch["tag_groups"][b].any(0)]
        words = tok.decode(pooled).split()
        assert words and all(any(w in n for n in names) for w in words)
    batch.pop("skipped"), batch.pop("bad_videos")
    emb = oa.OATrans(cfg, tok.vocab_size)(**batch)
    expected = {"video", "text", "regions", "tags"} | ({"caption_tags"} if variant == "release" else set())
    assert emb.keys() == expected and all(v.shape == (3, 16) for v in emb.values())


def test_malformed_webvid_row_names_file_and_line(tiny_corpus, tmp_path):
    root = tmp_path / "corpus"
    (root / "webvid").mkdir(parents=True)
    (root / "webvid" / "objects_vocab.txt").write_text((tiny_corpus / "webvid" / "objects_vocab.txt").read_text())
    (root / "webvid" / "results_train.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n1,u,PT00H00M02S,1_50,a red ball\n2,u,PT00H00M02S\n")
    from common.text import Tokenizer
    tok = Tokenizer(os.path.join(tiny_corpus, "vocab.txt"))
    from common.annotations import set_strict, skipped_rows
    try:
        set_strict(False)  # default: skipped, counted, named with file and line
        assert len(oa.WebVidObjects(str(root), "train", tiny_cfg(), tok)) == 1
        assert len(skipped_rows()) == 1 and "results_train.csv, line 3" in skipped_rows()[0]
        set_strict(True)
        with pytest.raises(SystemExit, match=r"results_train\.csv, line 3"):
            oa.WebVidObjects(str(root), "train", tiny_cfg(), tok)
    finally:
        set_strict(False)


def test_docstring_table_lists_every_field_the_paper_preset_changes():
    """The module docstring's "CPU default vs paper" table names (in backticks, first column) every field whose
    CPU default differs from the paper preset, so a reader sees each departure in one place."""
    import dataclasses
    import re
    from common.config import parse_config
    default, paper = oa.Config(), parse_config(oa.Config, ["--paper"], oa.PRESETS)
    changed = {f.name for f in dataclasses.fields(default) if getattr(default, f.name) != getattr(paper, f.name)}
    rows = [line.split("|")[1] for line in oa.__doc__.splitlines() if line.startswith("| `")]
    listed = {name for cell in rows for name in re.findall(r"`(\w+)`", cell)}
    assert changed - {"device", "out_dir", "data_root"} <= listed, sorted(changed - listed)


@pytest.mark.parametrize("captions,views", [("first", 1), ("all", 1), ("first", 2)])
def test_retrieval_protocol_matches_a_naive_reference(tiny_corpus, captions, views):
    """retrieval_captions=first scores one caption per video (MSR-VTT 1k-A style, the default of both oa_trans.py
    and all_in_one.py), =all every caption; retrieval_views=V averages the similarity matrices of V random frame
    samplings (the All-in-one release's multi-view evaluation). Checked against a per-video loop."""
    from common.metrics import retrieval_metrics
    from common.text import Tokenizer
    from common.video import load_clip
    assert oa.Config().retrieval_captions == "first" and oa.Config().retrieval_views == 1
    cfg = tiny_cfg(num_frames=2, precision="fp32", eval_batch_size=7, retrieval_captions=captions,
                   retrieval_views=views)
    tok = Tokenizer(str(tiny_corpus / "vocab.txt"))
    torch.manual_seed(0)
    model = oa.OATrans(cfg, tok.vocab_size)
    ann = oa.MSRVTT(str(tiny_corpus), "test")
    got = oa.evaluate_retrieval(model, oa.EvalClips(ann, cfg), tok, cfg, torch.device("cpu"))

    model.eval()
    by_video = {}
    for text, v in zip(ann.captions, ann.caption_video):
        by_video.setdefault(v, []).append(text)
    queries = [(t, v) for v in sorted(by_video) for t in (by_video[v] if captions == "all" else by_video[v][:1])]
    with torch.no_grad():
        sims = []
        for view in ([None] if views == 1 else range(views)):
            vids = []
            for i, path in enumerate(ann.paths):
                rng = None if view is None else random.Random(f"{cfg.seed}/{view}/{i}")
                frames, _ = load_clip(path, cfg.num_frames, "uniform" if view is None else "rand", rng=rng)
                vids.append(F.normalize(model.encode_video(VideoTransform(32, False)(frames)[0][None]), dim=-1)[0])
            texts = []
            for t, _ in queries:
                enc = tok([t], cfg.max_text_len, pad_to_max=False)
                texts.append(F.normalize(model.encode_text(enc["input_ids"], enc["attention_mask"]), dim=-1)[0])
            sims.append(torch.stack(texts) @ torch.stack(vids).t())
    expected = retrieval_metrics(torch.stack(sims).mean(0), torch.tensor([v for _, v in queries]))
    for k, v in expected.items():
        assert got[f"retrieval/{k}"] == pytest.approx(v, abs=1e-6), k


def test_nce_loss_rejects_non_square_similarity():
    with pytest.raises(ValueError, match="square"):
        oa.nce_loss(torch.randn(3, 4), 0.05)


def test_release_loss_says_the_distractor_does_not_apply(tiny_corpus, tmp_path, capsys):
    """--distractor only shapes the paper loss's tag text; under --oa_loss=release the run says it is ignored."""
    oa.main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path}", "--img_size=32", "--patch_size=8",
             "--vit_width=32", "--vit_depth=1", "--vit_heads=2", "--text_width=32", "--text_layers=1", "--text_heads=2",
             "--batch_size=4", "--num_frames=2", "--curriculum=none", "--num_workers=0", "--precision=fp32",
             "--eval_batch_size=8", "--max_steps=1", "--oa_loss=release", "--distractor=true"])
    assert "--distractor has no effect with --oa_loss=release" in capsys.readouterr().out
