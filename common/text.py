"""Text plumbing: a BERT-uncased WordPiece tokenizer, a vocab builder for the synthetic corpus, and whole-word
masking for masked language modelling.

All three papers use an uncased BERT-family text encoder (DistilBERT for OA-Trans and EgoVLP, BERT for
All-in-one) through Hugging Face's tokenizer. We only need its behaviour, so it is re-written here in plain
Python (no `transformers` at run time). It reads the same `vocab.txt` (one token per line, id = line index), so
the released checkpoints' embedding rows line up with our ids.

Tokenization happens in two stages, exactly as in BERT:

1. **Basic tokenization** (`_basic_tokenize`): drop control characters and NUL/U+FFFD, turn every whitespace
   character into a space, put spaces around CJK ideographs, split on whitespace, then per word: lower-case,
   strip accents (NFD, drop combining marks) and split off every punctuation character as its own word.
   BERT's "punctuation" is any Unicode P* character plus all non-alphanumeric printable ASCII, so `$`, `+`, `#`
   and `^` are split too (EgoVLP's raw narrations "#C C opens ..." become `#`, `c`, `c`, `opens`, ...).
   Special tokens written literally in the text ("A person is doing [MASK]") are kept whole, as HF does.
2. **WordPiece** (`_wordpiece`): greedy longest-match-first. The first piece of a word is looked up as is, every
   later piece with a `##` prefix. A word with no full segmentation, or longer than 100 characters, becomes a
   single [UNK].

`Tokenizer(texts, max_len)` returns `[CLS] tokens [SEP]` ids padded with [PAD] (id looked up in the vocab, 0 in
BERT's) and an attention mask. Truncation drops wordpieces from the end and keeps [SEP] last.

`whole_word_mask` follows HF's `DataCollatorForWholeWordMask` (All-in-one's MLM): a *word* is a token plus the
`##` pieces that follow it, about 15% of the words of each sequence are chosen, and every token of a chosen word
is predicted; each chosen token independently becomes [MASK] (80%), a random non-special token (10%) or stays
unchanged (10%). Departure from HF: HF sizes the selection by the number of *tokens* (round(15% of tokens),
then adds whole words until that budget is met); here it is round(15% of *words*), at least one, which is what
"15% of words" says and does not depend on how finely a word happens to be split.
"""
import unicodedata
from pathlib import Path

import torch

from common.errors import UnusableFile

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # BERT's WordpieceTokenizer.max_input_chars_per_word


# ---------------------------------------------------------------------------------------------------------------
# Character classes (BERT's definitions)

def _is_whitespace(ch: str) -> bool:
    if ch in (" ", "\t", "\n", "\r"):
        return True
    return unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    if ch in ("\t", "\n", "\r"):  # whitespace, not control, for BERT
        return False
    return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    # every printable non-alphanumeric ASCII character counts, even those Unicode calls symbols ($ + < = > ^ ` | ~)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    # the CJK Unified Ideographs blocks; Hangul and Japanese kana are NOT in here (same as BERT)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: basic tokenization

def _clean_and_space(text: str) -> str:
    """Drop NUL, U+FFFD and control characters; whitespace -> ' '; spaces around CJK ideographs."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


def _strip_accents(word: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    """'hello,world!' -> ['hello', ',', 'world', '!']"""
    pieces, current = [], []
    for ch in word:
        if _is_punctuation(ch):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(ch)
        else:
            current.append(ch)
    if current:
        pieces.append("".join(current))
    return pieces


def _basic_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Whole words and punctuation marks, before WordPiece. Special tokens in the text are NOT protected here."""
    words = []
    for word in _clean_and_space(text).split():
        if lowercase:  # BERT uncased strips accents exactly when it lower-cases
            word = _strip_accents(word.lower())
        words.extend(_split_punctuation(word))
    return words


def _split_on_specials(text: str) -> list[tuple[str, bool]]:
    """Cut the raw text around literal special tokens: 'doing [MASK].' -> [('doing ', F), ('[MASK]', T), ('.', F)]."""
    parts = [(text, False)]
    for special in SPECIAL_TOKENS:
        new_parts = []
        for chunk, is_special in parts:
            if is_special or special not in chunk:
                new_parts.append((chunk, is_special))
                continue
            pieces = chunk.split(special)
            for i, piece in enumerate(pieces):
                if i > 0:
                    new_parts.append((special, True))
                if piece:
                    new_parts.append((piece, False))
        parts = new_parts
    return parts


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: WordPiece + the tokenizer object

