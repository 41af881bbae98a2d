"""Tests for egovlp.py: EgoNCE against InfoNCE and a naive loop, the positive mask from tags, scene negatives,
the attention grouping against a per-token loop, the paper's exact parameter count, the metrics on hand-worked
examples, the EgoClip loader, and an end-to-end run with --resume on the tiny corpus.

    cd /work/main && python -m pytest -q tests/test_egovlp.py
"""
import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

import egovlp
from common.weights import fit_temporal_embed
from egovlp import (Config, FrozenInTime, PRESETS, DividedAttention, action_positive_mask, chunk_frame, egonce_loss,
                    mcq_accuracy, mi_mm_loss, parse_tags, scene_buckets, sim_matrix)

TINY_MODEL = dict(img_size=32, patch_size=16, vit_width=32, vit_depth=2, vit_heads=2, text_width=32,
                  text_layers=1, text_heads=2, text_ffn=64, embed_dim=16)


# --------------------------------------------------------------------------------------------- EgoNCE
def test_egonce_with_self_positives_is_infonce():
    torch.manual_seed(0)
    sim = torch.rand(7, 7) * 2 - 1
    labels = torch.arange(7)
    infonce = F.cross_entropy(sim / 0.05, labels) + F.cross_entropy(sim.t() / 0.05, labels)
    assert torch.allclose(egonce_loss(sim, torch.eye(7, dtype=torch.bool), 0.05), infonce, atol=1e-5)


def test_egonce_matches_naive_loop():
    torch.manual_seed(1)
    M, tau = 6, 0.1
    sim = torch.rand(M, M) * 2 - 1
    pos = (torch.rand(M, M) > 0.6) | torch.eye(M, dtype=torch.bool)
    pos[0, 3] = True  # an asymmetric mask tests that each direction reads its own rows
    t2v = v2t = 0.0
    for i in range(M):
        num = sum(math.exp(sim[i, j] / tau) for j in range(M) if pos[i, j])
        den = sum(math.exp(sim[i, j] / tau) for j in range(M))
        t2v -= math.log(num / den) / M
    for j in range(M):
        num = sum(math.exp(sim[i, j] / tau) for i in range(M) if pos[i, j])
        den = sum(math.exp(sim[i, j] / tau) for i in range(M))
        v2t -= math.log(num / den) / M
    assert abs(egonce_loss(sim, pos, tau).item() - (t2v + v2t)) < 1e-4


def test_more_positives_lower_the_loss_of_a_matching_pair():
    # clips 0 and 1 share an action: with action-aware positives, ranking 1's text next to 0's video costs less
    sim = torch.tensor([[0.9, 0.8, 0.0], [0.8, 0.9, 0.0], [0.0, 0.0, 0.9]])
    eye = torch.eye(3, dtype=torch.bool)
    pos = eye.clone()
    pos[0, 1] = pos[1, 0] = True
    assert egonce_loss(sim, pos, 0.05) < egonce_loss(sim, eye, 0.05)


def _multi_hot(lists, size):
    out = torch.zeros(len(lists), size)
    for i, ids in enumerate(lists):
        out[i, ids] = 1
    return out


def test_positive_mask_from_tags():
    verbs = _multi_hot([[1], [1], [1], [], [5]], 6)
    nouns = _multi_hot([[2], [2, 3], [4], [2], [3]], 6)
    T, F_ = True, False
    expected_vn = torch.tensor([[T, T, F_, F_, F_],  # 0 and 1 share verb 1 and noun 2
                                [T, T, F_, F_, F_],  # 1 and 4 share noun 3 but not a verb
                                [F_, F_, T, F_, F_],  # 2 shares verb 1 but no noun
                                [F_, F_, F_, T, F_],  # 3 has no verb: only itself
                                [F_, F_, F_, F_, T]])
    expected_verb = torch.tensor([[T, T, T, F_, F_], [T, T, T, F_, F_], [T, T, T, F_, F_],
                                  [F_, F_, F_, T, F_], [F_, F_, F_, F_, T]])
    expected_noun = torch.tensor([[T, T, F_, T, F_], [T, T, F_, T, T], [F_, F_, T, F_, F_],
                                  [T, T, F_, T, F_], [F_, T, F_, F_, T]])
    assert torch.equal(action_positive_mask(verbs, nouns, "verb_and_noun"), expected_vn)
    assert torch.equal(action_positive_mask(verbs, nouns, "verb"), expected_verb)
    assert torch.equal(action_positive_mask(verbs, nouns, "noun"), expected_noun)
    assert torch.equal(action_positive_mask(verbs, nouns, "self"), torch.eye(5, dtype=torch.bool))
    with pytest.raises(ValueError):
        action_positive_mask(verbs, nouns, "scene")


