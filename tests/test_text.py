"""Tokenizer, vocab builder and whole-word masking.

Run: python -m pytest -q tests/test_text.py

The tokenizer is checked on hand-worked examples against a tiny vocab written below (expected pieces were
worked out by hand from BERT's rules, not produced by the code). The specials are deliberately NOT at BERT's ids,
so the tests also check that they are looked up by their text.
"""
import random

import pytest
import torch

from common.text import Tokenizer, build_vocab, whole_word_mask

VOCAB = [
    "[UNK]", "[PAD]", "the", "[CLS]", "man", "[SEP]", "open", "##s", "##ing", "[MASK]", "fridge", "un", "##aff",
    "##able", ",", ".", "!", "cafe", "a", "##a", "hello", "world", "#", "c", "$", "猫", "naive",
]


@pytest.fixture
def tok(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return Tokenizer(str(path))


# ----------------------------------------------------------------------------------------------- tokenizer

def test_special_ids_are_looked_up_by_text(tok):
    assert (tok.unk_id, tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 3, 5, 9)
    assert tok.vocab_size == len(VOCAB) and tok.vocab["fridge"] == 10 and tok.ids_to_tokens[7] == "##s"


@pytest.mark.parametrize("text, expected", [
    ("The man opens the fridge.", ["the", "man", "open", "##s", "the", "fridge", "."]),   # lower-case, ##, punct
    ("unaffable", ["un", "##aff", "##able"]),                                            # greedy longest match
    ("opening", ["open", "##ing"]),
    ("Hello,world!", ["hello", ",", "world", "!"]),                                      # punctuation split
    ("CAFÉ", ["cafe"]),                                                                  # accent stripped
    ("Naïve man", ["naive", "man"]),
    ("zebra", ["[UNK]"]),                                                                # unknown word
    ("opensx man", ["[UNK]", "man"]),           # 'open ##s' then no piece for 'x' -> the WHOLE word is [UNK]
    ("#C C opens", ["#", "c", "c", "open", "##s"]),                                      # EgoVLP narrations
    ("the$man", ["the", "$", "man"]),           # '$' is a Unicode symbol (Sc) but BERT's ASCII punctuation
    ("the猫man", ["the", "猫", "man"]),          # CJK ideographs are split off as their own words
    ("  the\tman\n\x00fridge\u200b ", ["the", "man", "fridge"]),  # whitespace/control clean-up (\u200b is Cf)
    ("the [MASK] man", ["the", "[MASK]", "man"]),                                         # literal special kept
    ("", []),
])
def test_tokenize_hand_worked(tok, text, expected):
    assert tok.tokenize(text) == expected


def test_long_words_become_unk(tok):
    assert tok.tokenize("a" * 100) == ["a"] + ["##a"] * 99   # 100 characters still go through WordPiece
    assert tok.tokenize("a" * 101 + " man") == ["[UNK]", "man"]


def test_lowercase_false_keeps_case(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB + ["The", "É"]) + "\n", encoding="utf-8")
    cased = Tokenizer(str(path), lowercase=False)
    assert cased.tokenize("The the MAN É") == ["The", "the", "[UNK]", "É"]


def test_encode_and_truncation_keep_sep_last(tok):
    assert tok.encode("the man opens", max_len=16) == [3, 2, 4, 6, 7, 5]
    assert tok.encode("the man opens", max_len=4) == [3, 2, 4, 5]   # [CLS] the man [SEP]
    assert tok.encode("the man opens", max_len=2) == [3, 5]


