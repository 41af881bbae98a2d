"""Tests of all_in_one.py: token rolling and VTC against naive loop references, which frames a temporal layer
lets interact, VTM pairs, the twin sampler and MLM masking statistics, unreadable clips, the paper's parameter
counts, a tiny end-to-end run with --resume, and the file's reading order.
Run: python -m pytest -q tests/test_all_in_one.py"""

import json
import random

import pytest
import torch
import torch.nn.functional as F

import all_in_one as aio
from common.text import Tokenizer, build_vocab


def tiny_cfg(**kw):
    base = dict(width=32, depth=2, heads=2, patch_size=16, img_size=32, num_frames=3, max_text_len=12,
                vocab_size=50, embed_dim=16)
    base.update(kw)
    return aio.Config(**base)


# --- temporal token rolling ----------------------------------------------------------------------------------

def naive_roll(v, k):
    """Loop reference of the release's TemporalRoll: slots 1..k take frame t-1, the last k slots take t+1."""
    B, T, S, D = v.shape
    n = S - 1
    out = torch.empty_like(v)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                if s == 0:
                    src = t                      # CLS stays
                elif s <= k:
                    src = (t - 1) % T            # circular: frame 0 gets frame T-1
                elif s > n - k:
                    src = (t + 1) % T
                else:
                    src = t
                out[b, t, s] = v[b, src, s]
    return out


@pytest.mark.parametrize("T,n,k", [(3, 16, 2), (4, 16, 4), (2, 9, 1), (3, 8, 0)])
def test_roll_matches_naive_loop(T, n, k):
    v = torch.randn(2, T, 1 + n, 5)
    torch.testing.assert_close(aio.temporal_roll(v, k), naive_roll(v, k), rtol=0, atol=0)


def naive_release_token_shift(v, fold_div=8):
    """The release's TemporalRoll v=3 branch, one token at a time: f = D // fold_div tokens (CLS included) taken
    from frame t+1, the next f from frame t-1, zeros where that frame does not exist, the rest unchanged."""
    B, T, S, D = v.shape
    f = D // fold_div
    out = torch.empty_like(v)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                if s < f:
                    out[b, t, s] = v[b, t + 1, s] if t + 1 < T else 0
                elif s < 2 * f:
                    out[b, t, s] = v[b, t - 1, s] if t >= 1 else 0
                else:
                    out[b, t, s] = v[b, t, s]
    return out