def test_positive_mask_matches_release_cosine_formula():
    # the release: mask = cos(verb) * cos(noun) + I, positive iff > 0
    torch.manual_seed(2)
    verbs, nouns = (torch.rand(9, 5) > 0.7).float(), (torch.rand(9, 4) > 0.6).float()
    cos = lambda x: F.normalize(x, dim=1, eps=1e-8) @ F.normalize(x, dim=1, eps=1e-8).t()
    release = (cos(verbs) * cos(nouns) + torch.eye(9)) > 0
    assert torch.equal(action_positive_mask(verbs, nouns, "verb_and_noun"), release)


def test_mi_mm_matches_naive_loop_and_adaptive_margin():
    torch.manual_seed(3)
    sim = torch.rand(4, 4) * 2 - 1
    rel = torch.tensor([1.0, 0.5, 0.25, 1.0])
    for margin in (0.2, 0.4 * rel):
        m = margin if isinstance(margin, float) else margin.tolist()
        terms = []
        for i in range(4):
            for j in range(4):
                if i != j:
                    mi = m if isinstance(m, float) else m[i]
                    terms += [max(0.0, mi - (sim[i, i] - sim[i, j]).item()),
                              max(0.0, mi - (sim[i, i] - sim[j, i]).item())]
        assert abs(mi_mm_loss(sim, margin).item() - sum(terms) / len(terms)) < 1e-6


