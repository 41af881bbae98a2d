"""The measuring parts of the two scripts beside the tests: tests/bench.py (op shares from torch.profiler) and
tests/probe_order.py (the supervised order test's accuracies). The scripts themselves are run by hand (README)."""
import torch

from tests import bench, probe_order


def test_op_shares_put_a_matmul_only_step_in_the_matmul_group():
    a = torch.randn(256, 256)
    shares = bench.op_shares(lambda: torch.mm(a, a), n=2)
    assert set(shares) == {*bench.OP_GROUPS, "other"}
    assert abs(sum(shares.values()) - 100) < 1e-6
    assert shares["matmul"] > 90 and shares["gelu"] == 0 and shares["attention"] == 0


def test_op_shares_see_gelu_and_attention():
    x = torch.randn(4, 2, 64, 32)
    step = lambda: (torch.nn.functional.gelu(x), torch.nn.functional.scaled_dot_product_attention(x, x, x))
    shares = bench.op_shares(step, n=2)
    assert shares["gelu"] > 0 and shares["attention"] > 0 and shares["matmul"] == 0


# tests/probe_order.py's motion classes: 0 left, 1 right, 2 up, 3 down, 4 growing, 5 shrinking, 6 appearing,
# 7 disappearing, 8 staying still


def classifier_of(table):
    """A 'model' whose logits for clip i are table[i] (the clip's index rides in its first pixel)."""
    return lambda v: table[v[:, 0, 0, 0, 0].long()]


def test_pair_accuracy_is_the_truth_against_its_reversal_only():
    y = torch.tensor([0, 1, 4, 5, 8])
    x = torch.zeros(5, 3, 3, 2, 2)
    x[:, :, 0, 0, 0] = torch.arange(5.0)[:, None]  # the same index in every frame: reversal keeps it
    table = torch.full((5, 9), -1.0)
    table[0, 1], table[0, 0] = 2.0, 1.0   # wrong: prefers its reversal
    table[1, 1], table[1, 0] = 1.0, 0.0   # right
    table[2, 8], table[2, 4] = 5.0, 1.0   # wrong overall, yet the truth beats its reversal (shrinking, -1)
    table[3, 5] = 1.0                      # right
    table[4, 8] = 1.0                      # right, no partner: not in the pair accuracy
    out = probe_order.test_classifier(classifier_of(table), x, y, "fp32")
    assert round(out["acc"], 3) == 60 and round(out["acc_reversed"], 3) == 60
    assert out["n_pair"] == 4 and round(out["pair"], 3) == 75
    assert out["by_pair"] == {"moving left/moving right": 50, "growing/shrinking": 100}


def test_a_classifier_that_reads_the_direction_loses_it_on_reversed_clips():
    y = torch.tensor([0, 1])
    x = torch.zeros(2, 3, 3, 2, 2)
    x[0, :, 0, 0, 1] = torch.tensor([0.0, 1.0, 2.0])   # rising over time
    x[1, :, 0, 0, 1] = torch.tensor([2.0, 1.0, 0.0])   # falling
    rising = lambda v: (v[:, -1, 0, 0, 1] - v[:, 0, 0, 0, 1])
    logits = lambda v: torch.stack([rising(v), -rising(v), *[torch.zeros(len(v))] * 7], 1)
    out = probe_order.test_classifier(logits, x, y, "fp32")
    assert round(out["acc"], 3) == 100 and round(out["pair"], 3) == 100 and out["acc_reversed"] == 0


def square_clip(motion, F=12, S=32):
    """A white 6-px square on black doing `motion` (a class index) over F frames: uint8 (F, S, S, 3)."""
    frames = torch.zeros(F, S, S, 3, dtype=torch.uint8)
    for f in range(F):
        u = f / (F - 1)
        x = y = 13.0
        size = 6
        if motion in (0, 1):
            x = 22 - 14 * u if motion == 0 else 8 + 14 * u
        if motion in (2, 3):
            y = 22 - 14 * u if motion == 2 else 8 + 14 * u   # up = towards row 0
        if motion in (4, 5):
            size = round(4 + 8 * (u if motion == 4 else 1 - u))
        if (motion == 6 and u < 0.5) or (motion == 7 and u >= 0.5):
            continue
        frames[f, int(y):int(y) + size, int(x):int(x) + size] = 255
    return frames


def motion_of(video):
    """The motion class that a (T, 3, H, W) clip of square_clip shows, read from its pixels."""
    on = video[:, 0] > 0                                             # (T, H, W) where the square is
    area = on.flatten(1).sum(1).float()
    if area[0] == 0 or area[-1] == 0:
        return 6 if area[0] == 0 else 7
    if abs(area[-1] - area[0]) > 8:
        return 4 if area[-1] > area[0] else 5
    rows, cols = torch.arange(on.shape[1]).float(), torch.arange(on.shape[2]).float()
    cx = [(on[t].float().sum(0) * cols).sum() / area[t] for t in (0, -1)]
    cy = [(on[t].float().sum(1) * rows).sum() / area[t] for t in (0, -1)]
    if abs(cx[1] - cx[0]) > 2:
        return 0 if cx[1] < cx[0] else 1
    if abs(cy[1] - cy[0]) > 2:
        return 2 if cy[1] < cy[0] else 3
    return 8


def test_every_training_symmetry_maps_the_clip_and_its_label_alike():
    frames = torch.stack([square_clip(m) for m in range(9) for _ in range(40)])   # 40 copies of each motion
    labels = torch.arange(9).repeat_interleave(40)
    assert [motion_of(probe_order.motion_batch(square_clip(m)[None], torch.tensor([m]), 3)[0][0])
            for m in range(9)] == list(range(9))                                 # the reader reads the clips
    video, out = probe_order.motion_batch(frames, labels, 3, torch.Generator().manual_seed(0), augment=True)
    assert (out != labels).float().mean() > 0.3                                   # the symmetries did act
    assert [motion_of(v) for v in video] == out.tolist()                          # ... and the labels followed


def test_a_clip_played_backwards_swaps_every_motion_with_its_reversal():
    # reversing a "moves left" clip gives frames whose object moves right, and so on for every pair
    for m in range(9):
        video, _ = probe_order.motion_batch(square_clip(m)[None], torch.tensor([m]), 3)
        assert motion_of(video[0].flip(0)) == probe_order.REVERSED[m]
