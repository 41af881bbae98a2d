"""Evaluation metrics shared by the three papers: retrieval recall/ranks, accuracy, EPIC-KITCHENS-100
multi-instance retrieval mAP and nDCG, and Charades-style multi-label mAP.

Conventions (every function):
- Percentages are 0-100; ranks are 1-based (rank 1 = top of the list), so MdR/MnR are "median/mean rank" as the
  papers print them (Frozen's `median(rank0) + 1`).
- Inputs may be torch tensors of any float dtype (bf16 included), on any device, or numpy arrays; everything is
  computed in float64 on the CPU, so bf16 rounding of the scores happens before, never inside, the metric.
- **Ties are broken pessimistically**: among items with exactly equal scores, the correct / relevant ones are
  placed *after* the wrong ones (for graded relevance: lower relevance first). So the rank of the first correct
  item is 1 + (number of wrong items scoring >= it).
  Why: with optimistic tie-breaking a collapsed model whose similarities are all equal scores R@1 = 100.
  The released codes differ (Frozen/OA-Trans: optimistic for t2v, averaged for v2t; EPIC's and Charades'
  scripts: whatever order `argsort` leaves); with continuous scores ties almost never happen, so the numbers
  agree with theirs except on degenerate inputs.
- A NaN score raises ValueError instead of silently ranking somewhere.

Shapes: T texts, V videos, Q queries, I items, N samples, C classes.
"""
import numpy as np
import torch


def _f64(x) -> torch.Tensor:
    """Any tensor / array -> float64 CPU tensor, refusing NaNs."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if torch.isnan(x).any():
        raise ValueError("metric input contains NaN")
    return x


def _first_correct_rank(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """(R, I) scores, (R, I) bool with >= 1 True per row -> (R,) 1-based rank of the best correct item,
    ties against the correct items: 1 + #wrong items scoring >= the best correct score."""
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (R, 1)
    return 1 + ((scores >= best) & ~correct).sum(dim=1)