def test_call_pads_and_masks(tok):
    out = tok(["the man opens", "hello"], max_len=6)
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    assert out["input_ids"].tolist() == [[3, 2, 4, 6, 7, 5], [3, 20, 5, 1, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]

    out = tok(["the man opens", "hello"], max_len=5)               # truncation inside a batch
    assert out["input_ids"].tolist() == [[3, 2, 4, 6, 5], [3, 20, 5, 1, 1]]

    out = tok(["the man", "hello"], max_len=32, pad_to_max=False)  # pad to the longest in the batch
    assert out["input_ids"].tolist() == [[3, 2, 4, 5], [3, 20, 5, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_decode(tok):
    ids = tok(["The man opens the fridge!"], max_len=12)["input_ids"][0]
    assert tok.decode(ids) == "the man opens the fridge !"
    assert tok.decode([3, 11, 12, 13, 9, 5]) == "unaffable [MASK]"


def test_missing_special_is_an_error(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", encoding="utf-8")
    with pytest.raises(ValueError, match="MASK"):
        Tokenizer(str(path))


# ----------------------------------------------------------------------------------------------- build_vocab

CORPUS = [
    "#C C opens the Fridge.",
    "A man is cooking pasta; the café is busy!",
    "Someone pours water into a glass",
    "the man opens the fridge",
]


def test_build_vocab_round_trip(tmp_path):
    path = tmp_path / "sub" / "vocab.txt"
    build_vocab(CORPUS, path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(set(lines[:-1])) == len(lines) - 1 and lines[-1] == ""   # no duplicates, newline-terminated
    tok = Tokenizer(str(path))
    assert tok.pad_id == 0
    # every corpus word is exactly one token
    for word in ["#", "c", "opens", "the", "fridge", ".", "a", "man", "is", "cooking", "pasta", ";", "cafe",
                 "busy", "!", "someone", "pours", "water", "into", "glass"]:
        assert tok.tokenize(word) == [word], word
    assert tok.tokenize("The café IS busy!") == ["the", "cafe", "is", "busy", "!"]
    # an unseen word made of known characters splits into characters instead of [UNK]
    assert tok.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"]
    assert tok.tokenize("Glasses") == ["glass", "##e", "##s"]   # longest match first, then characters


def test_build_vocab_is_deterministic(tmp_path):
    shuffled = CORPUS[::-1] + CORPUS[:1]
    build_vocab(CORPUS, tmp_path / "a.txt")
    build_vocab(shuffled, tmp_path / "b.txt")
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes()


# ----------------------------------------------------------------------------------------------- whole-word masking

# words of 1, 2 and 3 pieces, as id lists in the VOCAB above
WORDS = [[2], [4], [10], [6, 7], [6, 8], [11, 12, 13], [18, 19, 19]]


def make_batch(tok, num_seqs: int, seed: int):
    """Random sequences [CLS] words... [SEP] [PAD]...; returns ids, mask and the per-sequence word spans."""
    rng = random.Random(seed)
    rows, spans = [], []
    for _ in range(num_seqs):
        ids, row_spans = [tok.cls_id], []
        for _ in range(rng.randint(1, 25)):
            word = rng.choice(WORDS)
            row_spans.append(list(range(len(ids), len(ids) + len(word))))
            ids += word
        if rng.random() < 0.2:  # literal [MASK] / [UNK] in the input: not words, never chosen
            ids.append(rng.choice([tok.mask_id, tok.unk_id]))
        ids.append(tok.sep_id)
        rows.append(ids)
        spans.append(row_spans)
    L = max(len(r) for r in rows) + 2
    input_ids = torch.full((num_seqs, L), tok.pad_id)
    attention_mask = torch.zeros(num_seqs, L, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    return input_ids, attention_mask, spans


def test_whole_word_mask_statistics(tok):
    input_ids, attention_mask, spans = make_batch(tok, num_seqs=3000, seed=0)
    masked, labels = whole_word_mask(input_ids, attention_mask, tok, prob=0.15,
                                     generator=torch.Generator().manual_seed(0))
    assert masked.shape == labels.shape == input_ids.shape

    chosen = labels != -100
    # labels: the original id where chosen, -100 elsewhere; nothing outside a chosen token changes
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(masked[~chosen], input_ids[~chosen])
    # specials and padding are never chosen
    specials = torch.isin(input_ids, torch.tensor([tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id]))
    assert not chosen[specials].any() and not chosen[attention_mask == 0].any()

    n_words = n_chosen_words = 0
    for i, row_spans in enumerate(spans):
        picked = 0
        for span in row_spans:
            flags = chosen[i, span]
            assert flags.all() or not flags.any(), "a word was only partly chosen"
            picked += int(flags.all())
        # per sequence: max(1, round(15% of its words)) words
        assert picked == max(1, int(0.15 * len(row_spans) + 0.5)), (i, len(row_spans), picked)
        n_words += len(row_spans)
        n_chosen_words += picked
    # overall close to 15% of words (above it: short sequences still get one word)
    assert 0.14 < n_chosen_words / n_words < 0.20

    # 80 / 10 / 10 among chosen tokens
    n = chosen.sum().item()
    assert n > 5000
    became_mask = (masked[chosen] == tok.mask_id).double().mean().item()
    unchanged = (masked[chosen] == input_ids[chosen]).double().mean().item()
    replaced = masked[chosen][(masked[chosen] != tok.mask_id) & (masked[chosen] != input_ids[chosen])]
    assert abs(became_mask - 0.8) < 0.02
    assert abs(unchanged - 0.1) < 0.015                     # 10% kept (+ the rare random draw of itself)
    assert abs(len(replaced) / n - 0.1) < 0.015
    # random replacements are real, non-special tokens, and cover the vocab
    special_ids = {tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id}
    assert not set(replaced.tolist()) & special_ids
    assert set(replaced.tolist()) == set(range(tok.vocab_size)) - special_ids


def test_whole_word_mask_each_word_equally_likely(tok):
    # one sequence of 10 distinct one-piece words repeated: each word position is chosen ~15% of the time
    ids = [tok.cls_id] + [2, 4, 10, 14, 15, 16, 17, 18, 20, 21] + [tok.sep_id]
    input_ids = torch.tensor([ids] * 4000)
    masked, labels = whole_word_mask(input_ids, torch.ones_like(input_ids), tok,
                                     generator=torch.Generator().manual_seed(1))
    per_position = (labels != -100).double().mean(dim=0)
    assert per_position[0] == 0 and per_position[-1] == 0
    assert ((per_position[1:-1] - 0.2).abs() < 0.03).all()   # round(1.5) = 2 of 10 words per sequence


def test_whole_word_mask_edge_cases_and_reproducibility(tok):
    # a sequence with no words at all, and a ## piece right after [CLS] (counts as a word of its own)
    input_ids = torch.tensor([[tok.cls_id, tok.sep_id, tok.pad_id],
                              [tok.cls_id, 7, tok.sep_id]])
    attention_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    _, labels = whole_word_mask(input_ids, attention_mask, tok, generator=torch.Generator().manual_seed(0))
    assert labels.tolist() == [[-100, -100, -100], [-100, 7, -100]]

    input_ids, attention_mask, _ = make_batch(tok, num_seqs=50, seed=1)
    a = whole_word_mask(input_ids, attention_mask, tok, generator=torch.Generator().manual_seed(5))
    b = whole_word_mask(input_ids, attention_mask, tok, generator=torch.Generator().manual_seed(5))
    c = whole_word_mask(input_ids, attention_mask, tok, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