def test_sim_matrix_is_cosine():
    a, b = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(sim_matrix(a, b), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


# --------------------------------------------------------------------------------------------- model
def test_paper_parameter_count_on_meta_device():
    for frames, expected in ((4, 180_925_184), (16, 180_934_400)):
        cfg = Config(**{**PRESETS["paper"], "num_frames": frames})
        with torch.device("meta"):
            model = FrozenInTime(cfg, cfg.vocab_size)
        assert sum(p.numel() for p in model.parameters()) == expected
    keys = set(model.state_dict())
    for key in ("video_model.blocks.11.timeattn.qkv.weight", "video_model.blocks.0.norm3.weight",
                "video_model.temporal_embed", "text_model.embeddings.word_embeddings.weight",
                "text_model.transformer.layer.5.attention.q_lin.weight",
                "text_model.transformer.layer.5.output_layer_norm.weight", "txt_proj.1.weight", "vid_proj.0.weight"):
        assert key in keys, key


def naive_divided_attention(attn: DividedAttention, x, axis, T, N):
    """Per-token loop: CLS attends to everything; a patch attends to CLS + its group (same position / frame)."""
    B, S, D = x.shape
    H = attn.heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    out = torch.zeros(B, S, D)
    for b in range(B):
        for s in range(S):
            if s == 0:
                keys = list(range(S))
            else:
                f, n = divmod(s - 1, N)
                keys = [0] + ([1 + tt * N + n for tt in range(T)] if axis == "time" else
                              [1 + f * N + nn for nn in range(N)])
            for h in range(H):
                sl = slice(h * D // H, (h + 1) * D // H)
                w = torch.softmax(torch.stack([q[b, s, sl] @ k[b, j, sl] for j in keys]) / math.sqrt(D // H), 0)
                out[b, s, sl] = sum(wi * v[b, j, sl] for wi, j in zip(w, keys))
    return attn.proj(out)


@pytest.mark.parametrize("axis", ["time", "space"])
def test_divided_attention_matches_naive_loop(axis):
    torch.manual_seed(4)
    attn = DividedAttention(8, 2)
    T, N = 3, 4
    x = torch.randn(2, 1 + T * N, 8)
    with torch.no_grad():
        assert torch.allclose(attn(x, axis, T, N), naive_divided_attention(attn, x, axis, T, N), atol=1e-5)


@pytest.mark.parametrize("time_init", ["release", "live"])
def test_video_model_starts_as_an_image_vit(time_init):
    """qkv = 0: the temporal branch outputs 0, so with one frame the encoder is a plain ViT."""
    torch.manual_seed(5)
    cfg = Config(**TINY_MODEL)
    vm = FrozenInTime(cfg, 50).init_weights(time_init).video_model
    video = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        x = vm.patch_embed(video[:, 0])  # (B, N, D)
        x = torch.cat([vm.cls_token.expand(2, -1, -1), x], 1) + vm.pos_embed
        for blk in vm.blocks:
            h = blk.norm1(x)  # plain multi-head self-attention over all tokens
            q, k, v = (z.unflatten(-1, (blk.attn.heads, -1)).transpose(1, 2) for z in blk.attn.qkv(h).chunk(3, -1))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + blk.attn.proj(a)
            x = x + blk.mlp(blk.norm2(x))
        expected = vm.norm(x)[:, 0]
        assert torch.allclose(vm(video)[:, 0], expected, atol=1e-5)
        assert torch.count_nonzero(vm.blocks[0].timeattn(torch.randn(2, 9, 32), "time", 2, 4)) == 0


def test_release_time_init_gives_temporal_qkv_no_gradient():
    """With proj.weight = 1 the temporal output is constant over channels and LN1 erases it: qkv's gradient is
    float noise (exactly 0 in exact arithmetic), while the 'live' init gives it a real gradient."""
    grads = {}
    for time_init in ("release", "live"):
        torch.manual_seed(8)
        model = FrozenInTime(Config(**TINY_MODEL), 50).init_weights(time_init)
        model.encode_video(torch.randn(3, 4, 3, 32, 32)).pow(2).sum().backward()
        blk = model.video_model.blocks[0]
        grads[time_init] = blk.timeattn.qkv.weight.grad.abs().max() / blk.attn.qkv.weight.grad.abs().max()
    assert grads["release"] < 1e-5 and grads["live"] > 1e-3


def test_release_block_wiring():
    """x1 = x + SpaceAttn(LN1(x + TimeAttn(LN3(x)))); out = x1 + MLP(LN2(x1)) — the time residual is dropped."""
    torch.manual_seed(6)
    blk = egovlp.SpaceTimeBlock(8, 2, 2.0)
    T, N = 2, 3
    x = torch.randn(1, 1 + T * N, 8)
    with torch.no_grad():
        t = x + naive_divided_attention(blk.timeattn, blk.norm3(x), "time", T, N)
        x1 = x + naive_divided_attention(blk.attn, blk.norm1(t), "space", T, N)
        assert torch.allclose(blk(x, T, N), x1 + blk.mlp(blk.norm2(x1)), atol=1e-5)


def test_fewer_frames_than_temporal_rows_and_inflation():
    cfg = Config(**{**TINY_MODEL, "num_frames": 4})
    model = FrozenInTime(cfg, 50).init_weights()
    assert model.encode_video(torch.randn(1, 2, 3, 32, 32)).shape == (1, 16)  # 2 frames with 4 rows
    te = torch.arange(8.0).view(1, 4, 2)
    assert torch.equal(fit_temporal_embed(te, 6), torch.cat([te, torch.zeros(1, 2, 2)], 1))
    assert torch.equal(fit_temporal_embed(te, 3), te[:, :3])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_padding_does_not_change_the_embedding(pool):
    torch.manual_seed(7)
    model = FrozenInTime(Config(**TINY_MODEL, text_pool=pool), 50).init_weights().eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0]])
    a = model.encode_text(ids, (ids != 0).long())
    b = model.encode_text(ids[:, :4], torch.ones(1, 4, dtype=torch.long))
    assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------------------- data
def test_parse_tags_is_safe():
    assert parse_tags("[93]") == [93]
    assert parse_tags("[192, 115, 12]") == [192, 115, 12]
    assert parse_tags("") == [] and parse_tags("[]") == []
    with pytest.raises(ValueError):
        parse_tags("__import__('os').getcwd()")


def test_read_egoclip_parses_rows_and_names_malformed_lines(tmp_path):
    cols = ("clip_idx video_uid video_dur narration_source narration_ind narration_time clip_start clip_end "
            "clip_text tag_verb tag_noun").split()
    good = "\t".join(["0", "v1", "100", "narration_pass_1", "0", "3.5", "-0.2", "4.1", "#C C picks a cup", "[3]",
                      "[5, 12]"])
    (tmp_path / "egoclip.csv").write_text("\n".join(["\t".join(cols), good]) + "\n")
    rows = egovlp.read_egoclip(tmp_path / "egoclip.csv")
    assert len(rows) == 1 and rows[0]["clip_text"] == "#C C picks a cup"  # verbatim
    assert rows[0]["tag_noun"] == [5, 12] and rows[0]["clip_start"] == -0.2
    bad_rows = ["\t".join(["1", "v1", "100", "narration_pass_1", "1", "oops", "1", "2", "#C C drops it", "[1]", "[2]"]),
                "\t".join(["2", "v1", "100", "narration_pass_1", "2", "9", "8", "10", "#C C x", "os.system('x')", "[2]"])]
    from common.annotations import set_strict, skipped_rows
    for bad in bad_rows:
        (tmp_path / "bad.csv").write_text("\n".join(["\t".join(cols), good, bad]) + "\n")
        try:
            set_strict(False)  # default: skipped, counted, named with file and line
            assert len(egovlp.read_egoclip(tmp_path / "bad.csv")) == 1
            assert len(skipped_rows()) == 1 and "bad.csv, line 3" in skipped_rows()[0]
            set_strict(True)
            with pytest.raises(SystemExit, match=r"bad\.csv, line 3"):
                egovlp.read_egoclip(tmp_path / "bad.csv")
        finally:
            set_strict(False)


def _rows():
    # video a: narrations at 5, 20, 50 s (bucket 0) and 65, 70 s (bucket 1); video b: one at 10 s (bucket 0)
    times = [("a", 5), ("a", 20), ("a", 50), ("a", 65), ("a", 70), ("b", 10)]
    return [dict(video_uid=u, narration_time=float(t), clip_start=t - 1.0, clip_end=t + 1.0, clip_text=f"{u}{t}",
                 tag_verb=[0], tag_noun=[0]) for u, t in times]


def test_scene_negatives_come_from_the_same_video_and_window(tmp_path):
    rows = _rows()
    order, start, end = scene_buckets(rows, 60.0)
    assert [order[start[i]:end[i]].tolist() for i in range(6)] == [[0, 1, 2]] * 3 + [[3, 4]] * 2 + [[5]]
    ds = egovlp.EgoClipDataset(tmp_path, Config(), rows, ["take"], 1)
    import random
    rng = random.Random(0)
    for i in range(5):
        for _ in range(20):
            j = ds.scene_negative(i, rng)
            assert j != i and rows[j]["video_uid"] == rows[i]["video_uid"]
            assert rows[j]["narration_time"] // 60 == rows[i]["narration_time"] // 60
    assert ds.scene_negative(5, rng) == 5  # alone in its bucket: the anchor itself
    draws = {ds.scene_negative(0, rng) for _ in range(50)}
    assert draws == {1, 2}  # uniform over the bucket's other clips


@pytest.mark.parametrize("hflip", ["off", "release", "mirror"])
def test_hflip_field_flips_video_and_mirrors_the_narration(tmp_path, hflip):
    """A left-dark, right-bright frame and a "moves ... to the left" narration: "off" never flips; "release" flips
    the video but keeps the text (then contradicting it); "mirror" flips both, and the verb tag with them."""
    import numpy as np
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, None, :, None], 32, 1), 4, 0)
    ramp = np.repeat(ramp, 3, 3)  # (4, 32, 32, 3)
    verbs = ["take", "move_left_(slide,_drag)", "move_right_(slide,_drag)"]
    rows = [dict(video_uid="v", narration_time=1.0, clip_start=0.5, clip_end=1.5,
                 clip_text="#C C slides the cup to the left", tag_verb=[1], tag_noun=[0])]
    ds = egovlp.EgoClipDataset(tmp_path, Config(img_size=16, hflip=hflip), rows, verbs, 1)
    ds.reader = lambda *args, **kwargs: ramp
    flipped, texts = [], set()
    for _ in range(40):
        item = ds.load(0)
        flip = bool(item["video"][0, 0, :, 0].mean() > item["video"][0, 0, :, -1].mean())
        flipped.append(flip)
        texts.add(item["text"])
        if hflip == "mirror":
            assert ("right" in item["text"]) == flip and item["verb"].tolist() == ([0, 0, 1] if flip else [0, 1, 0])
        else:
            assert item["text"].endswith("left") and item["verb"].tolist() == [0, 1, 0]
    assert any(flipped) == (hflip != "off") and not all(flipped)