def _recall_summary(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    ranks = ranks.double()
    out = {f"{prefix}_R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    out[f"{prefix}_MdR"] = float(np.median(ranks.numpy()))  # mean of the two middle ranks for an even count
    out[f"{prefix}_MnR"] = ranks.mean().item()
    return out


def retrieval_metrics(sim, text_to_video) -> dict[str, float]:
    """Text<->video retrieval: R@1/5/10 (percent), MdR, MnR in both directions.

    Args:
        sim: (T, V) similarity of every text to every video.
        text_to_video: (T,) index of the ground-truth video of each text; several texts may share a video.
    t2v: one query per text, the single correct item is its video.
    v2t: one query per video that has at least one text (others are skipped); the correct items are all of its
        texts and the rank is that of the best-ranked one (Frozen's "min rank over the ground-truth captions").
        A video's other captions never count against it.
    """
    sim = _f64(sim)
    gt = torch.as_tensor(text_to_video).to("cpu", torch.long)
    T, V = sim.shape
    assert gt.shape == (T,), f"text_to_video has shape {tuple(gt.shape)}, expected ({T},)"
    correct = torch.zeros(T, V, dtype=torch.bool)
    correct[torch.arange(T), gt] = True  # (T, V): text i's correct video

    t2v_ranks = _first_correct_rank(sim, correct)                   # (T,)
    has_text = correct.any(dim=0)                                  # (V,)
    v2t_ranks = _first_correct_rank(sim.t()[has_text], correct.t()[has_text])  # (V',)
    return {**_recall_summary(t2v_ranks, "t2v"), **_recall_summary(v2t_ranks, "v2t")}


def accuracy(pred, target, ignore_index: int | None = None) -> float:
    """Percent of correct predictions.

    Args:
        pred: (N,) predicted class ids, or (N, C) scores / logits (argmax is taken over the last dim).
        target: (N,) true class ids.
        ignore_index: targets equal to it are left out (e.g. -100 for All-in-one's out-of-vocabulary QA answers,
            which the original skips; leave None to count them as wrong, the honest number).
    """
    pred = torch.as_tensor(pred).detach().cpu()
    target = torch.as_tensor(target).detach().cpu().long()
    if pred.dim() == target.dim() + 1:
        pred = pred.float().argmax(dim=-1)
    pred = pred.long()
    assert pred.shape == target.shape, f"pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    if keep.sum() == 0:
        raise ValueError("accuracy of an empty set")
    return 100.0 * (pred[keep] == target[keep]).double().mean().item()


def _sort_desc_pessimistic(scores: torch.Tensor, tie_key: torch.Tensor) -> torch.Tensor:
    """(R, I) -> (R, I) column order: descending score; among equal scores, ascending tie_key (the relevance),
    so relevant items go last. Two stable sorts = a lexicographic sort."""
    by_key = tie_key.argsort(dim=1, stable=True)
    by_score = (-scores.gather(1, by_key)).argsort(dim=1, stable=True)
    return by_key.gather(1, by_score)


def _average_precision_rows(scores: torch.Tensor, relevant: torch.Tensor,
                            gain: torch.Tensor | None = None) -> torch.Tensor:
    """(R, I) scores and bool relevance -> (R,) AP = sum_k P@k * rel_k / #relevant; NaN for rows without any.

    P@k = (sum of `gain` over ranks 1..k) / k, with gain = the relevance itself (binary hits) unless given;
    EPIC-MIR's release passes the graded relevancy there (see map_relevancy)."""
    gain = relevant.double() if gain is None else gain
    order = _sort_desc_pessimistic(scores, gain + relevant.double())  # ties: relevant, then higher gain, last
    rel = relevant.gather(1, order).double()                                  # (R, I) relevance in rank order
    precision_at_k = gain.gather(1, order).cumsum(dim=1) / torch.arange(1, rel.shape[1] + 1, dtype=torch.float64)
    n_rel = rel.sum(dim=1)
    return (precision_at_k * rel).sum(dim=1) / n_rel  # 0/0 = NaN where n_rel == 0


def map_relevancy(sim, relevancy, precision: str = "graded", chunk: int = 1024) -> float:
    """EPIC-KITCHENS-100 multi-instance retrieval mAP (percent).

    Args:
        sim: (Q, I) scores; each row is one query (videos for V->T, texts for T->V: pass the transpose).
        relevancy: (Q, I) graded relevance in [0, 1]; an item is relevant iff its relevancy == 1 exactly.
        precision: what P@k counts in its numerator.
            "graded" (the release's `utils/mAP.py`, the number the papers quote): the *sum of the graded
                relevancies* of the top k items, so a half-relevant item (0.5) above a relevant one counts as half
                a hit: P@k = sum_{r<=k} relevancy(r) / k.
            "binary" (textbook AP): the number of items with relevancy == 1 in the top k. Never above "graded".
    Per row: rank items by descending score, AP = sum_{k: relevancy(k) == 1} P@k / #relevant; mAP = mean over the
    rows that have at least one relevant item (rows without any are skipped: their AP is 0/0; EPIC's test set has
    none; the release would return NaN). Raises ValueError if no row has a relevant item. Rows are processed
    `chunk` at a time to bound memory.
    """
    assert precision in ("graded", "binary"), precision
    sim, relevancy = _f64(sim), _f64(relevancy)
    assert sim.shape == relevancy.shape, f"sim {tuple(sim.shape)} vs relevancy {tuple(relevancy.shape)}"
    aps = torch.cat([_average_precision_rows(sim[i:i + chunk], relevancy[i:i + chunk] == 1,
                                             relevancy[i:i + chunk] if precision == "graded" else None)
                     for i in range(0, sim.shape[0], chunk)])
    aps = aps[~torch.isnan(aps)]
    if len(aps) == 0:
        raise ValueError("map_relevancy: no query has an item with relevancy == 1")
    return 100.0 * aps.mean().item()


def ndcg_relevancy(sim, relevancy, chunk: int = 1024) -> float:
    """EPIC-KITCHENS-100 multi-instance retrieval nDCG with graded relevance (percent).

    Args:
        sim: (Q, I) scores, one query per row (as in map_relevancy).
        relevancy: (Q, I) graded relevance in [0, 1].
    Per row q, with K_q = #items whose relevancy > 0:
        DCG_q  = sum_{r=1..K_q} rel(item at rank r) / log2(r + 1)
        IDCG_q = the same sum over the items sorted by relevancy (the ideal ranking)
    nDCG = mean over rows of DCG_q / IDCG_q; rows with K_q = 0 are skipped (0/0). Raises ValueError if all are.
    """
    sim, relevancy = _f64(sim), _f64(relevancy)
    assert sim.shape == relevancy.shape, f"sim {tuple(sim.shape)} vs relevancy {tuple(relevancy.shape)}"
    values = []
    for i in range(0, sim.shape[0], chunk):
        s, rel = sim[i:i + chunk], relevancy[i:i + chunk]                   # (R, I)
        k_q = (rel > 0).sum(dim=1, keepdim=True)                             # (R, 1)
        discount = 1.0 / torch.log2(torch.arange(2, rel.shape[1] + 2, dtype=torch.float64))  # rank r -> 1/log2(r+1)
        in_top_k = torch.arange(rel.shape[1]) < k_q                          # (R, I) ranks 1..K_q
        ranked = rel.gather(1, _sort_desc_pessimistic(s, rel))               # relevance in predicted order
        ideal = rel.sort(dim=1, descending=True).values                      # relevance in ideal order
        dcg = (ranked * discount * in_top_k).sum(dim=1)
        idcg = (ideal * discount * in_top_k).sum(dim=1)
        values.append(dcg[k_q[:, 0] > 0] / idcg[k_q[:, 0] > 0])
    values = torch.cat(values)
    if len(values) == 0:
        raise ValueError("ndcg_relevancy: no query has an item with relevancy > 0")
    return 100.0 * values.mean().item()


def multilabel_map(scores, labels) -> float:
    """Multi-label classification mAP, Charades(-Ego) protocol (percent).

    Args:
        scores: (N, C) score of every class for every video.
        labels: (N, C) in {0, 1}.
    For every class with at least one positive video: rank the N videos by descending score and take
    AP = sum_k P@k * pos_k / #positives; mAP = mean over those classes (classes without positives are skipped).
    As in the Charades evaluation script used by EgoVLP, videos with no label at all get score -inf for every
    class first, i.e. they sink to the bottom of every ranking (they would otherwise count as false positives).
    """
    scores, labels = _f64(scores), torch.as_tensor(labels).detach().cpu()
    assert scores.shape == labels.shape, f"scores {tuple(scores.shape)} vs labels {tuple(labels.shape)}"
    positive = labels > 0
    unlabeled = ~positive.any(dim=1)                                         # (N,)
    scores = scores.masked_fill(unlabeled[:, None], float("-inf"))
    aps = _average_precision_rows(scores.t(), positive.t())                  # (C,) one row per class
    aps = aps[~torch.isnan(aps)]
    if len(aps) == 0:
        raise ValueError("multilabel_map: no class has a positive")
    return 100.0 * aps.mean().item()
