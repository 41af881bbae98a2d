"""Metrics against naive Python-loop references and hand-worked examples.

Run: python -m pytest -q tests/test_metrics.py

The references sort each query's items with the key (-score, is_correct) / (-score, relevance): ties put the
correct / more relevant items last, which is the pessimistic rule stated in common/metrics.py.
Random matrices are drawn from a handful of integer levels so that ties are frequent and the rule is exercised.
"""
import math
import statistics

import pytest
import torch

from common.metrics import accuracy, map_relevancy, multilabel_map, ndcg_relevancy, retrieval_metrics


# ----------------------------------------------------------------------------------------------- naive references

def naive_first_correct_rank(scores: list[float], correct: list[bool]) -> int:
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], correct[j]))
    return next(pos + 1 for pos, j in enumerate(order) if correct[j])


def naive_summary(ranks: list[int], prefix: str) -> dict:
    out = {f"{prefix}_R@{k}": 100.0 * sum(r <= k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    out[f"{prefix}_MdR"] = float(statistics.median(ranks))
    out[f"{prefix}_MnR"] = sum(ranks) / len(ranks)
    return out


def naive_retrieval(sim: list[list[float]], gt: list[int]) -> dict:
    T, V = len(sim), len(sim[0])
    t2v = [naive_first_correct_rank(sim[i], [j == gt[i] for j in range(V)]) for i in range(T)]
    v2t = []
    for v in range(V):
        correct = [gt[i] == v for i in range(T)]
        if any(correct):
            v2t.append(naive_first_correct_rank([sim[i][v] for i in range(T)], correct))
    return {**naive_summary(t2v, "t2v"), **naive_summary(v2t, "v2t")}


def naive_ap(scores: list[float], relevant: list[bool], gain: list[float] | None = None) -> float | None:
    """AP with P@k = (sum of gain over the top k) / k; gain = the 0/1 hits unless given (EPIC's graded relevancy)."""
    if not any(relevant):
        return None
    gain = gain or [float(r) for r in relevant]
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], relevant[j], gain[j]))
    hits, total = 0.0, 0.0
    for k, j in enumerate(order, start=1):
        hits += gain[j]
        if relevant[j]:
            total += hits / k
    return total / sum(relevant)


def naive_map(sim, rel, precision="graded") -> float:
    aps = [naive_ap(row, [r == 1 for r in rel_row], rel_row if precision == "graded" else None)
           for row, rel_row in zip(sim, rel)]
    aps = [a for a in aps if a is not None]
    return 100.0 * sum(aps) / len(aps)


def naive_ndcg(sim, rel) -> float:
    values = []
    for row, rel_row in zip(sim, rel):
        k_q = sum(r > 0 for r in rel_row)
        if k_q == 0:
            continue
        order = sorted(range(len(row)), key=lambda j: (-row[j], rel_row[j]))
        dcg = sum(rel_row[order[r - 1]] / math.log2(r + 1) for r in range(1, k_q + 1))
        ideal = sorted(rel_row, reverse=True)
        idcg = sum(ideal[r - 1] / math.log2(r + 1) for r in range(1, k_q + 1))
        values.append(dcg / idcg)
    return 100.0 * sum(values) / len(values)


def naive_multilabel_map(scores, labels) -> float:
    N, C = len(scores), len(scores[0])
    unlabeled = [not any(labels[n]) for n in range(N)]
    aps = []
    for c in range(C):
        column = [float("-inf") if unlabeled[n] else scores[n][c] for n in range(N)]
        ap = naive_ap(column, [labels[n][c] == 1 for n in range(N)])
        if ap is not None:
            aps.append(ap)
    return 100.0 * sum(aps) / len(aps)


def assert_dicts_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


# ----------------------------------------------------------------------------------------------- retrieval

def test_retrieval_hand_worked_3x3():
    sim = torch.tensor([[0.9, 0.1, 0.2],
                        [0.3, 0.2, 0.8],
                        [0.1, 0.5, 0.4]])
    m = retrieval_metrics(sim, torch.arange(3))
    # t2v: text0 -> video0 first (rank 1); text1: 0.8, 0.3 beat 0.2 (rank 3); text2: 0.5 beats 0.4 (rank 2)
    assert m["t2v_R@1"] == pytest.approx(100 / 3)
    assert m["t2v_R@5"] == 100.0 and m["t2v_MdR"] == 2.0 and m["t2v_MnR"] == pytest.approx(2.0)
    # v2t: column 0 -> text0 first (1); column 1: 0.5 beats 0.2 (2); column 2: 0.8 beats 0.4 (2)
    assert m["v2t_R@1"] == pytest.approx(100 / 3)
    assert m["v2t_MdR"] == 2.0 and m["v2t_MnR"] == pytest.approx(5 / 3)


def test_retrieval_ties_are_pessimistic():
    m = retrieval_metrics(torch.zeros(4, 4), torch.arange(4))  # a collapsed model: every score equal
    assert m["t2v_R@1"] == 0.0 and m["t2v_MdR"] == 4.0 and m["v2t_R@1"] == 0.0 and m["v2t_MnR"] == 4.0


