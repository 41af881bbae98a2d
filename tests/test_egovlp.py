"""Tests for egovlp.py: EgoNCE against InfoNCE and a naive loop, the positive mask from tags, scene negatives,
the attention grouping against a per-token loop, the paper's exact parameter count, the metrics on hand-worked
examples, the EgoClip loader, and an end-to-end run with --resume on the tiny corpus.

    cd /work/main && python -m pytest -q tests/test_egovlp.py
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import egovlp
from egovlp import (Config, FrozenInTime, PRESETS, VarAttention, action_positive_mask, chunk_frame, egonce_loss,
                    inflate_temporal_embed, mcq_accuracy, mi_mm_loss, parse_tags, scene_buckets, sim_matrix)

TINY_MODEL = dict(image_size=32, patch_size=16, vit_width=32, vit_depth=2, vit_heads=2, text_width=32,
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


def naive_var_attention(attn: VarAttention, x, group, T, N):
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
                keys = [0] + ([1 + tt * N + n for tt in range(T)] if group == "time" else
                              [1 + f * N + nn for nn in range(N)])
            for h in range(H):
                sl = slice(h * D // H, (h + 1) * D // H)
                w = torch.softmax(torch.stack([q[b, s, sl] @ k[b, j, sl] for j in keys]) / math.sqrt(D // H), 0)
                out[b, s, sl] = sum(wi * v[b, j, sl] for wi, j in zip(w, keys))
    return attn.proj(out)


@pytest.mark.parametrize("group", ["time", "space"])
def test_var_attention_matches_naive_loop(group):
    torch.manual_seed(4)
    attn = VarAttention(8, 2)
    T, N = 3, 4
    x = torch.randn(2, 1 + T * N, 8)
    with torch.no_grad():
        assert torch.allclose(attn(x, group, T, N), naive_var_attention(attn, x, group, T, N), atol=1e-5)


def test_video_model_starts_as_an_image_vit():
    """time_init='zeros': the temporal branch outputs 0, so with one frame the encoder is a plain ViT."""
    torch.manual_seed(5)
    cfg = Config(**TINY_MODEL)
    vm = FrozenInTime(cfg, 50).init_weights().video_model
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
        assert torch.allclose(vm(video), expected, atol=1e-5)
        assert torch.count_nonzero(vm.blocks[0].timeattn(torch.randn(2, 9, 32), "time", 2, 4)) == 0


def test_release_block_wiring():
    """x1 = x + SpaceAttn(LN1(x + TimeAttn(LN3(x)))); out = x1 + MLP(LN2(x1)) — the time residual is dropped."""
    torch.manual_seed(6)
    blk = egovlp.SpaceTimeBlock(8, 2, 2.0)
    T, N = 2, 3
    x = torch.randn(1, 1 + T * N, 8)
    with torch.no_grad():
        t = x + naive_var_attention(blk.timeattn, blk.norm3(x), "time", T, N)
        x1 = x + naive_var_attention(blk.attn, blk.norm1(t), "space", T, N)
        assert torch.allclose(blk(x, T, N), x1 + blk.mlp(blk.norm2(x1)), atol=1e-5)


def test_fewer_frames_than_temporal_rows_and_inflation():
    cfg = Config(**{**TINY_MODEL, "num_frames": 4})
    model = FrozenInTime(cfg, 50).init_weights()
    assert model.encode_video(torch.randn(1, 2, 3, 32, 32)).shape == (1, 16)  # 2 frames with 4 rows
    te = torch.arange(8.0).view(1, 4, 2)
    grown = inflate_temporal_embed({"video_model.temporal_embed": te}, 6)["video_model.temporal_embed"]
    assert torch.equal(grown, torch.cat([te, torch.zeros(1, 2, 2)], 1))
    cut = inflate_temporal_embed({"module.video_model.temporal_embed": te}, 3)["module.video_model.temporal_embed"]
    assert torch.equal(cut, te[:, :3])


def test_text_padding_does_not_change_the_embedding():
    torch.manual_seed(7)
    model = FrozenInTime(Config(**TINY_MODEL), 50).init_weights().eval()
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


def test_read_egoclip_skips_bad_lines(tmp_path):
    cols = ("clip_idx video_uid video_dur narration_source narration_ind narration_time clip_start clip_end "
            "clip_text tag_verb tag_noun").split()
    lines = ["\t".join(cols),
             "\t".join(["0", "v1", "100", "narration_pass_1", "0", "3.5", "-0.2", "4.1", "#C C picks a cup", "[3]",
                        "[5, 12]"]),
             "\t".join(["1", "v1", "100", "narration_pass_1", "1", "oops", "1", "2", "#C C drops it", "[1]", "[2]"]),
             "\t".join(["2", "v1", "100", "narration_pass_1", "2", "9", "8", "10", "#C C x", "os.system('x')", "[2]"])]
    (tmp_path / "egoclip.csv").write_text("\n".join(lines) + "\n")
    rows, bad = egovlp.read_egoclip(tmp_path / "egoclip.csv")
    assert bad == 2 and len(rows) == 1
    assert rows[0]["clip_text"] == "#C C picks a cup"  # verbatim
    assert rows[0]["tag_noun"] == [5, 12] and rows[0]["clip_start"] == -0.2


def _rows():
    # video a: narrations at 5, 20, 50 s (bucket 0) and 65, 70 s (bucket 1); video b: one at 10 s (bucket 0)
    times = [("a", 5), ("a", 20), ("a", 50), ("a", 65), ("a", 70), ("b", 10)]
    return [dict(video_uid=u, narration_time=float(t), clip_start=t - 1.0, clip_end=t + 1.0, clip_text=f"{u}{t}",
                 tag_verb=[0], tag_noun=[0]) for u, t in times]


def test_scene_negatives_come_from_the_same_video_and_window(tmp_path):
    rows = _rows()
    assert scene_buckets(rows, 60.0) == {("a", 0): [0, 1, 2], ("a", 1): [3, 4], ("b", 0): [5]}
    ds = egovlp.EgoClipDataset(tmp_path, Config(), rows, 1, 1)
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


def test_collate_puts_negatives_after_anchors():
    def item(name):
        return dict(video=torch.full((1, 3, 2, 2), float(len(name))), text=name, verb=torch.zeros(2),
                    noun=torch.zeros(2))
    batch = egovlp.collate_pairs([(item("a"), item("a_neg")), dict(error="broken.mp4"), (item("bb"), item("bb_n"))])
    assert batch["text"] == ["a", "bb", "a_neg", "bb_n"]
    assert batch["skipped"] == 1 and batch["anchors"] == 2 and batch["video"].shape[0] == 4
    trimmed = egovlp.trim_batch(batch, 1)
    assert trimmed["text"] == ["a", "a_neg"] and trimmed["video"].shape[0] == 2


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