def test_mirror_text_and_classes():
    assert egovlp.mirror_text("#C C moves the cup right with his left hand") == "#C C moves the cup left with his right hand"
    assert egovlp.mirror_text("leftover left rightwards") == "leftover right leftwards"
    assert egovlp.mirror_classes(["move_left_(slide)", "take", "move_right_(slide)", "turn_left"]) == [2, 1, 0, 3]


def test_collate_puts_negatives_after_anchors():
    def item(name):
        return dict(video=torch.full((1, 3, 2, 2), float(len(name))), text=name, verb=torch.zeros(2),
                    noun=torch.zeros(2))
    batch = egovlp.collate_pairs([(item("a"), item("a_neg")), dict(error="broken.mp4"), (item("bb"), item("bb_n"))])
    assert batch["text"] == ["a", "bb", "a_neg", "bb_n"]
    assert batch["skipped"] == 1 and batch["video"].shape[0] == 4


def test_chunk_frame_mapping():
    assert chunk_frame(0, 18000) == (0, 0)
    assert chunk_frame(17999, 18000) == (0, 17999)
    assert chunk_frame(18000, 18000) == (1, 0)  # the release reads this frame from the wrong chunk
    assert chunk_frame(40000, 18000) == (2, 4000)


# --------------------------------------------------------------------------------------------- metrics
def test_mcq_accuracy_by_type():
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0],    # predicts 0, answer 0, inter: right
                        [0.1, 0.9, 0.0, 0.0, 0.0],    # predicts 1, answer 2, inter: wrong
                        [0.0, 0.0, 0.0, 0.9, 0.1],    # predicts 3, answer 3, intra: right
                        [0.0, 0.0, 0.0, 0.0, 0.95],   # predicts 4, answer 4, inter: right
                        [0.5, 0.0, 0.0, 0.0, 0.1]])   # predicts 0, answer 4, intra: wrong
    out = mcq_accuracy(sim, torch.tensor([0, 2, 3, 4, 4]), torch.tensor([1, 1, 2, 1, 2]))
    assert out == {"egomcq/inter_acc": pytest.approx(200 / 3), "egomcq/intra_acc": pytest.approx(50.0)}