@pytest.mark.parametrize("T,S,D", [(3, 17, 16), (4, 9, 32), (3, 5, 64), (2, 197, 8)])
def test_token_shift_matches_the_release_branch(T, S, D):
    v = torch.randn(2, T, S, D)
    out = aio.temporal_shift(v)
    torch.testing.assert_close(out, naive_release_token_shift(v), rtol=0, atol=0)
    if D // 8 >= 1:  # the CLS (token 0) moves too, unlike in rolling and in the TSM channel shift
        assert not torch.equal(out[:, :, 0], v[:, :, 0])
    tsm = aio.channel_shift(v)
    torch.testing.assert_close(tsm[:, :, 0], v[:, :, 0])  # TSM leaves the CLS alone and moves channels
    torch.testing.assert_close(tsm[:, 1:, 1:, :D // 8], v[:, :-1, 1:, :D // 8])


@pytest.mark.parametrize("S", [2, 3, 5])
def test_roll_on_tiny_grids_keeps_shape_and_cls(S):
    """Fewer patch tokens than the release's divisor (L // 8 = 0 below 8 tokens, where the release rolls the
    whole sequence, CLS included): ours rolls at most N // 2 patches each way and never the CLS."""
    v = torch.randn(1, 3, S, 4)
    out = aio.temporal_roll(v, 1)
    assert out.shape == v.shape
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    torch.testing.assert_close(out, naive_roll(v, min(1, (S - 1) // 2)), rtol=0, atol=0)


def test_roll_is_a_permutation_that_keeps_cls():
    v = torch.randn(2, 3, 17, 4)
    out = aio.temporal_roll(v, 2)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    # every token still exists exactly once: sorting all values over (T, slots) gives the same multiset
    torch.testing.assert_close(out.flatten(1, 2).sort(dim=1).values, v.flatten(1, 2).sort(dim=1).values)
    assert not torch.equal(out, v)


def frames_changed_by(temporal, roll_tokens="fixed", t_changed=0):
    """Perturb frame t_changed of the video; return the frames whose joint-pass outputs change."""
    cfg = tiny_cfg(temporal=temporal, roll_tokens=roll_tokens, img_size=64)  # 16 patches, k = 2 rolled each way
    torch.manual_seed(0)
    model = aio.AllInOne(cfg).eval()
    ids = torch.randint(5, 50, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    video = torch.randn(1, 3, 3, 64, 64)
    video2 = video.clone()
    video2[:, t_changed] += 1.0

    def per_frame(vid):
        torch.manual_seed(1)  # the same random slot order in both passes (roll_tokens="random")
        with torch.no_grad():
            return model.joint_frames(ids, mask, vid)  # (1, T, L+1+N, D), before the mean over T

    a, b = per_frame(video), per_frame(video2)
    return [t for t in range(3) if not torch.allclose(a[:, t], b[:, t], atol=1e-6)]


def test_roll_moves_information_across_frames_and_mean_does_not():
    assert frames_changed_by("mean") == [0]                   # time average: frames never meet before the mean
    assert frames_changed_by("roll") == [0, 1, 2]             # rolling: frame 0's tokens reach frames 1 and 2
    assert frames_changed_by("roll", roll_tokens="random") == [0, 1, 2]
    assert frames_changed_by("shift") == [0, 1, 2]            # the release's token shift
    assert frames_changed_by("tsm") == [0, 1, 2]              # TSM-style channel shift
    assert frames_changed_by("flatten") == [0, 1, 2]          # joint space-time attention: one sequence
    assert frames_changed_by("mean", t_changed=2) == [2]


def test_video_only_pass_rolls_only_when_asked():
    cfg = tiny_cfg(temporal="roll", roll_tokens="fixed")
    torch.manual_seed(0)
    video = torch.randn(2, 3, 3, 32, 32)
    reordered = video[:, [1, 0, 2]]
    outs = {}
    for unimodal in (False, True):
        cfg.roll_unimodal = unimodal
        model = aio.AllInOne(cfg).eval()
        torch.nn.init.zeros_(model.transformer.temporal_embed)  # so only rolling can see the frame order
        with torch.no_grad():
            outs[unimodal] = (model.forward_video(video)[:, 0], model.forward_video(reordered)[:, 0])
        torch.manual_seed(0)
    # release layout: per-frame ViT + mean is blind to frame order (without a temporal embedding) ...
    torch.testing.assert_close(outs[False][0], outs[False][1], rtol=1e-5, atol=1e-5)
    # ... rolling in the video-only pass makes the embedding depend on it
    assert not torch.allclose(outs[True][0], outs[True][1], atol=1e-4)


def test_flatten_with_one_frame_is_the_per_frame_pass():
    """With one frame, [text ; frame] is the only sequence either way: flatten computes what mean does."""
    torch.manual_seed(0)
    ref = aio.AllInOne(tiny_cfg(temporal="mean", num_frames=1)).eval()
    flat = aio.AllInOne(tiny_cfg(temporal="flatten", num_frames=1, roll_unimodal=True)).eval()
    flat.load_state_dict(ref.state_dict())
    ids, mask = torch.randint(5, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0                                                    # a padded caption
    video = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ref.forward_joint(ids, mask, video), flat.forward_joint(ids, mask, video)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref.forward_frames(video), flat.forward_frames(video), rtol=1e-5, atol=1e-5)


def test_flatten_joins_the_frames_of_the_video_only_pass_only_when_asked():
    torch.manual_seed(0)
    video = torch.randn(1, 3, 3, 32, 32)
    video2 = video.clone()
    video2[:, 0] += 1.0
    for unimodal, expected in ((False, [0]), (True, [0, 1, 2])):
        model = aio.AllInOne(tiny_cfg(temporal="flatten", roll_unimodal=unimodal)).eval()
        with torch.no_grad():
            a, b = model.forward_frames(video), model.forward_frames(video2)
        assert [t for t in range(3) if not torch.allclose(a[:, t], b[:, t], atol=1e-6)] == expected


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_text_embedding_ignores_padding(pool):
    """Extra [PAD] positions (masked out) must not change a caption's VTC embedding, whatever the pooling."""
    torch.manual_seed(0)
    model = aio.AllInOne(tiny_cfg(vtc_pool=pool)).eval()
    ids = torch.tensor([[2, 11, 12, 13, 3]])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        a = model.text_embedding(ids, torch.ones(1, 5, dtype=torch.long))
        b = model.text_embedding(padded, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if pool == "mean":  # and mean pooling is not the [CLS] feature
        model.cfg.vtc_pool = "cls"
        with torch.no_grad():
            assert not torch.allclose(model.text_embedding(ids, torch.ones(1, 5, dtype=torch.long)), a, atol=1e-4)


# --- losses ----------------------------------------------------------------------------------------------------

def test_vtc_loss_matches_naive_reference():
    torch.manual_seed(0)
    t = F.normalize(torch.randn(6, 8), dim=-1)
    v = F.normalize(torch.randn(6, 8), dim=-1)
    tau = 0.05
    ref = 0.0
    for i in range(6):  # text i against every video, and video i against every text
        row = torch.tensor([float(t[i] @ v[j]) / tau for j in range(6)])
        col = torch.tensor([float(t[j] @ v[i]) / tau for j in range(6)])
        ref += -(row[i] - torch.logsumexp(row, 0)) / 6 - (col[i] - torch.logsumexp(col, 0)) / 6
    assert abs(aio.vtc_loss(t, v, tau).item() - float(ref)) < 1e-4


def test_mc_metrics_give_ties_half_credit():
    scores = torch.tensor([[3.0, 1.0, 0.0],    # truth 0 wins, against its reversal 1 too
                           [2.0, 2.0, 0.0],    # truth 0 tied with its reversal 1: half, in both metrics
                           [1.0, 1.0, 1.0],    # truth 2 tied with every option: a third; no reversed option
                           [0.0, 5.0, 1.0]])   # truth 0 loses to its reversal 1
    m = aio.mc_metrics(scores, torch.tensor([0, 0, 2, 0]), torch.tensor([1, 1, -1, 1]))
    assert m["acc"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3 + 0) / 4)
    assert m["order_acc"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert m["order_ties"] == pytest.approx(100 / 3)


def test_mc_scores_are_fp32_under_bf16_autocast():
    # Options that differ in one word score closer than bf16 resolves: the match head must run in fp32.
    torch.manual_seed(0)
    model = aio.AllInOne(tiny_cfg(roll_tokens="fixed")).eval()  # (random slots would differ between two passes)
    ids = torch.randint(5, 50, (2, 4, 6))
    batch = dict(video=torch.randn(2, 3, 3, 32, 32), option_ids=ids, option_mask=torch.ones_like(ids))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = aio.mc_scores(model, batch)
        _, _, cls = model.forward_joint(ids.view(8, 6), torch.ones(8, 6, dtype=torch.long),
                                        batch["video"].repeat_interleave(4, dim=0))
    with torch.no_grad():
        expected = model.itm_score(cls.float())[:, 1].view(2, 4)   # the head in fp32 on the bf16 features
    assert scores.dtype == torch.float32 and cls.dtype == torch.bfloat16
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


def test_vtm_negatives_half_swapped_prefer_twin_never_self():
    g = torch.Generator().manual_seed(0)
    twin = [1, 0, -1, -1, 5, 4, -1, -1, -1, -1]
    for _ in range(20):
        idx, labels = aio.vtm_negatives(8, 10, twin, generator=g)
        assert int((labels == 0).sum()) == 4
        for i in range(8):
            if labels[i] == 1:
                assert idx[i] == i
            else:
                assert idx[i] != i and 0 <= idx[i] < 10
                if twin[i] >= 0:
                    assert idx[i] == twin[i]


def test_twin_sampler_keeps_twins_together_and_resumes_where_it_stopped():
    """Each clip's reversed twin rides as the next row of its batch; every batch is full; `skip` continues the same
    stream (--resume); another seed (another rank) draws another stream."""
    twin = [1, 0, -1, 4, 3, -1, -1, 8, 7, -1, -1, 12, 11, -1]    # pairs (0, 1), (3, 4), (7, 8), (11, 12)

    def stream(seed, n, skip=0, twins=True):
        sampler = aio.TwinBatchSampler(twin, 4, twins, seed)
        sampler.skip = skip
        return [b for b, _ in zip(sampler, range(n))]
    batches = stream(0, 17)                                          # several epochs of 3 or 4 batches
    for b in batches:
        assert 3 <= len(b) <= 4 and len(set(b)) == len(b)            # a pair never split: a batch may hold 3
        for r, i in enumerate(b):
            if twin[i] >= 0:
                assert abs(b.index(twin[i]) - r) == 1
    assert stream(0, 12, skip=5) == batches[5:]
    assert stream(1, 17) != batches
    assert all(len(b) == 4 for b in stream(0, 12, twins=False))


def test_decode_clip_raises_for_an_unreadable_clip_each_time_and_reads_it_once(tmp_path, monkeypatch):
    """With cache_videos, a clip that cannot be read is tried once (ClipCache keeps the failure) and named again,
    as a VideoReadError, each time it is drawn; the collate then drops it."""
    from common.video import ClipCache, VideoReadError
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    monkeypatch.setattr(aio, "CLIP_CACHE", ClipCache())
    reads = []
    real_meta = aio.video_meta
    monkeypatch.setattr(aio, "video_meta", lambda path: reads.append(path) or real_meta(path))
    cfg = tiny_cfg(cache_videos=True)
    for _ in range(2):
        with pytest.raises(VideoReadError, match="broken.mp4"):
            aio.decode_clip(str(broken), cfg, train=True, rng=random.Random(0))
    assert reads == [str(broken)]
    item = aio.ClipTextDataset([dict(path=str(broken), text="a clip")], cfg, train=True)[0]
    assert item["bad_video"] == str(broken) and "broken.mp4" in item["error"]
    with pytest.raises(VideoReadError):  # without the cache too
        aio.decode_clip(str(broken), tiny_cfg(cache_videos=False), train=False)


@pytest.fixture
def small_tokenizer(tmp_path):
    words = ["a", "red", "circle", "moves", "left", "big", "blue", "square", "slides", "right", "on", "grass"]
    build_vocab([" ".join(words)], tmp_path / "vocab.txt")
    return Tokenizer(str(tmp_path / "vocab.txt")), words


def test_pretrain_collate_masking_statistics(small_tokenizer):
    tok, words = small_tokenizer
    cfg = tiny_cfg(vocab_size=tok.vocab_size, max_text_len=24, joint_fraction=0.5)
    rng = random.Random(0)
    items = [dict(video=torch.zeros(3, 3, 32, 32), text=" ".join(rng.choice(words) for _ in range(20)), index=i,
                  twin=-1) for i in range(200)]
    torch.manual_seed(0)
    batch = aio.Collate(tok, cfg, "pretrain")(items)
    ids, labels, masked = batch["text_ids"], batch["mlm_labels"], batch["mlm_ids"]
    picked = labels != -100
    words_per_row = (batch["text_mask"].sum(1) - 2).float()  # every word is one token in this vocab
    assert torch.all(picked.sum(1) == torch.round(0.15 * words_per_row))  # 15% of the words of each caption
    assert torch.equal(labels[picked], ids[picked])                      # labels are the original tokens
    assert not picked[:, 0].any() and not picked[batch["text_mask"] == 0].any()  # no [CLS], no pads
    n = picked.sum().item()
    frac_mask = (masked[picked] == tok.mask_id).float().mean().item()
    frac_same = (masked[picked] == ids[picked]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.05 and 0.05 < frac_same < 0.16, (n, frac_mask, frac_same)
    assert torch.equal(masked[~picked], ids[~picked])
    assert batch["vtm_labels"].shape[0] == 100 and int((batch["vtm_labels"] == 0).sum()) == 50


# --- sizes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,paper", [("Ti", 12e6), ("S", 33e6), ("B", 110e6)])
def test_paper_parameter_counts(preset, paper):
    """Backbone + text embeddings (+ pooler) vs. the paper's 12M / 33M / 110M, counted on the meta device."""
    cfg = aio.Config(**aio.PRESETS[preset])
    with torch.device("meta"):
        model = aio.AllInOne(cfg)
    n = aio.backbone_parameters(model)
    assert abs(n / paper - 1) < 0.05, n
    # the untied MLM decoder of B alone is 768 x 30522 (~23.4M), outside the paper's count
    assert model.mlm_decoder.weight.numel() == cfg.width * 30522


# --- end to end --------------------------------------------------------------------------------------------------

def read_log(path):
    return [json.loads(line) for line in open(path)]


def test_pretrain_then_resume_end_to_end(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    common = ["--tiny", f"--data_root={tiny_corpus}", f"--out_dir={out}", "--img_size=32", "--max_eval_items=16"]
    m = aio.main(common + ["--max_steps=2"])
    for key in ("retrieval/t2v_R@1", "retrieval/t2v_R@5", "retrieval/t2v_MdR", "mc/acc", "mc_order/acc",
                "mlm_motion/acc"):
        assert key in m
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2
    m2 = aio.main(common + ["--max_steps=4", "--resume"])
    ck2 = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck2["step"] == 4
    steps = [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the resumed run continued the step counter
    assert not torch.equal(ck["model"]["itm_score.weight"], ck2["model"]["itm_score.weight"])
    assert json.load(open(out / "metrics.json")).keys() == m2.keys()


@pytest.fixture(scope="module")
def pretrained(tiny_corpus, tmp_path_factory):
    """A one-step pre-trained tiny model, shared by the fine-tuning tests."""
    pre = tmp_path_factory.mktemp("aio_pre")
    aio.main(["--tiny", f"--data_root={tiny_corpus}", f"--out_dir={pre}", "--img_size=32", "--max_steps=1",
              "--max_eval_items=8"])
    return pre / "ckpt.pt"


@pytest.mark.parametrize("task", ["qa", "mc", "retrieval", "action", "action_video", "action_frames"])
def test_finetune_runs(tiny_corpus, pretrained, tmp_path, task):
    extra = [f"--probe_features={task.split('_')[1]}"] if "_" in task else []
    task = task.split("_")[0]
    m = aio.main(["--tiny", f"--data_root={tiny_corpus}", f"--out_dir={tmp_path / task}", f"--finetune={task}",
                  f"--init={pretrained}", "--max_steps=2", "--max_eval_items=8", *extra])
    key = {"qa": "qa/acc", "mc": "mc/acc", "retrieval": "retrieval/t2v_R@1", "action": "action/acc"}[task]
    assert 0.0 <= m[key] <= 100.0
    assert (tmp_path / task / "metrics.json").exists()


# --- distributed: the gathered contrastive loss equals the single-process one ------------------------------------

def _ddp_worker(rank, world, port, batch, results):
    import os
    import torch.distributed as torch_dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = aio.AllInOne(tiny_cfg(vtm_weight=0.0, mlm_weight=0.0, roll_tokens="fixed"))
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    b = len(batch["video"]) // world
    local = {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}
    out = ddp(local, "pretrain")
    out["loss"].backward()
    results[rank] = {"loss": out["loss"].item(), "grad": model.transformer.patch_embed.proj.weight.grad.clone()}
    torch_dist.destroy_process_group()


def test_ddp_vtc_matches_single_process():
    import socket
    import torch.multiprocessing as mp
    torch.manual_seed(1)
    B = 6
    batch = dict(video=torch.randn(B, 3, 3, 32, 32), text_ids=torch.randint(5, 50, (B, 7)),
                 text_mask=torch.ones(B, 7, dtype=torch.long))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, batch, results), nprocs=2, join=True)
    torch.manual_seed(0)
    model = aio.AllInOne(tiny_cfg(vtm_weight=0.0, mlm_weight=0.0, roll_tokens="fixed"))
    out = model(batch, "pretrain")  # one process, the whole batch: the same negatives
    out["loss"].backward()
    grad = model.transformer.patch_embed.proj.weight.grad
    for r in range(2):  # equal up to float summation order (tolerance relative to the gradient's scale)
        assert abs(results[r]["loss"] - out["loss"].item()) < 1e-4
        torch.testing.assert_close(results[r]["grad"], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())


def test_malformed_annotation_rows_name_file_and_line(tmp_path):
    from common.annotations import set_strict, skipped_rows
    (tmp_path / "qa.jsonl").write_text('{"video_id": "video1", "question": "q", "answer": "a"}\n{"video_id": \n')
    (tmp_path / "webvid").mkdir()
    (tmp_path / "webvid" / "results_train.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n1,u,PT00H00M02S,1_50,a red ball\n2,u,PT00H00M02S\n")
    try:
        set_strict(False)  # the default: the bad row is skipped, counted and named
        assert len(aio.read_jsonl(tmp_path / "qa.jsonl")) == 1
        assert [r["id"] for r in aio.read_webvid(tmp_path, "train")] == ["1"]
        assert [m.split(":")[0] for m in skipped_rows()] == [f"{tmp_path / 'qa.jsonl'}, line 2",
                                                             f"{tmp_path / 'webvid' / 'results_train.csv'}, line 3"]
        set_strict(True)  # --strict: an error naming the file and the line
        with pytest.raises(SystemExit, match=r"qa\.jsonl, line 2"):
            aio.read_jsonl(tmp_path / "qa.jsonl")
        with pytest.raises(SystemExit, match=r"results_train\.csv, line 3"):
            aio.read_webvid(tmp_path, "train")
    finally:
        set_strict(False)


# --- presets and the CPU-default vs paper table -----------------------------------------------------------------

def test_paper_preset_restores_the_release_recipe():
    cfg = aio.parse_config(aio.Config, ["--paper", "--B"], aio.PRESETS)
    assert (cfg.width, cfg.depth, cfg.heads) == (768, 12, 12)
    assert cfg.joint_fraction == 1.0 and cfg.vtc_weight == 0.0 and cfg.vtc_pool == "cls"
    assert cfg.vtm_weight == 1.0 and cfg.mlm_weight == 1.0
    assert cfg.batch_size * cfg.grad_accum * 8 == 4096  # the release's effective batch on 8 GPUs
    assert (cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.schedule) == (1e-4, 2500, 200_000, "linear")
    assert (cfg.dropout, cfg.drop_path) == (0.1, 0.1)
    assert (cfg.probe_lr, cfg.probe_epochs) == (3e-4, 50)
    # the order of the presets does not matter: sizes set only the model
    assert aio.parse_config(aio.Config, ["--B", "--paper"], aio.PRESETS) == cfg


def test_action_probe_uses_the_probe_lr_field(monkeypatch):
    """The probe's learning rate is a field (it was a hard-coded 1e-3)."""
    cfg = tiny_cfg(probe_lr=3e-4, probe_epochs=1)
    model = aio.AllInOne(cfg)
    g = torch.Generator().manual_seed(0)
    fake = {s: (torch.randn(8, cfg.width, generator=g), torch.arange(8) % 2, 0) for s in ("train", "val", "test")}
    monkeypatch.setattr(aio, "probe_features", lambda model, cfg, tok, split, device: fake[split])
    seen = []
    real_adamw = torch.optim.AdamW

    def spy(params, lr, **kw):
        seen.append(lr)
        return real_adamw(params, lr=lr, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    aio.action_probe(model, cfg, None, torch.device("cpu"), 2)
    assert seen == [3e-4]


def test_docstring_table_lists_every_field_the_paper_preset_changes():
    """The module docstring's "CPU default vs paper" table names (in backticks, first column) every field whose
    CPU default differs from the paper preset, so a reader sees each departure in one place."""
    import dataclasses
    import re
    from common.config import parse_config
    default, paper = aio.Config(), parse_config(aio.Config, ["--paper", "--B"], aio.PRESETS)
    changed = {f.name for f in dataclasses.fields(default) if getattr(default, f.name) != getattr(paper, f.name)}
    rows = [line.split("|")[1] for line in aio.__doc__.splitlines() if line.startswith("| `")]
    listed = {name for cell in rows for name in re.findall(r"`(\w+)`", cell)}
    assert changed - {"device", "out_dir", "data_root"} <= listed, sorted(changed - listed)


@pytest.mark.parametrize("captions,views", [("first", 1), ("all", 1), ("first", 2)])
def test_retrieval_protocol_matches_a_naive_reference(tiny_corpus, captions, views):
    """Same protocol fields as oa_trans.py: retrieval_captions=first (default: one caption per video, MSR-VTT 1k-A
    style) | all; retrieval_views=V averages the similarities of V random frame samplings (the release: 3)."""
    from common.metrics import retrieval_metrics
    assert aio.Config().retrieval_captions == "first" and aio.Config().retrieval_views == 1
    cfg = tiny_cfg(data_root=str(tiny_corpus), num_frames=2, precision="fp32", eval_batch_size=7,
                   retrieval_captions=captions, retrieval_views=views, roll_tokens="fixed")
    tok = Tokenizer(str(tiny_corpus / "vocab.txt"))
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = aio.AllInOne(cfg).eval()
    got, skipped, n = aio.evaluate_retrieval(model, cfg, tok, "test", torch.device("cpu"))
    items = aio.build_task_items(cfg, "retrieval", "test")
    assert skipped == 0 and n == len(items)
    with torch.no_grad():
        sims = []
        for view in ([None] if views == 1 else range(views)):
            vids = []
            for i, it in enumerate(items):
                rng = None if view is None else random.Random(f"{cfg.seed}/{view}/{i}")
                video = aio.decode_clip(it["path"], cfg, False, rng=rng, sample="uniform" if view is None else "rand")
                vids.append(model.video_embedding(video[None])[0])
            queries = [(t, i) for i, it in enumerate(items)
                       for t in (it["text"] if captions == "all" else it["text"][:1])]
            texts = []
            for t, _ in queries:
                enc = tok([t], cfg.max_text_len, pad_to_max=False)
                texts.append(model.text_embedding(enc["input_ids"], enc["attention_mask"])[0])
            sims.append(torch.stack(texts) @ torch.stack(vids).t())
    expected = retrieval_metrics(torch.stack(sims).mean(0), torch.tensor([i for _, i in queries]))
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k


def test_vtc_loss_rejects_unequal_texts_and_videos():
    with pytest.raises(ValueError, match="as many texts as videos"):
        aio.vtc_loss(F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1), 0.05)


def test_the_idea_comes_first_and_main_tells_the_story():
    """The file's reading order (issue 27): the paper's idea (temporal token rolling) starts within the first ~300
    lines, before the model, the losses and the data; main() stays at most 100 lines."""
    import inspect
    line = lambda f: inspect.getsourcelines(f)[1]
    assert line(aio.roll_band) < 300
    assert line(aio.roll_band) < line(aio.AllInOne) < line(aio.vtc_loss) < line(aio.read_webvid) < line(aio.main)
    assert len(inspect.getsourcelines(aio.main)[0]) <= 100
