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


NAMES = ["moving left", "moving right", "growing", "shrinking", "spinning"]  # spinning: no reversed partner


def classifier_of(table):
    """A 'model' whose logits for clip i are table[i] (the clip's index rides in its first pixel)."""
    return lambda v: table[v[:, 0, 0, 0, 0].long()]


def test_pair_accuracy_is_the_truth_against_its_reversal_only():
    y = torch.tensor([0, 1, 2, 3, 4])
    x = torch.zeros(5, 3, 3, 2, 2)
    x[:, :, 0, 0, 0] = torch.arange(5.0)[:, None]  # the same index in every frame: reversal keeps it
    table = torch.full((5, 5), -1.0)
    table[0, 1], table[0, 0] = 2.0, 1.0   # wrong: prefers its reversal
    table[1, 1], table[1, 0] = 1.0, 0.0   # right
    table[2, 4], table[2, 2] = 5.0, 1.0   # wrong overall, yet the truth beats its reversal (shrinking, -1)
    table[3, 3] = 1.0                      # right
    table[4, 4] = 1.0                      # right, no partner: not in the pair accuracy
    out = probe_order.test_classifier(classifier_of(table), NAMES, x, y, "fp32")
    assert round(out["acc"], 3) == 60 and round(out["acc_reversed"], 3) == 60
    assert out["n_pair"] == 4 and round(out["pair"], 3) == 75


def test_a_classifier_that_reads_the_direction_loses_it_on_reversed_clips():
    y = torch.tensor([0, 1])
    x = torch.zeros(2, 3, 3, 2, 2)
    x[0, :, 0, 0, 1] = torch.tensor([0.0, 1.0, 2.0])   # rising over time
    x[1, :, 0, 0, 1] = torch.tensor([2.0, 1.0, 0.0])   # falling
    rising = lambda v: (v[:, -1, 0, 0, 1] - v[:, 0, 0, 0, 1])
    logits = lambda v: torch.stack([rising(v), -rising(v), *[torch.zeros(len(v))] * 3], 1)
    out = probe_order.test_classifier(logits, NAMES, x, y, "fp32")
    assert round(out["acc"], 3) == 100 and round(out["pair"], 3) == 100 and out["acc_reversed"] == 0
