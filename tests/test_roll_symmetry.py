"""Where All-in-one's joint pass can see the order of frames (issue 15, deliverable 2).

Reversing a clip's frames while exchanging each frame's forward band (the slots rolled to t+1) with its backward
band (the slots rolled to t-1) leaves the joint pass unchanged when the temporal embedding is zero: a token's
content then says nothing about which way it travels. With roll_tokens="random" every slot order is equally likely
and the exchange is a bijection on slot orders, so a clip and its reversal give the same distribution of joint
features: rolling itself carries no order; only the learned temporal embedding (zero at init) does.

    python -m pytest -q tests/test_roll_symmetry.py
"""
import pytest
import torch

import all_in_one as aio

B, T, N = 2, 3, 16


def model_with_large_weights():
    torch.manual_seed(0)
    cfg = aio.Config(width=32, depth=3, heads=2, vocab_size=50, embed_dim=8, img_size=64, patch_size=16, num_frames=T,
                     temporal="roll", roll_tokens="random")
    model = aio.AllInOne(cfg).eval()
    for p in model.parameters():  # large random weights: a strongly non-linear model, where differences show
        if p.ndim >= 2:
            p.data.normal_(0, 0.3)
    model.transformer.temporal_embed.data.zero_()  # as initialised
    return model


def joint_cls(model, ids, video, perm, monkeypatch):
    """The pooled [CLS] of the joint pass with video_tokens's random slot order forced to `perm` (B, T, N)."""
    values = torch.empty(B, T, N).scatter_(-1, perm, torch.arange(N, dtype=torch.float).expand(B, T, N))
    with monkeypatch.context() as m:
        m.setattr(aio.torch, "rand", lambda *a, **kw: values.clone())  # argsort(values) == perm
        with torch.no_grad():
            return model.forward_joint(ids, torch.ones_like(ids), video)[2]


def test_rolling_is_blind_to_the_direction_of_time_without_the_temporal_embedding(monkeypatch):
    model = model_with_large_weights()
    torch.manual_seed(1)
    video, ids = torch.randn(B, T, 3, 64, 64), torch.randint(5, 50, (B, 8))
    perm = torch.rand(B, T, N).argsort(-1)
    k = max(1, int(N * model.cfg.roll_fraction / 2))  # patch slots 1..k roll to t+1, the last k to t-1
    swapped = perm.flip(1).clone()                     # the reversed clip's frame t is the clip's frame T-1-t
    swapped[..., :k], swapped[..., N - k:] = perm.flip(1)[..., N - k:], perm.flip(1)[..., :k]

    forward = joint_cls(model, ids, video, perm, monkeypatch)
    reversed_ = joint_cls(model, ids, video.flip(1), swapped, monkeypatch)
    other_slots = joint_cls(model, ids, video.flip(1), perm.flip(1), monkeypatch)
    assert (forward - other_slots).abs().max() > 1e-2  # the slot order matters to this model ...
    assert (forward - reversed_).abs().max() < 1e-4    # ... but with the bands exchanged, reversal changes nothing

    model.transformer.temporal_embed.data.normal_(0, 0.3)  # a learned temporal embedding breaks the symmetry
    assert (joint_cls(model, ids, video, perm, monkeypatch)
            - joint_cls(model, ids, video.flip(1), swapped, monkeypatch)).abs().max() > 1e-2


def test_the_time_code_tells_a_clip_from_its_reversal_at_initialisation_and_a_zero_one_does_not():
    # issue 24: from scratch, a zero temporal embedding leaves a clip and its reversal the same set of tokens for
    # the time average and for joint attention alike; time_init gives every variant the same random time code
    torch.manual_seed(1)
    video, ids = torch.randn(B, T, 3, 64, 64), torch.randint(5, 50, (B, 8))
    for temporal in ("mean", "flatten"):
        for time_init, differs in ((0.0, False), (1.0, True)):
            torch.manual_seed(0)
            cfg = aio.Config(width=32, depth=2, heads=2, vocab_size=50, embed_dim=8, img_size=64, patch_size=16,
                             num_frames=T, temporal=temporal, time_init=time_init)
            model = aio.AllInOne(cfg).eval()
            assert model.transformer.temporal_embed.std().item() == pytest.approx(time_init, abs=0.1)
            with torch.no_grad():
                fwd = model.forward_joint(ids, torch.ones_like(ids), video)[1]           # visual tokens, after norm
                bwd = model.forward_joint(ids, torch.ones_like(ids), video.flip(1))[1]
            gap = (fwd - bwd).abs().max().item()
            assert (gap > 1e-2) if differs else (gap < 1e-5), (temporal, time_init, gap)


def test_the_paper_preset_keeps_the_release_zero_time_code():
    assert aio.PRESETS["paper"]["time_init"] == 0.0 and aio.Config().time_init > 0