def test_retrieval_several_captions_hand_worked():
    # texts 0,1 describe video 0; texts 2,3 describe video 1
    sim = torch.tensor([[0.1, 0.9],    # text0: wrong video wins -> rank 2
                        [0.8, 0.2],    # text1: rank 1
                        [0.7, 0.6],    # text2: rank 2
                        [0.0, 0.5]])   # text3: rank 1
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1, 1]))
    assert m["t2v_R@1"] == 50.0 and m["t2v_MnR"] == 1.5 and m["t2v_MdR"] == 1.5
    # v2t video0: column [0.1, 0.8, 0.7, 0.0]: its best caption (text1, 0.8) is first -> rank 1
    # v2t video1: column [0.9, 0.2, 0.6, 0.5]: text0 (0.9) beats its best caption (text2, 0.6) -> rank 2
    assert m["v2t_R@1"] == 50.0 and m["v2t_MnR"] == 1.5
    # a video's own captions tying with each other do not push it down
    m = retrieval_metrics(torch.tensor([[0.5, 0.1], [0.5, 0.1], [0.2, 0.3]]), torch.tensor([0, 0, 1]))
    assert m["v2t_R@1"] == 100.0


def test_retrieval_skips_videos_without_captions_in_v2t():
    sim = torch.tensor([[0.9, 0.1, 0.95], [0.2, 0.8, 0.1]])  # video 2 has no caption: a pure distractor
    m = retrieval_metrics(sim, torch.tensor([0, 1]))
    assert m["t2v_R@1"] == 50.0          # text0 loses to the distractor
    assert m["v2t_R@1"] == 100.0         # only videos 0 and 1 are v2t queries


@pytest.mark.parametrize("levels", [5, None])  # 5 integer levels -> many ties; None -> continuous scores
def test_retrieval_matches_naive_reference(levels):
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        V = 12 + trial
        per_video = torch.randint(1, 4, (V,), generator=g)             # 1..3 captions per video
        gt = torch.repeat_interleave(torch.arange(V), per_video)
        gt = gt[torch.randperm(len(gt), generator=g)]                  # captions not blocked by video
        sim = torch.rand(len(gt), V, generator=g)
        if levels:
            sim = (sim * levels).floor() / levels
        assert_dicts_close(retrieval_metrics(sim, gt), naive_retrieval(sim.tolist(), gt.tolist()))


def test_retrieval_bf16_input_is_computed_in_high_precision():
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(20, 20, generator=g).bfloat16()
    gt = torch.arange(20)
    assert_dicts_close(retrieval_metrics(sim, gt), naive_retrieval(sim.double().tolist(), gt.tolist()))


def test_nan_is_refused():
    with pytest.raises(ValueError):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), torch.arange(2))


# ----------------------------------------------------------------------------------------------- accuracy

def test_accuracy():
    assert accuracy(torch.tensor([1, 2, 0, 0]), torch.tensor([1, 2, 1, 0])) == 75.0
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0]])
    assert accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(200 / 3)
    target = torch.tensor([1, -100, 0, -100])
    pred = torch.tensor([1, 0, 1, 0])
    assert accuracy(pred, target) == 25.0                      # -100 counted as wrong by default
    assert accuracy(pred, target, ignore_index=-100) == 50.0   # or left out when asked


# ----------------------------------------------------------------------------------------------- EPIC-MIR mAP / nDCG

def test_map_hand_worked():
    # ranks 1..4 with relevancy 1, 0.5, 1, 0; relevant (== 1) at ranks 1 and 3.
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    rel = torch.tensor([[1.0, 0.5, 1.0, 0.0]])
    # binary hits: AP = (1/1 + 2/3) / 2; the 0.5 item is not a hit
    assert map_relevancy(sim, rel, precision="binary") == pytest.approx(100 * (1 + 2 / 3) / 2)
    # the release (utils/mAP.py): P@3 = (1 + 0.5 + 1) / 3, the graded sum -> AP = (1/1 + 2.5/3) / 2 = 91.67
    assert map_relevancy(sim, rel) == pytest.approx(100 * (1 + 2.5 / 3) / 2)
    assert map_relevancy(sim, rel, precision="graded") == pytest.approx(91.6666667)
    # two 0.5 items above the only relevant one: release P@3 = 2/3, binary 1/3
    rel2 = torch.tensor([[0.5, 0.5, 1.0, 0.0]])
    assert map_relevancy(sim, rel2) == pytest.approx(100 * 2 / 3)
    assert map_relevancy(sim, rel2, precision="binary") == pytest.approx(100 / 3)
    # tie between a relevant and a non-relevant item: the relevant one goes second -> AP = 1/2
    assert map_relevancy(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]])) == pytest.approx(50.0)
    # tie between a 0.5 and a 0 item ahead of a hit: the 0.5 goes second (pessimistic), P@3 = 1.5 / 3 either way
    assert map_relevancy(torch.tensor([[0.5, 0.5, 0.4]]), torch.tensor([[0.5, 0.0, 1.0]])) == pytest.approx(50.0)
    # a row without relevant items is skipped, not counted as 0
    two_rows = map_relevancy(torch.tensor([[0.9, 0.1], [0.9, 0.1]]), torch.tensor([[1.0, 0.0], [0.3, 0.0]]))
    assert two_rows == pytest.approx(100.0)