class Tokenizer:
    """BERT-uncased WordPiece tokenizer reading a BERT `vocab.txt`.

    Args:
        vocab_file: one token per line; the id of a token is its 0-based line number.
        lowercase: lower-case and strip accents (True for every *-uncased model).

    Attributes: vocab (token -> id), ids_to_tokens (list), vocab_size, pad_id, unk_id, cls_id, sep_id, mask_id;
        special_ids (sorted ids of the five specials) and is_piece (bool tensor (vocab_size,), True for `##`
        tokens), used by whole_word_mask.
    """

    def __init__(self, vocab_file: str, lowercase: bool = True):
        self.lowercase, self.vocab_file = lowercase, vocab_file
        with open(vocab_file, encoding="utf-8-sig") as f:  # (a byte-order mark is dropped)
            # keep everything but the line break: a token could in principle start or end with a space
            self.ids_to_tokens = [line.rstrip("\n").rstrip("\r") for line in f]
        while self.ids_to_tokens and self.ids_to_tokens[-1] == "":  # trailing empty lines
            self.ids_to_tokens.pop()
        self.vocab = {}
        for i, tok in enumerate(self.ids_to_tokens):
            self.vocab.setdefault(tok, i)  # first occurrence wins on a duplicated line
        self.vocab_size = len(self.ids_to_tokens)
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise UnusableFile(f"{vocab_file}: special tokens {missing} are not in the vocab (is it a BERT "
                               f"vocab.txt? --vocab_file)")
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.mask_id = self.vocab["[MASK]"]
        self.special_ids = sorted({self.vocab[t] for t in SPECIAL_TOKENS})
        self.is_piece = torch.tensor([t.startswith("##") for t in self.ids_to_tokens])  # (vocab,) for masking

    def _wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first: 'unaffable' -> ['un', '##aff', '##able'] with BERT's vocab."""
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            if end == start:  # no prefix of the rest is in the vocab: the whole word is unknown
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Wordpieces of `text`, without [CLS]/[SEP]."""
        tokens = []
        for chunk, is_special in _split_on_specials(text):
            if is_special:
                tokens.append(chunk)
                continue
            for word in _basic_tokenize(chunk, self.lowercase):
                tokens.extend(self._wordpiece(word))
        return tokens

    def encode(self, text: str, max_len: int) -> list[int]:
        """[CLS] wordpieces [SEP] as ids, truncated to at most max_len ids ([SEP] stays last); no padding."""
        assert max_len >= 2, "max_len must leave room for [CLS] and [SEP]"
        ids = [self.vocab[t] for t in self.tokenize(text)[: max_len - 2]]
        return [self.cls_id] + ids + [self.sep_id]

    def __call__(self, texts: list[str], max_len: int, pad_to_max: bool = True) -> dict[str, torch.Tensor]:
        """Batch-encode. Returns input_ids and attention_mask, LongTensors (B, L) with L = max_len if pad_to_max
        else the longest encoded text (HF's padding="max_length" vs padding=True, both with truncation)."""
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode(t, max_len) for t in texts]
        length = max_len if pad_to_max else max((len(e) for e in encoded), default=0)
        input_ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids) -> str:
        """Ids -> text: drops [PAD]/[CLS]/[SEP], glues `##` pieces to the previous token, joins words by spaces
        (no clean-up of the space before punctuation: 'hello , world')."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = {self.pad_id, self.cls_id, self.sep_id}
        text = " ".join(self.ids_to_tokens[i] for i in ids if i not in skip)
        return text.replace(" ##", "")


# ---------------------------------------------------------------------------------------------------------------
# Vocab for the synthetic corpus

def check_vocab(tokenizer: Tokenizer, vocab_size: int):
    """A vocab file larger than the model's word-embedding table (--vocab_size, or the --init checkpoint's) is an
    error at start-up: its last ids would index past the table at the first caption that uses them."""
    if tokenizer.vocab_size > vocab_size:
        raise UnusableFile(f"{tokenizer.vocab_file}: {tokenizer.vocab_size} tokens, more than the model's "
                           f"word-embedding table (vocab_size={vocab_size}); use --vocab_size=0 (the file's size) "
                           f"or the --vocab_file the model was built with")


def build_vocab(texts, path) -> list[str]:
    """Write a BERT-format vocab.txt covering `texts` and return its tokens (line i = id i).

    Layout: [PAD] (id 0, as in BERT), [UNK], [CLS], [SEP], [MASK]; then every whole word produced by the basic
    tokenizer over `texts` (so each corpus word is exactly one token), in sorted order; then every single
    character seen in the corpus plus ASCII letters, digits and punctuation, and the `##` form of each, so a new
    word made of known characters still tokenizes (into characters) instead of becoming [UNK].
    The output depends only on the set of words, never on the order of `texts`.
    """
    words = set()
    for text in texts:
        words.update(w for w in _basic_tokenize(text) if len(w) <= MAX_WORD_CHARS)
    words -= set(SPECIAL_TOKENS)
    chars = {ch for w in words for ch in w}
    chars.update("abcdefghijklmnopqrstuvwxyz0123456789")
    chars.update(chr(cp) for cp in range(33, 127) if _is_punctuation(chr(cp)))

    tokens = list(SPECIAL_TOKENS)
    tokens += sorted(words)
    tokens += sorted(chars - words)  # single characters that are not already a corpus word
    tokens += sorted("##" + ch for ch in chars)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return tokens


# ---------------------------------------------------------------------------------------------------------------
# Whole-word masking (MLM inputs)

def whole_word_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Tokenizer,
                    prob: float = 0.15, generator: torch.Generator | None = None):
    """Whole-word masking for MLM.

    Args:
        input_ids: (B, L) token ids with [CLS]/[SEP]/[PAD] as produced by `tokenizer(...)`.
        attention_mask: (B, L), 1 on real tokens.
        prob: fraction of the words of each sequence to predict; each sequence with at least one word gets
            max(1, round(prob * #words)) words, drawn uniformly without replacement.
        generator: torch.Generator for reproducibility (on the same device as input_ids).
    Returns:
        masked_input_ids (B, L): chosen tokens replaced (80% [MASK], 10% random non-special token, 10% kept),
        labels (B, L): the original id on every chosen token, -100 elsewhere.
    Special tokens ([CLS] [SEP] [PAD] [MASK] [UNK]) and padded positions are never chosen.
    """
    B, L = input_ids.shape
    device = input_ids.device
    special_ids = torch.tensor(tokenizer.special_ids, device=device)
    valid = attention_mask.bool() & ~torch.isin(input_ids, special_ids)  # (B, L) maskable tokens

    # a token continues a word iff it is a "##" piece right after another maskable token
    is_piece = tokenizer.is_piece.to(device)[input_ids.clamp(0, tokenizer.vocab_size - 1)]  # (B, L)
    prev_valid = torch.zeros_like(valid)
    prev_valid[:, 1:] = valid[:, :-1]
    is_start = valid & ~(is_piece & prev_valid)  # (B, L) first token of each word

    # choose k words per row: a random score per word start, keep the k smallest
    n_words = is_start.sum(dim=1)  # (B,)
    k = torch.floor(n_words.double() * prob + 0.5).long().clamp(min=1)
    k = torch.where(n_words > 0, k, torch.zeros_like(k))
    scores = torch.rand(B, L, generator=generator, device=device)
    scores = scores.masked_fill(~is_start, 2.0)  # non-starts sort after every word start
    rank = scores.argsort(dim=1).argsort(dim=1)  # (B, L) 0-based rank of each position's score in its row
    chosen_start = is_start & (rank < k[:, None])  # (B, L)

    # spread the choice from each word's first token to its ## pieces
    positions = torch.arange(L, device=device).expand(B, L)
    start_of = torch.where(is_start, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    chosen = valid & chosen_start.gather(1, start_of.clamp(min=0))  # (B, L)

    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))

    # 80 / 10 / 10, independently per chosen token
    u = torch.rand(B, L, generator=generator, device=device)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    non_special = torch.ones(tokenizer.vocab_size, dtype=torch.bool, device=device)
    non_special[special_ids] = False
    candidates = non_special.nonzero().squeeze(1)  # ids a random replacement may take
    pick = torch.randint(len(candidates), (B, L), generator=generator, device=device)
    masked = input_ids.clone()
    masked[to_mask] = tokenizer.mask_id
    masked[to_random] = candidates[pick][to_random]
    return masked, labels