def test_epic_mir_metrics_both_directions():
    # 2 videos x 3 sentences. Video 0: sentence 0 is the exact match (1), sentence 1 half relevant.
    rel = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]])
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.2, 0.3]])
    out = egovlp.epic_mir_metrics(sim, rel)
    # V->T: video 0 ranks s0 first (AP 1); video 1 ranks s1 last of 3 (AP 1/3)
    assert out["epic_mir/mAP_v2t"] == pytest.approx(100 * (1 + 1 / 3) / 2)
    # T->V: s0 (relevant video 0, ranked 1st: AP 1); s1 (relevant video 1, ranked 2nd behind video 0 of
    # relevancy 0.5: the release's graded P@2 = (0.5 + 1) / 2, binary P@2 = 1/2); s2 has none
    assert out["epic_mir/mAP_t2v"] == pytest.approx(100 * (1 + 0.75) / 2)
    assert out["epic_mir/mAP_binary_t2v"] == pytest.approx(100 * (1 + 0.5) / 2)
    assert out["epic_mir/mAP_binary_v2t"] == pytest.approx(out["epic_mir/mAP_v2t"])  # no graded item above a hit
    # nDCG V->T: video 0, K=2: ranking s0 (1), s1 (0.5) is ideal -> 1; video 1, K=1: top is s0 (rel 0) -> 0
    assert out["epic_mir/nDCG_v2t"] == pytest.approx(50.0)
    # nDCG T->V: s0 K=1 top video 0 (1) -> 1; s1 K=2: order v0 (0.5), v1 (1) vs ideal v1, v0
    dcg, idcg = 0.5 + 1 / math.log2(3), 1 + 0.5 / math.log2(3)
    assert out["epic_mir/nDCG_t2v"] == pytest.approx(100 * (1 + dcg / idcg) / 2)
    assert out["epic_mir/mAP_avg"] == pytest.approx((out["epic_mir/mAP_v2t"] + out["epic_mir/mAP_t2v"]) / 2)
    assert out["epic_mir/nDCG_avg"] == pytest.approx((out["epic_mir/nDCG_v2t"] + out["epic_mir/nDCG_t2v"]) / 2)


def test_dual_softmax_prefers_mutual_best_matches():
    # texts x videos. Raw scores give both videos to text 0; text 1 is sure about video 0 while text 0 hesitates,
    # so dual-softmax hands video 0 to text 1:  S1 = softmax_videos(S) * S = [[2.62, 2.33], [4.80, 0.02]]
    sim = torch.tensor([[5.0, 4.9], [4.9, 1.0]])
    out = egovlp.dual_softmax(sim, 1.0)
    assert sim.argmax(0).tolist() == [0, 0] and out.argmax(0).tolist() == [1, 0]
    assert torch.allclose(out.sum(0), torch.ones(2))  # a softmax over texts, per video