def release_map(sim, rel) -> float:
    """The release's formula (EgoVLP utils/mAP.py) restated with numpy: cumulative *graded* relevancy at the
    ranks where relevancy == 1, over k, summed, over #relevant; mean over rows (here every row has a hit)."""
    import numpy as np
    order = np.argsort(-sim, axis=1, kind="stable")
    ranked = np.take_along_axis(rel, order, axis=1)
    cum = np.cumsum(ranked, axis=1) * (ranked == 1)
    return 100.0 * float(np.mean((cum / np.arange(1, rel.shape[1] + 1)).sum(1) / (ranked == 1).sum(1)))


def test_map_matches_the_release_formula_on_continuous_scores():
    g = torch.Generator().manual_seed(5)
    sim = torch.rand(12, 20, generator=g, dtype=torch.float64)  # no ties
    rel = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)[torch.randint(0, 5, (12, 20), generator=g)]
    rel[:, 0] = 1.0  # every row has a hit (the release's mean would be NaN otherwise)
    assert map_relevancy(sim, rel) == pytest.approx(release_map(sim.numpy(), rel.numpy()))
    assert map_relevancy(sim, rel, precision="binary") < map_relevancy(sim, rel)


def test_ndcg_hand_worked():
    # rel (0.5, 1, 0), ranked in that order; K_q = 2
    dcg = 0.5 / math.log2(2) + 1.0 / math.log2(3)
    idcg = 1.0 / math.log2(2) + 0.5 / math.log2(3)
    got = ndcg_relevancy(torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[0.5, 1.0, 0.0]]))
    assert got == pytest.approx(100 * dcg / idcg)
    assert ndcg_relevancy(torch.tensor([[0.1, 0.9, 0.0]]), torch.tensor([[0.5, 1.0, 0.0]])) == pytest.approx(100.0)


@pytest.mark.parametrize("levels", [4, None])
def test_map_and_ndcg_match_naive_reference(levels):
    g = torch.Generator().manual_seed(2)
    for trial in range(4):
        Q, I = 9 + trial, 15
        sim = torch.rand(Q, I, generator=g)
        if levels:
            sim = (sim * levels).floor()
        # graded relevance in {0, 0.25, 0.5, 1}, some rows all zero
        rel = torch.tensor([0.0, 0.25, 0.5, 1.0])[torch.randint(0, 4, (Q, I), generator=g)]
        rel[0] = 0.0
        rel[1] = rel[1].clamp(max=0.5)  # a row with graded relevance but nothing == 1
        for chunk in (1024, 4):          # the row chunking must not change the result
            for precision in ("graded", "binary"):
                assert map_relevancy(sim, rel, precision, chunk=chunk) == pytest.approx(
                    naive_map(sim.tolist(), rel.tolist(), precision))
            assert ndcg_relevancy(sim, rel, chunk=chunk) == pytest.approx(naive_ndcg(sim.tolist(), rel.tolist()))


def test_map_raises_without_relevant_items():
    with pytest.raises(ValueError):
        map_relevancy(torch.rand(3, 3), torch.full((3, 3), 0.5))
    with pytest.raises(ValueError):
        ndcg_relevancy(torch.rand(3, 3), torch.zeros(3, 3))


# ----------------------------------------------------------------------------------------------- Charades mAP

def test_multilabel_map_hand_worked():
    scores = torch.tensor([[0.9, 0.1],
                           [0.8, 0.7],
                           [0.2, 0.6],
                           [0.95, 0.99]])   # the last video has no label at all
    labels = torch.tensor([[1, 0],
                           [0, 1],
                           [1, 0],
                           [0, 0]])
    # class 0 (unlabeled video sunk to the bottom): order 0.9(+) 0.8(-) 0.2(+) -> AP = (1 + 2/3) / 2
    # class 1: order 0.7(+) 0.6(-) 0.1(-) -> AP = 1
    assert multilabel_map(scores, labels) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)
    # a class with no positive is left out of the mean
    labels3 = torch.cat([labels, torch.zeros(4, 1, dtype=torch.long)], dim=1)
    scores3 = torch.cat([scores, torch.rand(4, 1)], dim=1)
    assert multilabel_map(scores3, labels3) == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1) / 2)


@pytest.mark.parametrize("levels", [3, None])
def test_multilabel_map_matches_naive_reference(levels):
    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        N, C = 20, 7
        scores = torch.rand(N, C, generator=g)
        if levels:
            scores = (scores * levels).floor()
        labels = (torch.rand(N, C, generator=g) < 0.2).long()
        labels[:3] = 0  # some unlabeled videos
        got = multilabel_map(scores, labels)
        assert got == pytest.approx(naive_multilabel_map(scores.tolist(), labels.tolist()))