def test_dual_softmax_normalises_over_clip_captions_like_the_release():
    """3 test clips, 2 unique sentences: clips 0 and 2 share sentence 0. The release embeds one caption per clip,
    takes both softmaxes on that (3, 3) matrix, then keeps the sentences' columns; a naive restatement of those
    steps must equal dual_softmax with caption_rows, and differ from normalising over the 2 unique sentences."""
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(2, 3, generator=g) * 3  # (sentences, videos)
    caption_rows = torch.tensor([0, 1, 0])  # the sentence of each clip
    per_clip = sim[caption_rows]  # (clips, videos): what the release scores
    s1 = torch.softmax(per_clip / 2.0, dim=1) * per_clip
    s2 = torch.softmax(s1, dim=0)  # over the 3 clip captions, duplicate included
    first_clip = [0, 1]  # the release's `indexes`: a clip holding each unique sentence
    expected = s2[first_clip]  # (sentences, videos)
    got = egovlp.dual_softmax(sim, 2.0, caption_rows)
    assert torch.allclose(got, expected, atol=1e-6)
    unique = egovlp.dual_softmax(sim, 2.0)
    assert torch.allclose(unique.sum(0), torch.ones(3))
    assert not torch.allclose(unique, expected, atol=1e-3)


# --------------------------------------------------------------------------------------------- video reading
def test_chunked_layout_reads_the_same_frames_as_the_whole_video(tiny_corpus, tmp_path):
    """Cut one EgoClip video into 5-s chunks <uid>/<k>.mp4 (the release's layout, smaller) and read a clip that
    straddles a chunk boundary both ways; frame content must agree (up to re-encoding noise)."""
    import av
    import numpy as np
    from common.video import read_frames, video_meta
    root = tiny_corpus / "egoclip"
    uid = egovlp.read_egoclip(root / "egoclip.csv")[0]["video_uid"]
    src = root / "videos" / f"{uid}.mp4"
    meta = video_meta(src)
    frames = read_frames(src, range(meta.num_frames))
    per_chunk = int(5 * meta.fps)
    (tmp_path / uid).mkdir()
    for k in range(0, math.ceil(len(frames) / per_chunk)):
        with av.open(str(tmp_path / uid / f"{k}.mp4"), "w") as out:
            stream = out.add_stream("libx264", rate=int(meta.fps))
            stream.width, stream.height, stream.pix_fmt = meta.width, meta.height, "yuv420p"
            stream.options = {"crf": "0", "preset": "ultrafast"}  # near-lossless so the check can be tight
            for f in frames[k * per_chunk:(k + 1) * per_chunk]:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode())
    chunked = egovlp.ClipReader(tmp_path, chunk_seconds=5.0)(uid, 4.0, 6.5, 4, "uniform")
    whole = egovlp.ClipReader(root / "videos")(uid, 4.0, 6.5, 4, "uniform")
    cached = egovlp.ClipReader(root / "videos", cache=True)(uid, 4.0, 6.5, 4, "uniform")
    assert chunked.shape == whole.shape == (4, meta.height, meta.width, 3)
    assert np.abs(chunked.astype(int) - whole.astype(int)).mean() < 4
    assert np.array_equal(cached, whole)


def test_short_and_out_of_range_windows_still_give_t_frames(tiny_corpus):
    root = tiny_corpus / "egoclip"
    uid = egovlp.read_egoclip(root / "egoclip.csv")[0]["video_uid"]
    reader = egovlp.ClipReader(root / "videos", cache=True)
    assert reader(uid, -1.0, 0.05, 4, "rand").shape[0] == 4  # starts before 0, shorter than one frame
    assert reader(uid, 1e4, 1e4 + 1, 4, "uniform").shape[0] == 4  # past the end: clamped to the last frame
    with pytest.raises(Exception):
        reader("no_such_video", 0.0, 1.0, 4, "rand")


def test_preload_fills_the_cache_once_and_counts_unreadable_videos(tiny_corpus, tmp_path):
    """preload decodes in the calling process (workers forked later share the frames); a corrupt file is counted,
    not cached, and its clips still raise VideoReadError (so the dataset skips and counts them)."""
    import shutil
    from common.video import VideoReadError
    root = tiny_corpus / "egoclip"
    uids = sorted({r["video_uid"] for r in egovlp.read_egoclip(root / "egoclip.csv")})[:2]
    for uid in uids:
        shutil.copy(root / "videos" / f"{uid}.mp4", tmp_path / f"{uid}.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    reader = egovlp.ClipReader(tmp_path, cache=True)
    assert reader.preload(uids + ["broken", uids[0]], threads=2) == 1
    assert sorted(reader._frames) == uids
    for uid in uids:
        (tmp_path / f"{uid}.mp4").unlink()  # cached clips no longer touch the files
        assert reader(uid, 0.0, 1.0, 4, "uniform").shape[0] == 4
    with pytest.raises(VideoReadError):
        reader("broken", 0.0, 1.0, 4, "uniform")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streamed_eval_bank_encodes_like_the_cached_one(tiny_corpus, num_workers):
    """An eval set over eval_cache_gb is decoded per evaluation (DataLoader) instead of kept in RAM: the same
    embeddings, and the same missing clip counted, as the cached bank. Neither decodes anything when built (so
    training starts at once); the cached one keeps every clip (ClipCache) after the first pass and encodes the same
    again without reading a video."""
    root = tiny_corpus / "egoclip"
    rows = egovlp.read_egoclip(root / "egoclip.csv")[:5]
    windows = [(r["video_uid"], r["clip_start"], r["clip_end"]) for r in rows]
    windows.insert(2, ("no_such_video", 0.0, 1.0))
    torch.manual_seed(0)
    cfg = Config(**TINY_MODEL, num_workers=num_workers)
    model = FrozenInTime(cfg, vocab_size=50).init_weights().eval()
    reader = egovlp.ClipReader(root / "videos")
    cached = egovlp.ClipBank(reader, cfg, windows, 4)
    streamed = egovlp.ClipBank(reader, Config(**TINY_MODEL, num_workers=num_workers, eval_cache_gb=0.0), windows, 4)
    assert len(cached.cache) == 0 and streamed.cache is None  # lazy: nothing decoded at start-up
    a = cached.encode(model, "cpu", 3, contextlib.nullcontext())
    b = streamed.encode(model, "cpu", 3, contextlib.nullcontext())
    assert len(cached.cache) == len(windows) and cached.cache.clips[2] is None  # the unreadable clip kept as None
    cached.reader = None  # a second decoding pass would fail: it must come from RAM
    assert torch.equal(cached.encode(model, "cpu", 3, contextlib.nullcontext()), a)
    assert cached.skipped == streamed.skipped == 1 and cached.ok == streamed.ok
    assert streamed.ok == [True, True, False, True, True, True]
    assert torch.allclose(a, b, atol=1e-6)  # batches differ in size: float summation order only
    assert a[2].abs().sum() == 0 and a[3].abs().sum() > 0


def test_sixteen_frames_through_a_four_frame_model_is_the_zero_inflated_model():
    """Charades-Ego zero-shot at 16 frames from a 4-frame model (the paper's setting): frames 5-16 get a zero
    temporal embedding, which is exactly a 16-row model whose rows 5-16 are zero (the release builds 16 rows and
    trains on 4, so rows 5-16 never move from their zero init)."""
    torch.manual_seed(0)
    four = FrozenInTime(Config(**TINY_MODEL, num_frames=4), 50).init_weights().eval()
    torch.nn.init.normal_(four.video_model.temporal_embed)  # trained rows are not zero
    sixteen = FrozenInTime(Config(**TINY_MODEL, num_frames=16), 50).eval()
    state = four.state_dict()
    te = state["video_model.temporal_embed"]  # (1, 4, D)
    state["video_model.temporal_embed"] = torch.cat([te, torch.zeros(1, 12, te.shape[2])], 1)  # by hand
    sixteen.load_state_dict(state)
    video = torch.randn(2, 16, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(four.encode_video(video), sixteen.encode_video(video), atol=1e-5)
        assert not torch.allclose(four.encode_video(video), four.encode_video(video[:, :4]), atol=1e-3)
    from common.config import parse_config
    assert parse_config(Config, ["--paper"], egovlp.PRESETS).charades_frames == 16


def test_charades_zero_shot_at_16_frames_runs(tiny_corpus, tmp_path):
    metrics = egovlp.main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path}", "--eval=charades",
                           "--charades_frames=16", "--num_frames=4", "--eval_batch_size=8", "--max_eval_items=6",
                           "--num_workers=0"] + [f"--{k}={v}" for k, v in TINY_MODEL.items()])
    assert 0 <= metrics["charades/mAP"] <= 100 and metrics["charades/skipped_videos"] == 0


# --------------------------------------------------------------------------------------------- end to end
def test_main_pretrain_then_resume_then_finetune_and_eval(tiny_corpus, tmp_path):
    common = [f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / 'pt'}", "--batch_size=4", "--num_workers=0",
              "--log_every=1", "--eval_batch_size=16", "--max_eval_items=10"] + \
             [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    metrics = egovlp.main(common + ["--max_steps=2", "--ckpt_every=1"])
    for key in ("egomcq/inter_acc", "egomcq/intra_acc", "epic_mir/mAP_avg", "epic_mir/nDCG_avg", "charades/mAP"):
        assert key in metrics and 0 <= metrics[key] <= 100, key
    ckpt = torch.load(tmp_path / "pt" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["positives"] == "verb_and_noun"
    saved = {k: v.clone() for k, v in ckpt["model"].items()}

    egovlp.main(common + ["--max_steps=3", "--resume"])  # one more step from the checkpoint
    ckpt = torch.load(tmp_path / "pt" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert any(not torch.equal(saved[k], ckpt["model"][k]) for k in saved)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "pt" / "log.jsonl") if "loss" in line]
    assert steps == [1, 2, 3]  # the step counter continues after --resume
    assert json.load(open(tmp_path / "pt" / "metrics.json"))["egomcq/inter_acc"] >= 0

    ft = egovlp.main([a for a in common if not a.startswith("--out_dir")] +
                     [f"--out_dir={tmp_path / 'ft'}", "--finetune=epic_mir", f"--init={tmp_path / 'pt' / 'ckpt.pt'}",
                      "--max_steps=1", "--num_frames=8", "--adaptive_margin"])
    assert "epic_mir/mAP_avg" in ft and "egomcq/inter_acc" not in ft
    ev = egovlp.main([a for a in common if not a.startswith("--out_dir")] +
                     [f"--out_dir={tmp_path / 'ev'}", "--eval=epic_mir", "--dual_softmax", "--num_frames=8",
                      f"--init={tmp_path / 'ft' / 'ckpt.pt'}"])
    assert set(ev) >= {"epic_mir/mAP_avg", "epic_mir/nDCG_avg"}


def test_infonce_ablation_runs(tiny_corpus, tmp_path):
    metrics = egovlp.main([f"--data_root={tiny_corpus}", f"--out_dir={tmp_path}", "--batch_size=4",
                           "--num_workers=0", "--max_steps=1", "--positives=self", "--negatives=none",
                           "--max_eval_items=5", "--eval_batch_size=16"]
                          + [f"--{k}={v}" for k, v in TINY_MODEL.items()])
    assert "egomcq/intra_acc" in metrics


def test_docstring_table_lists_every_field_the_paper_preset_changes():
    """The module docstring's "CPU default vs paper" table names (in backticks, first column) every field whose
    CPU default differs from the paper preset, so a reader sees each departure in one place."""
    import dataclasses
    import re
    from common.config import parse_config
    default, paper = egovlp.Config(), parse_config(egovlp.Config, ["--paper"], egovlp.PRESETS)
    changed = {f.name for f in dataclasses.fields(default) if getattr(default, f.name) != getattr(paper, f.name)}
    rows = [line.split("|")[1] for line in egovlp.__doc__.splitlines() if line.startswith("| `")]
    listed = {name for cell in rows for name in re.findall(r"`(\w+)`", cell)}
    assert changed - {"device", "out_dir", "data_root"} <= listed, sorted(changed - listed)


def test_losses_reject_non_square_similarity():
    """A ragged batch (texts != videos) is an error with a clear message, not a silent 1e37 loss."""
    sim = torch.randn(3, 4)
    with pytest.raises(ValueError, match="square"):
        egonce_loss(sim, torch.eye(3, 4, dtype=torch.bool), 0.05)
    with pytest.raises(ValueError, match="square"):
        egonce_loss(torch.randn(3, 3), torch.eye(3, 4, dtype=torch.bool), 0.05)
    with pytest.raises(ValueError, match="square"):
        egovlp.mi_mm_loss(sim, 0.2)
