"""All in One: Exploring Unified Video-Language Pre-training — Wang et al., CVPR 2023 (arXiv 2203.07303).

A single-file re-implementation: the model, the three pre-training losses, the data loaders (WebVid CSV,
MSR-VTT JSON, MSRVTT-QA / MSRVTT-MC JSON lines, K400-style lists), the downstream tasks and a training loop for
CPU, one GPU or many (torchrun).

The idea
--------
Video-language models usually stack a video encoder, a text encoder and a fusion encoder. All-in-one uses **one**
plain ViT for everything: text tokens (BERT word embeddings) and video patch tokens go through the same blocks,
so "only the light text tokenizer and the task head add extra parameters". The hard part is time: a ViT sees
images, and attending jointly over all T·N patch tokens (or adding temporal attention) costs compute or
parameters. The paper's answer is the **temporal token rolling** layer, parameter-free and FLOP-free: before
every block, a band of each frame's patch tokens is swapped with the neighbouring frames (Fig. 2),

    out[:, t, band_fwd] = x[:, t-1, band_fwd]        # an eighth of the slots take the previous frame's tokens
    out[:, t, band_bwd] = x[:, t+1, band_bwd]        # and an eighth the next frame's (circular in t)
    out[:, t, other]    = x[:, t, other]             # CLS and the rest stay

so that, layer after layer, every frame's self-attention also sees content from the other frames. The baseline
it replaces is "time average": frames processed independently and averaged at the end (`temporal="mean"`).
The costlier option it saves, joint space-time attention over all frames in one sequence, is `temporal="flatten"`.
All of it (the band, the random slot order, where the layer sits) is the section "Temporal token rolling".

The joint pass follows the release: the text is replicated per frame, each frame gets its own sequence
`[text (L) ; frame CLS + N patches]`, rolling moves visual tokens across the T sequences, and the T copies are
averaged after the final LayerNorm. The pooled text [CLS] (`tanh(W x_0 + b)`) feeds the matching / QA heads.

Pre-training objectives (summed, each with its weight; the section "Losses")
    VTM  video-text matching: half of the joint rows get another clip's video; CE of Linear(D, 2) on the pooled CLS.
    MLM  masked language modelling on the joint pass: whole-word, 15%, 80/10/10, CE on masked tokens.
    VTC  video-text contrastive on unimodal passes:  S_ij = <t_i, v_j> / tau  (cosine, tau = 0.05),
         L = CE(S, diag) + CE(S^T, diag)   (the release sums the two directions; negatives across ranks here).

Downstream (`--finetune=<task>` trains, `--eval=<task>` evaluates a checkpoint on test):
    retrieval  text->video by cosine of the unimodal embeddings (zero-shot, or fine-tuned with VTC); one caption
               per test video by default (`retrieval_captions`), `retrieval_views=3` for the release's 3-view average
    qa         open-ended QA as classification over the train answers (answers outside it count as wrong)
    mc         multiple choice: zero-shot by the VTM match logit of each option, or fine-tuned MLP D->256->1
    action     probe on frozen joint features with the fixed prompt "a person is doing [MASK]" (MLP, as released)

Shapes legend: B batch, T frames, N patches per frame, L text tokens, D width, V vocab, K classes, P embed_dim.

The file, in order
------------------
    Config          the dataclass of every field (`--help`), presets, the ablation, allowed values
    Temporal token rolling (the paper's idea)   band size, roll, slot shuffle, the baselines, placement per block
    Model           one pre-LN ViT shared by text and video: the joint, text-only and video-only passes
    Losses          VTC, VTM, MLM, the pre-training step, the fine-tuning losses
    Data            annotation readers, clip decoding, the batch sampler (reversed twins), the collate (MLM, VTM)
    Evaluation      retrieval, MC (and its order probe), QA, masked motion words, the action probe
    Training        the model, data, optimiser and validation as named steps, then main(): the training story
    Appendix        A. pictures (`--pictures`); B. weight key maps (the release's checkpoints, timm ViTs, BERT)

What is reproduced, what is not
-------------------------------
Reproduced: the single-stream model with the release's joint-pass layout, temporal token rolling (with the
release's random slot subset), time average, the release's token shift, a TSM channel shift and joint space-time
attention over all frames ("flatten", a row of the paper's comparison) (`temporal=`),
VTM + MLM + VTC, the four downstream protocols, the Ti / S / B sizes (parameter counts checked in the tests).
Not reproduced: the ImageNet start of the CPU default (it trains from scratch on the synthetic corpus;
`--init_video=<timm .pth>` loads the paper's DeiT / ViT weights, `--init=<release .ckpt>` the released models),
HowTo100M / WebVid-scale training, WPA (word-patch alignment by optimal transport, weight 0.1 inside the
release's ITM loss), captioning (no code was released), VCR, image co-training (All-in-one+).

Departures from the release, and why
------------------------------------
1. Joint-pass budget: the release runs two full joint forwards per step (MLM, ITM) and pre-trains with VTC off.
   Here VTC runs on the whole batch and VTM / MLM on its first `joint_fraction=0.125`: a joint row costs T copies
   of text + frame, and the eighth keeps a real matching / MLM signal (where rolling acts) at a fraction of the
   step. `joint_fraction=1` restores the release's layout, `vtc_weight=0` its default task.
2. Contrastive negatives are gathered across ranks (the release: per GPU); tau is fixed at 0.05 as released.
   Gradient accumulation does not enlarge the negative pool (as in the release): the contrastive batch is
   batch_size x world_size.
3. WPA / optimal transport is omitted.
4. VTM negatives are other videos of the batch (the release decodes one extra random video per sample).
   `twin_batches=True` puts a clip's time-reversed twin (a property of the synthetic corpus) in its batch: a hard
   negative for VTC and, preferred over a random clip, for VTM.
5. The text-only pass runs one copy of the text, not T identical copies (the same result without dropout).
6. Model selection on val, never test; QA counts answers outside the train vocabulary as wrong (the release
   skips them); val / test frames at bin midpoints (the release samples val randomly); no horizontal flip (it
   would turn "moves left" into "moves right"); similarities in fp32.
7. Zero-shot MC scores each option with the raw match logit, as released (not softmax).
8. The DeiT-S distillation token is not modelled (384 parameters); the temporal embedding is used for every size.
9. VTC pools the tokens (`vtc_pool="mean"`: the text's real tokens, all visual tokens of all frames) instead of
   the release's [CLS]: trained from scratch, [CLS] pooling stalled on a plateau. `vtc_pool="cls"` restores the
   release; the joint pass uses the text [CLS] either way.
10. The time code (`temporal_embed`, which frame a token comes from) starts random, std `time_init=1.0`, for every
   `temporal=` variant alike; the release starts it at zero (`--paper` and `--init_video` keep that), which is
   harmless from ImageNet weights but, from scratch, leaves a clip and its reversal the same set of tokens, and
   no variant then learns the direction of motion even when it is the label (README, "Does rolling see time?").

CPU default vs paper (`--paper --B` = the release's pre-training recipe at the paper's size)
------------------------------------------------------------------------------------------
| field | CPU default | paper / release | why the default differs |
|---|---|---|---|
| `width` / `depth` / `heads` | 128 / 4 / 2 | 768 / 12 / 12 (B; Ti 192/3, S 384/6) | minutes on 2 CPU cores |
| `img_size` / `max_text_len` | 64 / 32 | 224 / 40 | the synthetic corpus is 64x64, its captions short |
| `vocab_size` | 0 (the corpus's vocab.txt) | 30522 (bert-base-uncased) | synthetic vocabulary |
| `embed_dim` | 256 | 512 | smaller model |
| `dropout` / `drop_path` | 0 / 0 | 0.1 / 0.1 | a short run from scratch underfits; regularising slows it |
| `vtc_weight` | 1 | 0 (VTC off in pre-training) | zero-shot retrieval needs trained unimodal embeddings (departure 1) |
| `joint_fraction` | 0.125 | 1.0 | a joint row costs T copies (departure 1) |
| `vtc_pool` | mean | cls | [CLS] stalled from scratch (departure 9) |
| `time_init` | 1.0 | 0 (zero start) | from scratch a zero time code never learns order (departure 10) |
| `batch_size` / `grad_accum` | 64 / 1 | 16 / 32 per GPU (4096 on 8 GPUs) | one CPU process; no extra negatives |
| `lr` / `warmup_steps` / `max_steps` | 1e-3 / 30 / 1000 | 1e-4 / 2500 / 200k | from scratch, short schedule |
| `probe_lr` / `probe_epochs` | 1e-3 / 200 | 3e-4 (K400) or 1e-4 (HMDB51) / 50 | a tiny probe on a few hundred clips |
| `cache_videos` / `num_workers` | True / 0 | False / 8 | small corpus in RAM; a worker shares the 2 cores with the model |
| `eval_every` / `ckpt_every` / `log_every` | 100 / 100 / 25 | 5000 / 5000 / 100 | cadence of a short run |
| `precision` | auto (bf16 where a start-up probe finds it fast) | fp16 AMP (not set by `--paper`) | bf16 needs no loss scaling |

Commands
--------
    python all_in_one.py --pretrain                       # CPU default: pre-train on data/synth + zero-shot eval
    python all_in_one.py --tiny --max_steps=20            # seconds, smoke test
    python all_in_one.py --pretrain --temporal=mean       # the paper's ablation: time average instead of rolling
    python all_in_one.py --finetune=qa --init=runs/all_in_one/ckpt.pt --out_dir=runs/all_in_one_qa
    python all_in_one.py --eval=retrieval --init=runs/all_in_one/ckpt.pt --pictures
    python all_in_one.py --paper --B --device=cuda --data_root=/data                    # one GPU, paper recipe
    torchrun --standalone --nproc_per_node=8 all_in_one.py --paper --B --data_root=/data \
        --init_video=/w/jx_vit_base_p16_224-80ecf9dd.pth --vocab_file=/w/bert-base-uncased/vocab.txt  # paper init
    python all_in_one.py --B --eval=mc --init=/w/all-in-one-base.ckpt --vocab_file=/w/vocab.txt --data_root=/data
"""

import contextlib
import copy
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

from common import pictures
from common.annotations import (BadRow, bad_row, inside, no_items, read_json, read_rows, read_table, skipped_rows,
                                text_field)
from common.config import config_to_dict, parse_config
from common.dist import all_gather_with_grad, print0
from common.errors import user_errors
from common.metrics import accuracy, retrieval_metrics
from common.text import Tokenizer, check_vocab, whole_word_mask
from common.train import (BadVideos, StepClock, autocast, check_finite, compile_blocks, count_parameters, data_report,
                          end_run, load_checkpoint, loader_settings, log_step, lr_at, param_groups, resume_state,
                          save_checkpoint, save_state, set_rng_states, start_run)
from common.video import (ClipCache, VideoReadError, VideoTransform, decode_videos, load_clip, read_frames,
                          sample_frame_indices, video_meta)
from common.weights import find_state_dict, load_into, load_weights


# ---------------------------------------------------------------------------------------------------------------
# Config: every field with its meaning and paper value (`python all_in_one.py --help` prints them)

@dataclass
class Config:
    # --- run
    out_dir: str = "runs/all_in_one"  # where ckpt.pt, log.jsonl and metrics.json go
    data_root: str = "data/synth"  # corpus root (webvid/, msrvtt/, vocab.txt); generated on first use if default
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    precision: str = "auto"  # auto (bf16 where a start-up probe finds it faster) | bf16 | fp32; losses always fp32
    compile: str = "off"  # torch.compile the transformer blocks: off | on | auto (on for runs of >= 200 steps)
    seed: int = 0  # random seed
    max_steps: int = 1000  # optimizer steps of the current job (pre-training or fine-tuning); paper 200k
    init: str = ""  # a whole model to start from: our ckpt.pt (for --finetune / --eval) or a release .ckpt
    init_video: str = ""  # timm ViT / DeiT state dict for the backbone (paper: the Ti / S / B ImageNet weights)
    init_text: str = ""  # Hugging Face BERT state dict: only its embeddings are loaded (not in the paper)
    vocab_file: str = ""  # "" = data_root/vocab.txt; real data: bert-base-uncased's vocab.txt (the paper's)
    resume: bool = False  # continue the run in out_dir from its ckpt.pt (optimizer, step, random states, data order)
    overwrite: bool = False  # let a new run replace the files of an earlier run in out_dir (refused otherwise)
    strict: bool = False  # a malformed annotation row stops the run (default: skipped, counted, named in the log)
    max_bad_videos: float = 0.1  # stop when more than this share of the training videos is unreadable (1 = never)
    finetune: str = ""  # "" (pre-train) | retrieval | qa | mc | action
    eval: str = ""  # "" | zeroshot | retrieval | qa | mc | action: evaluate --init on test, no training
    pictures: bool = False  # with --eval: retrieval gallery, token moves and training curves into out_dir/pictures
    # --- model (CPU default; paper sizes are the Ti / S / B presets)
    width: int = 128  # D; paper Ti 192 / S 384 / B 768
    depth: int = 4  # transformer blocks; paper 12
    heads: int = 2  # attention heads; paper Ti 3 / S 6 / B 12
    mlp_ratio: float = 4.0  # MLP hidden = mlp_ratio * D; paper 4
    patch_size: int = 16  # paper 16
    img_size: int = 64  # frame side after crop; paper 224 (the synthetic corpus is 64x64)
    num_frames: int = 3  # T frames per clip; paper 3 (8 for some fine-tunes)
    max_text_len: int = 32  # text positions (with [CLS]/[SEP]); paper 40
    vocab_size: int = 0  # 0 = size of the vocab file; paper 30522 (bert-base-uncased)
    embed_dim: int = 256  # VTC embedding size P (txt_proj / vid_proj); release 512
    dropout: float = 0.0  # dropout on embeddings / projections / MLP; paper 0.1 (0: short runs from scratch)
    drop_path: float = 0.0  # stochastic depth, linear up to this; paper 0.1
    tied_mlm_decoder: bool = False  # tie the MLM decoder to the word embeddings; release False (untied)
    temporal: str = "roll"  # roll (the paper) | mean (time average) | shift (release token shift) | tsm | flatten
    roll_fraction: float = 0.25  # share of patch slots rolled, half by +1 frame, half by -1; release 2*24/196
    roll_tokens: str = "random"  # random (slots shuffled per frame, as the release effectively does) | fixed
    roll_unimodal: bool = False  # the temporal layer also in the video-only pass (flatten: frames joined); release False
    time_init: float = 1.0  # std of the temporal embedding at initialisation ("the time code"); release 0 (zero start)
    pos_init: float = 0.02  # std of the spatial position table at initialisation ("the place code"); release 0.02
    # --- loss
    vtc_weight: float = 1.0  # video-text contrastive; release: off in pre-training, used for retrieval fine-tuning
    vtm_weight: float = 1.0  # video-text matching; release 1
    mlm_weight: float = 1.0  # masked language modelling; release 1
    temperature: float = 0.05  # VTC softmax temperature tau, fixed; release 0.05
    vtc_pool: str = "mean"  # VTC features: mean over tokens | cls (text [CLS], frame CLS averaged; release)
    joint_fraction: float = 0.125  # share of each batch in the joint passes (VTM and MLM); release 1.0
    mlm_prob: float = 0.15  # share of words masked; paper 0.15 (whole-word, 80/10/10)
    # --- data
    twin_batches: bool = False  # put each clip's time-reversed twin in its batch (hard negatives; not in the paper)
    cache_videos: bool = True  # keep decoded training videos in RAM (small corpora); off for real datasets
    num_workers: int = 0  # training DataLoader workers; 0 on a small CPU (the videos are cached), 4-8 on a GPU
    # --- optimisation
    batch_size: int = 64  # clips per micro-batch per device (= contrastive negatives per device)
    grad_accum: int = 1  # micro-batches per optimizer step; release accumulates to 4096 (does not add negatives)
    lr: float = 1e-3  # peak learning rate; paper 1e-4 pre-training (from ImageNet weights), 3e-4 retrieval FT
    head_lr_mult: float = 10.0  # lr multiplier of the new task heads (QA / MC / probe); release 10
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas; paper (0.9, 0.98)
    weight_decay: float = 0.01  # AdamW weight decay (none on biases, norms, tokens); paper 0.01
    warmup_steps: int = 30  # linear warmup; paper 2500 (pre-training) / 10% of steps (fine-tuning)
    schedule: str = "linear"  # decay after warmup: linear (the release, to 0) | cosine | constant
    # --- evaluation and logging
    eval_every: int = 100  # steps between val evaluations (model selection for fine-tuning)
    ckpt_every: int = 100  # steps between checkpoints (atomic)
    log_every: int = 25  # steps between log lines
    eval_batch_size: int = 64  # clips per evaluation batch
    max_eval_items: int = 0  # cap on items per evaluation split (0 = all); for quick runs only
    retrieval_captions: str = "first"  # text queries per test video: first (one per video, as MSR-VTT 1k-A) | all
    retrieval_views: int = 1  # frame samplings whose similarities are averaged; 1 = bin midpoints; release 3 random
    probe: str = "mlp"  # action probe head: mlp (release: pooler + 2-layer MLP) | linear
    probe_epochs: int = 200  # epochs of the action probe over cached frozen features; release 50 (K400)
    probe_lr: float = 1e-3  # AdamW lr of the action probe (head, and pooler for probe=mlp); release 3e-4 (K400)
    probe_features: str = "joint"  # joint (release: the prompt's joint [CLS]) | video (video-only pass) | frames


PRESETS = {
    # pre-training (the defaults are the CPU recipe; combine with a size: `--pretrain --B`)
    "pretrain": dict(finetune="", eval=""),
    # seconds on a CPU: tests and smoke runs
    "tiny": dict(width=32, depth=2, heads=2, embed_dim=32, batch_size=8, max_steps=4, eval_every=2, ckpt_every=2,
                 log_every=1, warmup_steps=1, eval_batch_size=8, num_workers=0, probe_epochs=5),
    # paper sizes: 12 layers, patch 16, 224x224, 3 frames, BERT vocab, 40 tokens (Table 1: 12M / 33M / 110M); the paper
    # initialises the ViT from timm's DeiT-Ti / DeiT-S distilled / ViT-B/16 (PAPER_INIT; --init_video), BERT: none
    "Ti": dict(width=192, depth=12, heads=3, img_size=224, max_text_len=40, vocab_size=30522, embed_dim=512,
               dropout=0.1, drop_path=0.1, lr=1e-4, warmup_steps=2500, max_steps=200_000),
    "S": dict(width=384, depth=12, heads=6, img_size=224, max_text_len=40, vocab_size=30522, embed_dim=512,
              dropout=0.1, drop_path=0.1, lr=1e-4, warmup_steps=2500, max_steps=200_000),
    "B": dict(width=768, depth=12, heads=12, img_size=224, max_text_len=40, vocab_size=30522, embed_dim=512,
              dropout=0.1, drop_path=0.1, lr=1e-4, warmup_steps=2500, max_steps=200_000),
    # the release's pre-training recipe (combine with a size: `--paper --B`): VTM + MLM on the whole batch, VTC off,
    # [CLS] features, 16 clips per GPU accumulated 32x (= 4096 on 8 GPUs; the release: 16 x 8 GPUs x 4 nodes x 8),
    # AdamW 1e-4, warm-up 2500, linear decay over 200k steps, dropout and drop-path 0.1. Sizes set only the model.
    "paper": dict(joint_fraction=1.0, vtc_weight=0.0, vtm_weight=1.0, mlm_weight=1.0, vtc_pool="cls",
                  batch_size=16, grad_accum=32, lr=1e-4, warmup_steps=2500, max_steps=200_000, schedule="linear",
                  dropout=0.1, drop_path=0.1, cache_videos=False, num_workers=8, eval_every=5000, ckpt_every=5000,
                  log_every=100, probe_lr=3e-4, probe_epochs=50, time_init=0.0),
}

# The paper's central ablation, run over seeds by `bash run.sh ablate all_in_one` (common/ablate.py): temporal token
# rolling against the time average, the release's token shift and joint space-time attention (rows of the paper's
# "temporal modeling" comparison), and rolling also in the video-only pass (the release rolls only in the joint
# pass). Each run: --pretrain + the flags.
# The order-sensitive probes are mc_order/acc (the truth against its reversed-motion option, chance 50) and
# mlm_motion/acc (masked motion words from the joint pass).
ABLATION = dict(
    reference="roll",
    variants={"roll": [], "mean": ["--temporal=mean"], "shift": ["--temporal=shift"], "flatten": ["--temporal=flatten"],
              "roll+video_only": ["--roll_unimodal"]},
    metrics=["retrieval/t2v_R@1", "retrieval/t2v_R@5", "mc/acc", "mc_order/acc", "mlm_motion/acc"],
)

# The values each field accepts, checked by parse_config before anything runs (a one-line error naming the field).
CHOICES = dict(precision=("auto", "bf16", "fp32"), compile=("auto", "on", "off"),
               finetune=("", "retrieval", "qa", "mc", "action"),
               eval=("", "zeroshot", "retrieval", "qa", "mc", "action"), vtc_pool=("mean", "cls"),
               temporal=("roll", "mean", "shift", "tsm", "flatten"), roll_tokens=("random", "fixed"),
               schedule=("linear", "cosine", "constant"), retrieval_captions=("first", "all"), probe=("mlp", "linear"),
               probe_features=("joint", "video", "frames"))
RANGES = dict(max_steps=(1, None), width=(1, None), depth=(1, None), heads=(1, None), mlp_ratio=(0, None),
              patch_size=(1, None), img_size=(1, None), num_frames=(1, None), max_text_len=(3, None),
              vocab_size=(0, None), embed_dim=(1, None), dropout=(0, 1), drop_path=(0, 1), roll_fraction=(0, 1),
              time_init=(0, None), pos_init=(0, None), vtc_weight=(0, None), vtm_weight=(0, None),
              mlm_weight=(0, None), temperature=(1e-6, None), joint_fraction=(0, 1), mlm_prob=(0, 1),
              batch_size=(1, None), grad_accum=(1, None), lr=(0, None), head_lr_mult=(0, None), weight_decay=(0, None),
              warmup_steps=(0, None), num_workers=(0, None), eval_every=(1, None), ckpt_every=(1, None),
              log_every=(1, None), eval_batch_size=(1, None), max_eval_items=(0, None), retrieval_views=(1, None),
              probe_epochs=(1, None), probe_lr=(0, None), max_bad_videos=(0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Temporal token rolling (the paper's idea, Fig. 2): roll_band (how many slots move), temporal_roll (the roll), the
# baselines of the paper's comparison (the release's token shift, a TSM channel shift; `mean` moves nothing),
# shuffle_patches (which patches sit in the rolled slots), temporal_mix (the layer `temporal=` picks) and
# before_block (where it sits: before every block). The model below only calls shuffle_patches and before_block.

def roll_band(n, roll_fraction):
    """k, the patch slots rolled per direction out of n: the release rolls L // 8 of the L = 1+N tokens each way
    (24 of 196 at 224 px, roll_fraction = 2*24/196); at least 1 when roll_fraction > 0."""
    return max(1, int(n * roll_fraction / 2)) if roll_fraction > 0 else 0


def temporal_roll(v, k):
    """Temporal token rolling (Fig. 2): roll slots 1..k by +1 frame and the last k slots by -1 frame.

    v: (B, T, 1+N, D), slot 0 is the frame's CLS (never rolled). Circular in time, as `torch.roll` in the
    release: with T=3, frame 0 receives frame 2's band. No parameters, no FLOPs; only memory moves.
    k is capped at N // 2, so the two bands never overlap (a single patch is not rolled at all).
    Departure for tiny grids: the release's band is L // 8 of the L = 1+N tokens, which is 0 below 8 tokens, and
    its `x[:, :, -0:]` then rolls the WHOLE sequence, CLS included, by -1 frame; here the caller's k (at least 1,
    see roll_band) always leaves the CLS in place. At 197 and 17 tokens both roll the same slots.
    """
    k = min(k, (v.shape[2] - 1) // 2)  # at most N // 2 patches per direction
    if k == 0:
        return v
    cls, p = v[:, :, :1], v[:, :, 1:]                                # (B, T, 1, D), (B, T, N, D)
    n = p.shape[2]
    from_prev = torch.roll(p[:, :, :k], shifts=1, dims=1)            # out[:, t] = p[:, t-1]
    from_next = torch.roll(p[:, :, n - k:], shifts=-1, dims=1)       # out[:, t] = p[:, t+1]
    return torch.cat([cls, from_prev, p[:, :, k:n - k], from_next], dim=2)


def temporal_shift(v, fold_div=8):
    """Token shift, the release's `TemporalRoll(v=3)` branch (an alternative in the paper's comparison): with
    f = D // fold_div (a count of *channels*, used as a count of tokens), the first f tokens of every frame,
    CLS included, come from frame t+1 and the next f tokens from frame t-1; zero-padded at the ends (not
    circular); all channels move. At D = 768 and 197 tokens that is 96 + 96 of them; when 2f exceeds the
    sequence the second band is cut at its end. v: (B, T, 1+N, D) -> same shape."""
    f = v.shape[-1] // fold_div
    out = v.clone()
    out[:, :, :2 * f] = 0
    out[:, :-1, :f] = v[:, 1:, :f]                                   # out[:, t] = v[:, t+1] for tokens 0..f-1
    out[:, 1:, f:2 * f] = v[:, :-1, f:2 * f]                         # out[:, t] = v[:, t-1] for tokens f..2f-1
    return out


def channel_shift(v, fold_div=8):
    """TSM-style channel shift (Lin et al. 2019; not in the release): D/8 channels of every patch token come from
    frame t-1, D/8 from frame t+1, zero-padded at the ends (not circular); the CLS token is left alone."""
    cls, p = v[:, :, :1], v[:, :, 1:]                                # (B, T, 1, D), (B, T, N, D)
    c = p.shape[-1] // fold_div
    out = torch.zeros_like(p)
    out[:, 1:, :, :c] = p[:, :-1, :, :c]                             # from the previous frame
    out[:, :-1, :, c:2 * c] = p[:, 1:, :, c:2 * c]                   # from the next frame
    out[:, :, :, 2 * c:] = p[:, :, :, 2 * c:]
    return torch.cat([cls, out], dim=2)


def shuffle_patches(x, cfg):
    """roll_tokens=random: each frame's patch tokens in a fresh random slot order on every pass, as the release's
    ViLT-style `multinomial(ones(N), N)` patch selection does. Each token keeps its own position embedding, so
    attention is unaffected, but the fixed rolled slots then hold a random spatial subset of each frame.
    x: (B, T, N, D) patch tokens (no CLS) -> same shape."""
    if cfg.temporal in ("roll", "shift") and cfg.roll_tokens == "random":
        perm = torch.rand(*x.shape[:3], device=x.device).argsort(dim=-1)  # (B, T, N)
        x = torch.gather(x, 2, perm.unsqueeze(-1).expand_as(x))
    return x


def temporal_mix(v, cfg):
    """The temporal layer (`temporal=`) on the visual tokens v (B, T, 1+N, D) -> same shape."""
    if cfg.temporal == "roll":
        return temporal_roll(v, roll_band(v.shape[2] - 1, cfg.roll_fraction))
    if cfg.temporal == "shift":
        return temporal_shift(v)
    if cfg.temporal == "tsm":
        return channel_shift(v)
    assert cfg.temporal in ("mean", "flatten"), cfg.temporal
    return v  # time average: frames never meet before the final mean (flatten: the model joins the frames instead)


def before_block(x, T, cfg, text_len=0):
    """Where the layer sits: before every block, on the visual tokens of the T per-frame sequences x
    (B*T, text_len+1+N, D); the text tokens in front (joint pass) stay. -> same shape."""
    vis = temporal_mix(rearrange(x[:, text_len:], "(b t) n d -> b t n d", t=T), cfg)
    vis = rearrange(vis, "b t n d -> (b t) n d")
    return torch.cat([x[:, :text_len], vis], dim=1) if text_len else vis


# ---------------------------------------------------------------------------------------------------------------
# Model: one plain pre-LN ViT shared by text and video

def project(proj, x):
    """VTC projection of token 0, outside autocast: bf16 embeddings make many cosine values tie, which inflates
    R@1 under optimistic tie-breaking. (B, D) -> (B, P) L2-normalised fp32."""
    with torch.autocast(x.device.type, enabled=False):
        return F.normalize(proj(x.float()), dim=-1)


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Attention(nn.Module):
    """Multi-head self-attention with fused SDPA. mask: (B, 1, 1, S) bool, True = attend (key padding)."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # qkv bias on, as in ViT
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        q, k, v = rearrange(self.qkv(x), "b s (three h e) -> three b h s e", three=3, h=self.heads)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, S, e); attention dropout 0
        return self.proj_drop(self.proj(rearrange(x, "b h s e -> b s (h e)")))


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN(x)); x += MLP(LN(x)) (LN eps 1e-6, GELU)."""

    def __init__(self, dim, heads, mlp_ratio, dropout, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))
        self.drop_path = drop_path

    def forward(self, x, mask=None):
        x = x + drop_path(self.attn(self.norm1(x), mask), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + absolute position (+ token type 0), LayerNorm (eps 1e-12), dropout."""

    def __init__(self, vocab_size, max_len, dim, dropout):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_len, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)  # BERT's segment table; always segment 0 here
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids):                                           # ids: (B, L)
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))                        # (B, L, D)


class VisualTransformer(nn.Module):
    """The ViT trunk: patch embedding, CLS, spatial position table, zero-initialised temporal table, the blocks
    and the final norm. Named like the release's `transformer.*` so its checkpoints map key by key."""

    def __init__(self, cfg):
        super().__init__()
        D, n = cfg.width, (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, D))
        self.pos_init = cfg.pos_init
        # the time code: which frame a token comes from. Zero in the release, which starts from ImageNet weights;
        # from scratch a zero start leaves a clip and its reversal the same set of tokens, and training never
        # breaks that symmetry (README, the order investigation), so here it starts random at std time_init
        self.temporal_embed = nn.Parameter(torch.randn(1, cfg.num_frames, D) * cfg.time_init)
        self.pos_drop = nn.Dropout(cfg.dropout)
        dpr = [cfg.drop_path * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(D, cfg.heads, cfg.mlp_ratio, cfg.dropout, p) for p in dpr])
        self.norm = nn.LayerNorm(D, eps=1e-6)


class AllInOne(nn.Module):
    """One transformer for text, video and both: the joint pass (forward_joint), the text-only and video-only
    passes (text_embedding / video_embedding for VTC and retrieval) and the heads. The evaluation code calls the
    passes directly; forward(batch, task) returns one training step's losses."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.width
        self.cfg = cfg
        self.text_embeddings = TextEmbeddings(cfg.vocab_size, cfg.max_text_len, D, cfg.dropout)
        self.token_type_embeddings = nn.Embedding(2, D)  # modality type: 0 = text, 1 = video
        self.transformer = VisualTransformer(cfg)
        self.pooler = nn.Linear(D, D)  # tanh(W x_0 + b) on the text [CLS] of the joint pass
        # pre-training heads
        self.itm_score = nn.Linear(D, 2)  # VTM: [no match, match]
        self.mlm_transform = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D, eps=1e-12))
        self.mlm_decoder = nn.Linear(D, cfg.vocab_size)
        if cfg.tied_mlm_decoder:
            self.mlm_decoder.weight = self.text_embeddings.word_embeddings.weight
        self.txt_proj = nn.Linear(D, cfg.embed_dim)  # VTC projections
        self.vid_proj = nn.Linear(D, cfg.embed_dim)
        self.heads = nn.ModuleDict()  # task heads added by add_task_head (QA / MC / action)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, VisualTransformer):
            nn.init.normal_(m.cls_token, std=0.02)
            nn.init.normal_(m.pos_embed, std=m.pos_init)

    def add_task_head(self, task, num_classes=0, in_dim=0):
        """Downstream heads, named as in the release. QA: Dropout(0.5) -> D -> D/2 -> LN -> GELU -> K;
        MC: Dropout(0.1) -> D -> 256 -> LN -> GELU -> 1; action: the same MLP as QA, or one Linear (input in_dim
        if given: T*D for per-frame probe features)."""
        D = in_dim or self.cfg.width
        if task in ("qa", "action") and not (task == "action" and self.cfg.probe == "linear"):
            head = nn.Sequential(nn.Dropout(0.5), nn.Linear(D, D // 2), nn.LayerNorm(D // 2), nn.GELU(),
                                 nn.Linear(D // 2, num_classes))
        elif task == "action":
            head = nn.Linear(D, num_classes)
        elif task == "mc":
            head = nn.Sequential(nn.Dropout(0.1), nn.Linear(D, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 1))
        else:
            raise ValueError(task)
        head.apply(self._init_weights)
        self.heads[{"qa": "vqa_classifier", "mc": "mc_vqa_classifier", "action": "probe"}[task]] = head
        return head

    # --- input tokens (the outputs, text_embedding and video_embedding, are below)
    def text_tokens(self, ids):                                       # (B, L) -> (B, L, D)
        return self.text_embeddings(ids) + self.token_type_embeddings.weight[0]

    def video_tokens(self, video):
        """video (B, T, 3, H, W) -> (B, T, 1+N, D): patches + spatial pos + temporal[t], CLS + pos[0], + type 1."""
        vt = self.transformer
        B, T = video.shape[:2]
        x = vt.patch_embed.proj(rearrange(video, "b t c h w -> (b t) c h w"))
        x = rearrange(x, "(b t) d gh gw -> b t (gh gw) d", b=B)     # (B, T, N, D)
        x = x + vt.pos_embed[:, 1:].unsqueeze(1) + vt.temporal_embed[:, :T].unsqueeze(2)
        x = shuffle_patches(x, self.cfg)                                # roll_tokens=random
        cls = (vt.cls_token + vt.pos_embed[:, :1]).expand(B * T, 1, -1).reshape(B, T, 1, -1)
        x = vt.pos_drop(torch.cat([cls, x], dim=2))                    # (B, T, 1+N, D)
        return x + self.token_type_embeddings.weight[1]

    # --- the three passes
    def joint_frames(self, text_ids, text_mask, video):
        """The T per-frame joint sequences after the final norm, before averaging: text replicated per frame,
        one [text ; frame] sequence per frame, the temporal layer on the visual part before every block.
        text_ids, text_mask: (B, L); video: (B, T, 3, H, W) -> (B, T, L+1+N, D)."""
        B, T, L = video.shape[0], video.shape[1], text_ids.shape[1]
        v = self.video_tokens(video)                                      # (B, T, 1+N, D)
        if self.cfg.temporal == "flatten":
            return self.joint_flat(self.text_tokens(text_ids), text_mask, v)
        t = self.text_tokens(text_ids).repeat_interleave(T, dim=0)       # (B*T, L, D)
        x = torch.cat([t, rearrange(v, "b t n d -> (b t) n d")], dim=1)  # (B*T, L+1+N, D)
        keep = torch.cat([text_mask.bool().repeat_interleave(T, dim=0),  # text pads masked, every visual token kept
                          text_mask.new_ones(B * T, v.shape[2]).bool()], dim=1)
        mask = keep[:, None, None, :]                                     # (B*T, 1, 1, S), True = attend
        for blk in self.transformer.blocks:
            x = blk(before_block(x, T, self.cfg, text_len=L), mask)    # the temporal layer, then the block
        return rearrange(self.transformer.norm(x), "(b t) s d -> b t s d", t=T)

    def joint_flat(self, text, text_mask, v):
        """temporal=flatten, the paper's joint space-time attention (a row of its comparison, not its method): one
        sequence [text ; frame 0 ; ... ; frame T-1] per clip, every token attending to every frame, no temporal
        layer. Returned in joint_frames' layout, the text copied per frame (so the mean over T leaves it as is).
        text: (B, L, D), text_mask (B, L), v: (B, T, 1+N, D) -> (B, T, L+1+N, D)."""
        B, T, L = v.shape[0], v.shape[1], text.shape[1]
        x = torch.cat([text, v.flatten(1, 2)], dim=1)                     # (B, L + T*(1+N), D)
        keep = torch.cat([text_mask.bool(), text_mask.new_ones(B, T * v.shape[2]).bool()], dim=1)
        for blk in self.transformer.blocks:
            x = blk(x, keep[:, None, None, :])
        x = self.transformer.norm(x)
        vis = rearrange(x[:, L:], "b (t n) d -> b t n d", t=T)
        return torch.cat([x[:, None, :L].expand(-1, T, -1, -1), vis], dim=2)

    def forward_joint(self, text_ids, text_mask, video):
        """Joint pass (release layout): the T copies averaged after the final norm. -> (text_feats (B, L, D),
        video_feats (B, 1+N, D), cls_feats (B, D) = tanh(pooler(text [CLS])))."""
        L = text_ids.shape[1]
        x = self.joint_frames(text_ids, text_mask, video).mean(dim=1)   # (B, L+1+N, D)
        return x[:, :L], x[:, L:], torch.tanh(self.pooler(x[:, 0]))

    def forward_text(self, text_ids, text_mask):
        """Text-only pass (one copy; the release runs T identical copies). -> (B, L, D)."""
        x = self.text_tokens(text_ids)
        mask = text_mask.bool()[:, None, None, :]
        for blk in self.transformer.blocks:
            x = blk(x, mask)
        return self.transformer.norm(x)

    def forward_video(self, video):
        """Video-only pass: each frame alone, averaged over T. As released, no rolling unless roll_unimodal, so
        the retrieval embedding sees time only through the temporal embedding. -> (B, 1+N, D)."""
        return self.forward_frames(video).mean(dim=1)

    def forward_frames(self, video):
        """The video-only pass before the average over time. -> (B, T, 1+N, D)."""
        T = video.shape[1]
        v = self.video_tokens(video)                                      # (B, T, 1+N, D)
        if self.cfg.temporal == "flatten" and self.cfg.roll_unimodal:    # one sequence of all frames
            x = v.flatten(1, 2)
            for blk in self.transformer.blocks:
                x = blk(x)
            return rearrange(self.transformer.norm(x), "b (t n) d -> b t n d", t=T)
        x = rearrange(v, "b t n d -> (b t) n d")
        for blk in self.transformer.blocks:
            if self.cfg.roll_unimodal:
                x = before_block(x, T, self.cfg)
            x = blk(x)
        return rearrange(self.transformer.norm(x), "(b t) n d -> b t n d", t=T)

    def text_embedding(self, text_ids, text_mask):                    # -> (B, P), L2-normalised, fp32
        x = self.forward_text(text_ids, text_mask)                     # (B, L, D)
        if self.cfg.vtc_pool == "mean":                                # mean over the real tokens
            m = text_mask[..., None].to(x.dtype)
            return project(self.txt_proj, (x * m).sum(1) / m.sum(1).clamp_min(1))
        return project(self.txt_proj, x[:, 0])

    def pool_visual(self, x):
        """Visual tokens (..., 1+N, D) -> the VTC feature (..., D): their mean, or the CLS token (vtc_pool)."""
        return x.mean(-2) if self.cfg.vtc_pool == "mean" else x[..., 0, :]

    def video_embedding(self, video):                                 # -> (B, P), L2-normalised, fp32
        return project(self.vid_proj, self.pool_visual(self.forward_video(video)))

    def mlm_logits(self, text_feats):                                 # (..., D) -> (..., V)
        return self.mlm_decoder(self.mlm_transform(text_feats))

    def forward(self, batch, task):
        """One training step's losses, so that DDP sees a single forward per step. The one forward reference of
        the file: the losses are read in their own section below, `step_losses`."""
        return step_losses(self, batch, task)


# ---------------------------------------------------------------------------------------------------------------
# Losses: plain functions of tensors, then the losses of one training step per task

def vtc_loss(text_emb, video_emb, temperature):
    """Symmetric InfoNCE on L2-normalised embeddings (B, P); matching pairs on the diagonal.

    S = t v^T / tau;  L = CE(S, diag) + CE(S^T, diag)  (the release sums both directions, it does not average).
    Different numbers of texts and videos raise: there is no diagonal of pairs.
    """
    if text_emb.shape[0] != video_emb.shape[0]:
        raise ValueError(f"vtc_loss needs as many texts as videos (pairs on the diagonal), got {text_emb.shape[0]} "
                         f"texts and {video_emb.shape[0]} videos")
    sim = text_emb.float() @ video_emb.float().t() / temperature      # (B, B), fp32
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)


def vtm_loss(logits, labels):
    """Video-text matching: CE of the 2-way head on the pooled [CLS]; labels 1 = matched pair."""
    return F.cross_entropy(logits.float(), labels)


def mlm_loss(logits, labels):
    """Masked language modelling: CE over the predicted (masked) tokens only; logits (M, V), labels (M,)."""
    return F.cross_entropy(logits.float(), labels)


def mc_scores(model, batch, head=None):
    """Score every (video, option) pair with a joint pass. batch: video (B, T, 3, H, W), option_ids / option_mask
    (B, O, L). head=None -> the VTM match logit (zero-shot, as released); else head(cls) (fine-tuned).
    Returns (B, O) fp32: the head runs in fp32 even under bf16 autocast, since options that differ in one word
    (the reversed-motion option) get scores closer than bf16's resolution and would tie."""
    B, O, L = batch["option_ids"].shape
    video = batch["video"].repeat_interleave(O, dim=0)                 # (B*O, T, 3, H, W)
    _, _, cls = model.forward_joint(batch["option_ids"].reshape(B * O, L), batch["option_mask"].reshape(B * O, L),
                                    video)
    with torch.autocast(cls.device.type, enabled=False):
        cls = cls.float()
        score = model.itm_score(cls)[:, 1] if head is None else head(cls)[:, 0]
    return score.view(B, O)


def pretrain_losses(model, batch, cfg):
    """One pre-training step: VTC on the whole batch (two unimodal passes) and, on the first
    round(joint_fraction * B) rows, one joint pass holding both the VTM pairs (unmasked text, half the videos
    swapped) and the MLM inputs (masked text, matched video) — the release's two forwards, concatenated."""
    video, ids, mask = batch["video"], batch["text_ids"], batch["text_mask"]
    out, loss = {}, 0.0
    if cfg.vtc_weight > 0:
        t = all_gather_with_grad(model.text_embedding(ids, mask))       # (world*B, P)
        v = all_gather_with_grad(model.video_embedding(video))
        out["vtc"] = vtc_loss(t, v, cfg.temperature)
        loss = loss + cfg.vtc_weight * out["vtc"]
    n = batch["vtm_labels"].shape[0] if cfg.vtm_weight > 0 or cfg.mlm_weight > 0 else 0  # chosen in Collate
    if n:
        vid_idx, labels = batch["vtm_video_index"][:n], batch["vtm_labels"][:n]
        joint_ids = torch.cat([ids[:n], batch["mlm_ids"][:n]])
        joint_mask = torch.cat([mask[:n], mask[:n]])
        joint_video = torch.cat([video[vid_idx], video[:n]])
        text_feats, _, cls = model.forward_joint(joint_ids, joint_mask, joint_video)
        out["vtm"] = vtm_loss(model.itm_score(cls[:n]), labels)
        out["vtm_acc"] = (model.itm_score(cls[:n]).argmax(-1) == labels).float().mean() * 100
        mlm_labels = batch["mlm_labels"][:n]
        picked = mlm_labels != -100                                     # (n, L)
        logits = model.mlm_logits(text_feats[n:][picked])                # (M, V)
        out["mlm"] = mlm_loss(logits, mlm_labels[picked])
        out["mlm_acc"] = (logits.argmax(-1) == mlm_labels[picked]).float().mean() * 100
        loss = loss + cfg.vtm_weight * out["vtm"] + cfg.mlm_weight * out["mlm"]
    out = {k: v.detach() for k, v in out.items()}
    out["loss"] = loss  # the only entry with a graph
    return out


def step_losses(model, batch, task):
    """The losses of one training step of `task` -> dict of detached terms and "loss" (the only entry with a
    graph). pretrain: VTC + VTM + MLM; retrieval: VTC; qa: CE over the train answers (an unseen answer, -100, is
    ignored); mc: CE over the options' fine-tuned scores."""
    if task == "pretrain":
        return pretrain_losses(model, batch, model.cfg)
    if task == "retrieval":
        loss = vtc_loss(all_gather_with_grad(model.text_embedding(batch["text_ids"], batch["text_mask"])),
                        all_gather_with_grad(model.video_embedding(batch["video"])), model.cfg.temperature)
        return {"loss": loss, "vtc": loss.detach()}
    if task == "qa":
        logits = model.heads["vqa_classifier"](model.forward_joint(batch["text_ids"], batch["text_mask"],
                                                                   batch["video"])[2]).float()
        loss = F.cross_entropy(logits, batch["label"], ignore_index=-100)
        return {"loss": loss, "qa": loss.detach()}
    if task == "mc":
        logits = mc_scores(model, batch, model.heads["mc_vqa_classifier"])   # (B, options)
        loss = F.cross_entropy(logits, batch["label"])
        return {"loss": loss, "mc": loss.detach()}
    raise ValueError(task)


# ---------------------------------------------------------------------------------------------------------------
# Data: annotation readers, clip decoding, batches (the twin sampler, MLM masks and VTM pairs)
#
# One property of the synthetic corpus is used here (not in the papers' data): about a quarter of its training clips
# that move have a *time-reversed twin*, the same frames in reverse order under a caption with every motion reversed
# ("slides to the left" <-> "slides to the right"), the two rows naming each other in the CSV's `reverse_of` column.
# Frame by frame the pair look alike; only their order differs, so each is the other's hardest negative:
# `twin_batches` puts both in one batch (for VTC) and VTM prefers the twin as the mismatched video (departure 4).

CLIP_CACHE = ClipCache()  # path -> every decoded frame, uint8 (F, H, W, 3); per process (the training worker, or main)


def decode_clip(path, cfg, train, rng=None, sample=None):
    """Sample T frames (random per bin in training, bin midpoints otherwise; `sample` = "rand" | "uniform" overrides
    it, e.g. for random evaluation views) -> (T, 3, S, S) float.

    With cache_videos, a clip is decoded once in full and later epochs sample from memory (decoding dominates the
    step time of a tiny model on 64x64 clips). No flip: it would turn "moves left" into "moves right". The crop
    scale stands in for the release's resize-to-1.2x-then-random-crop."""
    sample = sample or ("rand" if train else "uniform")
    if cfg.cache_videos:
        frames = CLIP_CACHE.get(path, lambda: read_frames(path, range(video_meta(path).num_frames)))
        if frames is None:  # unreadable: decoded once, named again each time the clip is drawn
            raise VideoReadError(CLIP_CACHE.unreadable[path])
        frames = frames[sample_frame_indices(len(frames), cfg.num_frames, sample, rng=rng)]
    else:
        frames, _ = load_clip(path, cfg.num_frames, sample, rng=rng)
    video, _ = VideoTransform(cfg.img_size, train, scale=(0.7, 1.0), flip=False)(frames, rng=rng)
    return video


def preload_clips(paths):
    """Decode whole training videos into CLIP_CACHE ahead of training, several at a time, so that the first epoch
    samples from memory instead of waiting for the decoder. -> {path: error} of the unreadable ones (kept as
    unreadable: decode_clip raises for them when drawn, without decoding them again)."""
    frames, unreadable = decode_videos(paths, threads=min(8, os.cpu_count() or 1))
    for path, clip in frames.items():
        CLIP_CACHE.put(path, clip)
    for path, error in unreadable.items():
        CLIP_CACHE.unreadable[path] = error
        CLIP_CACHE.put(path, None)
    return unreadable


def read_webvid(root, split):
    """WebVid CSV (videoid, contentUrl, duration, page_dir, name[, reverse_of]) -> a Table of rows dict(id, text,
    reverse_of, page_dir, path, twin), columnar and cached beside the CSV (common/annotations.py: WebVid-10M has
    10.7 M rows). Rows without an id, with an empty caption, a repeated id or a path leaving the corpus are bad rows
    (skipped and counted, or an error with --strict)."""
    path, seen = Path(root) / "webvid" / f"results_{split}.csv", set()
    videos = str(Path(root) / "webvid" / "videos")

    def parse(r):
        vid = text_field(r, "videoid")
        if vid in seen:
            raise BadRow(f"duplicate videoid {vid!r}")
        seen.add(vid)
        inside(videos, text_field(r, "page_dir"), f"{vid}.mp4")
        return dict(id=vid, text=text_field(r, "name"), reverse_of=r.get("reverse_of") or "", page_dir=r["page_dir"])
    rows = read_table(path, parse, columns=("videoid", "page_dir", "name"), version="all_in_one.webvid/1")
    twin = np.full(len(rows), -1, dtype=np.int64)  # twin index, both directions (only the synthetic corpus has any)
    if len(rows) and any(rows.distinct("reverse_of")):
        reverse_of, index = rows.columns["reverse_of"], {rows.columns["id"][i]: i for i in range(len(rows))}
        for i in range(len(rows)):
            twin[i] = index.get(reverse_of[i], -1)
        for i in range(len(rows)):
            if twin[i] >= 0 and twin[twin[i]] < 0:
                twin[twin[i]] = i
    rows.twin = twin
    rows.extra = lambda r, i: dict(path=os.path.join(videos, r["page_dir"], f"{r['id']}.mp4"), twin=int(twin[i]))
    return rows


def msrvtt_video(root, vid):
    """The path of MSR-VTT video `vid`; an id that would leave the corpus (`../x`, `/etc/x`) is a BadRow."""
    return inside(str(Path(root) / "msrvtt" / "videos" / "all"), f"{vid}.mp4")


def read_msrvtt(root, split):
    """MSR-VTT: split ids + MSR_VTT.json captions -> list of (video_id, path, [captions]). An annotation without
    image_id / caption, or with an empty caption, is a bad row (named by its index in "annotations")."""
    base = Path(root) / "msrvtt"
    ids = read_rows(base / "splits" / f"{split}_list.txt", lambda line: (line, msrvtt_video(root, line)), "lines")
    json_path = base / "annotation" / "MSR_VTT.json"
    caps = {}
    for n, a in enumerate(read_json(json_path)["annotations"]):
        try:
            caps.setdefault(a["image_id"], []).append(text_field(a, "caption"))
        except (BadRow, KeyError, TypeError) as e:
            bad_row(json_path, f"annotations[{n}]", str(e) if isinstance(e, BadRow) else f"missing {e}")
    return [(v, path, caps[v]) for v, path in ids if v in caps]


def read_jsonl(path):
    """JSON lines -> list of dicts; a malformed line is a bad row (skipped and named, or an error with --strict)."""
    return read_rows(path, lambda row: row, "jsonl")


ACTION_PROMPT = "a person is doing [MASK]"  # the release's K400 prompt (without its "persion" typo)


def build_task_items(cfg, task, split, answer_vocab=None):
    """The items of a downstream split, as dicts for ClipTextDataset (text / options / label)."""
    root = Path(cfg.data_root) / "msrvtt"

    def mc(q):
        options = q["options"]
        if not (isinstance(options, list) and options and all(isinstance(o, str) and o.strip() for o in options)):
            raise BadRow("options must be a list of non-empty texts")
        if not 0 <= int(q["answer"]) < len(options):
            raise BadRow(f"answer {q['answer']} is not an option index")
        return dict(path=msrvtt_video(cfg.data_root, q["clip_name"]), options=options, label=int(q["answer"]),
                    reversed_option=q["reversed_option"] if q.get("reversed_option") is not None else -1)

    def action(line):
        rel, label = line.rsplit("\t", 1)
        return dict(path=inside(str(root), rel), text=ACTION_PROMPT, label=int(label))
    if task == "retrieval":
        items = [dict(path=p, text=caps, vid=v) for v, p, caps in read_msrvtt(cfg.data_root, split)]
    elif task == "qa":  # an answer outside the train answers is label -100: scored wrong, counted as qa/unseen
        items = read_rows(root / f"msrvtt_qa_{split}.jsonl", lambda q: dict(
            path=msrvtt_video(cfg.data_root, q["video_id"]), text=text_field(q, "question"),
            answer=text_field(q, "answer"), label=(answer_vocab or {}).get(q["answer"], -100)), "jsonl")
    elif task == "mc":
        items = read_rows(root / f"msrvtt_mc_{split}.jsonl", mc, "jsonl")
    elif task == "action":
        items = read_rows(root / "action" / f"{split}.list", action, "lines")
    else:
        raise ValueError(task)
    return items[: cfg.max_eval_items] if cfg.max_eval_items and split != "train" else items


class ClipTextDataset(torch.utils.data.Dataset):
    """(video path, text or texts, extra) items -> dict(video, text, index, ...). A text list means "draw one at
    random" (MSR-VTT training). An unreadable video returns dict(bad_video=path, error); the collate drops it.
    view = k (evaluation only): frames drawn at random in each bin with a generator seeded by (seed, k, item), centre
    crop -- the k-th of the release's retrieval views; None = bin midpoints."""

    def __init__(self, items, cfg, train, view=None):
        self.items, self.cfg, self.train, self.view = items, cfg, train, view

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            if self.view is None:
                video = decode_clip(item["path"], self.cfg, self.train)
            else:
                rng = random.Random(f"{self.cfg.seed}/{self.view}/{i}")
                video = decode_clip(item["path"], self.cfg, False, rng=rng, sample="rand")
        except VideoReadError as e:
            return dict(bad_video=item["path"], error=str(e))  # the collate drops it; the loop names and counts it
        text = item.get("text", "")
        if isinstance(text, list):
            text = random.choice(text) if self.train else text[0]
        return dict(item, video=video, text=text, index=i)


class TwinBatchSampler(torch.utils.data.Sampler):
    """Endless random batches; with twins=True each clip's time-reversed twin rides in the same batch (as the
    next row), so the pair are each other's hard negatives. Under torchrun each rank runs its own sampler with its
    own seed (make_loader): the ranks draw independent streams, as a shuffled DistributedSampler would."""

    def __init__(self, twin, batch_size, twins, seed):
        self.twin, self.batch_size, self.twins, self.seed = twin, batch_size, twins, seed
        self.skip = 0  # batches to pass over first: a resumed run continues the interrupted run's data order

    def __iter__(self):
        epoch, skip = 0, self.skip
        while True:
            g = random.Random(self.seed * 1000 + epoch)
            groups = [[i] + ([self.twin[i]] if self.twins and self.twin[i] >= 0 else [])
                      for i in range(len(self.twin)) if not (self.twins and 0 <= self.twin[i] < i)]
            g.shuffle(groups)
            batches, cur = [], []
            for grp in groups:
                if len(cur) + len(grp) > self.batch_size:
                    batches.append(cur)
                    cur = []
                cur += grp
            for b in batches:  # (the last, partial batch is dropped)
                if skip:
                    skip -= 1
                else:
                    yield b
            epoch += 1


def vtm_negatives(n_joint, batch_size, twin, generator=None):
    """Choose the VTM pairs for the first n_joint rows of a batch of batch_size clips.

    Exactly floor(n_joint/2) rows, at random, get another clip's video: the row's time-reversed twin when it is in
    the batch (twin[i] >= 0), else a random other clip. Returns (video_index (n_joint,), labels (n_joint,))."""
    labels = torch.ones(n_joint, dtype=torch.long)
    neg = torch.randperm(n_joint, generator=generator)[: n_joint // 2]
    labels[neg] = 0
    video_index = torch.arange(n_joint)
    for i in neg.tolist():
        if twin[i] >= 0:
            video_index[i] = int(twin[i])
        else:
            j = int(torch.randint(batch_size - 1, (1,), generator=generator))
            video_index[i] = j + (j >= i)  # any clip but i
    return video_index, labels


class Collate:
    """List of items -> batch dict: stacked videos, tokenized texts, MLM inputs, VTM pairs (pre-training), labels
    and options (downstream). Drops the unreadable videos: their (path, error) go to batch["bad_videos"], their
    number to batch["skipped"]."""

    def __init__(self, tokenizer, cfg, task):
        self.tok, self.cfg, self.task = tokenizer, cfg, task

    def __call__(self, items):
        kept = [it for it in items if "bad_video" not in it]
        batch = {"skipped": len(items) - len(kept),
                 "bad_videos": [(it["bad_video"], it["error"]) for it in items if "bad_video" in it]}
        if not kept:
            return batch
        batch["video"] = torch.stack([it["video"] for it in kept])       # (B, T, 3, H, W)
        batch["index"] = torch.tensor([it["index"] for it in kept])       # dataset rows of the kept clips
        if "options" in kept[0]:                                          # multiple choice
            O = len(kept[0]["options"])
            tok = self.tok([o for it in kept for o in it["options"]], self.cfg.max_text_len, pad_to_max=False)
            batch["option_ids"] = tok["input_ids"].view(len(kept), O, -1)
            batch["option_mask"] = tok["attention_mask"].view(len(kept), O, -1)
        else:
            tok = self.tok([it["text"] for it in kept], self.cfg.max_text_len, pad_to_max=False)
            batch["text_ids"], batch["text_mask"] = tok["input_ids"], tok["attention_mask"]
        for key in ("label", "reversed_option"):
            if key in kept[0]:
                batch[key] = torch.tensor([it[key] for it in kept])
        if self.task == "pretrain":
            batch["mlm_ids"], batch["mlm_labels"] = whole_word_mask(batch["text_ids"], batch["text_mask"], self.tok,
                                                                    prob=self.cfg.mlm_prob)
            pos = {it["index"]: r for r, it in enumerate(kept)}             # dataset index -> row in this batch
            twin = [pos.get(it.get("twin", -1), -1) if self.cfg.twin_batches else -1 for it in kept]
            n = max(2, round(self.cfg.joint_fraction * len(kept)))
            batch["vtm_video_index"], batch["vtm_labels"] = vtm_negatives(min(n, len(kept)), len(kept), twin)
        return batch


def num_action_classes(cfg):
    """The number of action classes: the non-empty lines of msrvtt/action/classes.txt."""
    classes = (Path(cfg.data_root) / "msrvtt" / "action" / "classes.txt").read_text().split("\n")
    return len([c for c in classes if c.strip()])


def make_loader(dataset, collate, cfg, dist, train, twin=None):
    """Training: endless batches from TwinBatchSampler; evaluation: one ordered pass over the whole split."""
    if train:
        sampler = TwinBatchSampler(twin if twin is not None else [-1] * len(dataset), cfg.batch_size,
                                   cfg.twin_batches and twin is not None, cfg.seed + 7919 * dist.rank)
        # each rank draws its own stream (seeded by rank), the DDP equivalent of a shuffled DistributedSampler
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                           **loader_settings(cfg.num_workers, dist.device, print0),  # <= cores
                                           generator=torch.Generator().manual_seed(cfg.seed))  # not the global one

    # evaluation decodes in the main process, so the clip cache survives from one evaluation to the next
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, collate_fn=collate)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation (rank 0 computes on the full split; other ranks wait)

@torch.no_grad()
def run_eval_batches(model, loader, device, precision, fn):
    """Apply fn(batch) -> dict of tensors to every batch; concatenate. Also returns the skipped count."""
    outs, skipped = {}, 0
    for batch in loader:
        skipped += batch["skipped"]
        if "video" not in batch:
            continue
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast(device, precision):
            for k, v in fn(batch).items():
                outs.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}, skipped


@torch.no_grad()
def evaluate_retrieval(model, cfg, tok, split, device):
    """Text->video and video->text retrieval by cosine similarity in fp32, under the protocol of two fields:

    retrieval_captions  "first": one query per video, its first caption (MSR-VTT 1k-A scores one caption per video;
                        the same protocol as oa_trans.py's default) | "all": every caption of every video, several
                        queries sharing a video (v2t counts the best-ranked one).
    retrieval_views     V = 1: frames at the bin midpoints. V > 1: V random samplings (centre crop), similarities
                        averaged over the views, as the release (3 views). The average of t . v_k over k is
                        t . mean_k(v_k), so the views' unit-norm video embeddings are averaged.
    Clips that cannot be read are left out with their captions. -> (metrics, skipped, number of videos)."""
    assert cfg.retrieval_captions in ("first", "all") and cfg.retrieval_views >= 1, (cfg.retrieval_captions,
                                                                                     cfg.retrieval_views)
    items = build_task_items(cfg, "retrieval", split)
    views, kept = [], None
    for view in range(cfg.retrieval_views):
        ds = ClipTextDataset(items, cfg, train=False, view=view if cfg.retrieval_views > 1 else None)
        out, skipped = run_eval_batches(model, make_loader(ds, Collate(tok, cfg, "eval"), cfg, None, False), device,
                                        cfg.precision, lambda b: dict(v=model.video_embedding(b["video"]),
                                                                      i=b["index"]))
        views.append(out["v"].float())                                    # (V', P), V' readable videos
        kept = out["i"].long().tolist()
    video = torch.stack(views).mean(0)                                    # (V', P)
    captions, caption_video = [], []
    for col, row in enumerate(kept):
        texts = items[row]["text"] if cfg.retrieval_captions == "all" else items[row]["text"][:1]
        captions += texts
        caption_video += [col] * len(texts)
    text = []
    for s in range(0, len(captions), cfg.eval_batch_size):
        t = tok(captions[s:s + cfg.eval_batch_size], cfg.max_text_len, pad_to_max=False)
        with autocast(device, cfg.precision):
            text.append(model.text_embedding(t["input_ids"].to(device), t["attention_mask"].to(device)).float().cpu())
    sim = torch.cat(text) @ video.t()                                     # (captions, videos), fp32
    return retrieval_metrics(sim, torch.tensor(caption_video)), skipped, sim.shape[1]


def evaluate_mc(model, cfg, tok, split, device, zero_shot):
    """Multiple choice accuracy (chance 20%), plus order_acc: the truth against its reversed-motion option only,
    on the questions that have one (chance 50%), i.e. the `mc_order/acc` probe of temporal order (mc_metrics)."""
    ds = ClipTextDataset(build_task_items(cfg, "mc", split), cfg, train=False)
    head = None if zero_shot else model.heads["mc_vqa_classifier"]
    out, skipped = run_eval_batches(model, make_loader(ds, Collate(tok, cfg, "eval"), cfg, None, False), device,
                                    cfg.precision, lambda b: dict(s=mc_scores(model, b, head), y=b["label"],
                                                                  r=b["reversed_option"]))
    return mc_metrics(out["s"], out["y"].long(), out["r"].long()), skipped, len(out["y"])


def mc_metrics(scores, label, reversed_option):
    """scores (N, O), the true option (N,), the reversed-motion option or -1 (N,) -> acc, and over the questions
    that have a reversed option, order_acc and order_ties (%). A tie is a coin flip: tied options share the
    credit. (Counting a tie as wrong put order-blind models below chance when the scores were bf16.)"""
    top = (scores == scores.max(-1, keepdim=True).values).float()       # the best-scored options, ties included
    m = {"acc": (top.gather(1, label[:, None])[:, 0] / top.sum(-1)).mean().item() * 100}
    has = reversed_option >= 0
    if has.any():
        truth = scores[has].gather(1, label[has, None])[:, 0]
        other = scores[has].gather(1, reversed_option[has, None])[:, 0]
        m["order_acc"] = ((truth > other).float() + 0.5 * (truth == other).float()).mean().item() * 100
        m["order_ties"] = (truth == other).float().mean().item() * 100
    return m


def evaluate_qa(model, cfg, tok, split, device, answer_vocab):
    ds = ClipTextDataset(build_task_items(cfg, "qa", split, answer_vocab), cfg, train=False)
    out, skipped = run_eval_batches(
        model, make_loader(ds, Collate(tok, cfg, "eval"), cfg, None, False), device, cfg.precision,
        lambda b: dict(p=model.heads["vqa_classifier"](model.forward_joint(b["text_ids"], b["text_mask"],
                                                                           b["video"])[2]).argmax(-1), y=b["label"]))
    pred, y = out["p"].long(), out["y"].long()
    return {"acc": (pred == y).float().mean().item() * 100,                # y = -100 (unseen answer) is wrong
            "oov": (y == -100).float().mean().item() * 100}, skipped, len(y)


# The words of the synthetic captions that name a direction of motion ("slides to the [left]", "gets [bigger]",
# "[vanishes]"). Each has a time-reversed counterpart, so given the caption's other words, the video, read in order,
# is what decides it.
MOTION_WORDS = ("left", "leftward", "right", "rightward", "up", "upward", "rises", "down", "downward", "falls",
                "sinks", "grows", "bigger", "expands", "larger", "swells", "shrinks", "smaller", "contracts",
                "appears", "disappears", "vanishes")


def evaluate_mlm_motion(model, cfg, tok, split, device):
    """mlm_motion: mask every motion word of each clip's first caption (all [MASK], no 80/10/10) and predict it
    from the joint pass. Two controls with the same masks: the clip's frames played backwards (a model that reads
    frame order should now be wrong on reversible motions) and another clip's video (what the text alone gives)."""
    motion = torch.tensor(sorted(tok.vocab[w] for w in MOTION_WORDS if w in tok.vocab))
    ds = ClipTextDataset(build_task_items(cfg, "retrieval", split), cfg, train=False)

    def fn(b):
        ids = b["text_ids"]
        picked = torch.isin(ids, motion.to(ids.device))                  # (B, L)
        masked = ids.masked_fill(picked, tok.mask_id)
        out = {}
        for name, video in (("correct", b["video"]), ("reversed", b["video"].flip(1)),
                            ("other", b["video"].roll(1, dims=0))):
            text_feats, _, _ = model.forward_joint(masked, b["text_mask"], video)
            out[name] = (model.mlm_logits(text_feats[picked]).argmax(-1) == ids[picked]).float()
        return out

    out, skipped = run_eval_batches(model, make_loader(ds, Collate(tok, cfg, "eval"), cfg, None, False), device,
                                    cfg.precision, fn)
    pct = lambda k: out[k].mean().item() * 100 if k in out and len(out[k]) else float("nan")
    return {"acc": pct("correct"), "acc_reversed_video": pct("reversed"), "acc_other_video": pct("other"),
            "n": len(out.get("correct", []))}, skipped, len(ds)


@torch.no_grad()
def probe_features(model, cfg, tok, split, device):
    """Frozen features for the action probe (before the pooler, which the release keeps trainable). joint: the text
    [CLS] of the joint pass of ACTION_PROMPT with the clip, as released; video: the video-only pass pooled as for
    VTC (vtc_pool), i.e. the retrieval features before the projection; frames: the same per frame, kept in time
    order, so that the probe itself can compare frames (a late-fusion probe: it measures what each frame's
    features hold, not the model's own temporal modelling). -> (features (N, D) or (N, T, D), labels (N,), skipped)."""
    ds = ClipTextDataset(build_task_items(cfg, "action", split), cfg, train=False)

    def fn(b):
        if cfg.probe_features in ("video", "frames"):
            x = model.pool_visual(model.forward_frames(b["video"]))      # (B, T, D)
            return dict(x=x if cfg.probe_features == "frames" else x.mean(1), y=b["label"])
        return dict(x=model.forward_joint(b["text_ids"], b["text_mask"], b["video"])[0][:, 0], y=b["label"])

    out, skipped = run_eval_batches(model, make_loader(ds, Collate(tok, cfg, "eval"), cfg, None, False), device,
                                    cfg.precision, fn)
    return out["x"].float(), out["y"].long(), skipped


def action_probe(model, cfg, tok, device, num_classes):
    """Action recognition by a probe on frozen features (release: trainable pooler + 2-layer MLP, called "linear";
    `probe=linear`: one Linear on the frozen pooled features). Selected on val, reported on test."""
    model.eval()
    feats = {s: probe_features(model, cfg, tok, s, device) for s in ("train", "val", "test")}
    pooler = copy.deepcopy(model.pooler).float().cpu()
    in_dim = feats["train"][0][0].numel()                              # D, or T*D for per-frame features
    head = model.add_task_head("action", num_classes, in_dim).float().cpu()
    params = list(head.parameters()) + (list(pooler.parameters()) if cfg.probe == "mlp" else [])
    pooler.requires_grad_(cfg.probe == "mlp")
    opt = torch.optim.AdamW(params, lr=cfg.probe_lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    predict = lambda x: head(torch.tanh(pooler(x)).flatten(1))          # the pooler acts on each frame's D
    x, y, _ = feats["train"]
    best, best_state = -1.0, None
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.probe_epochs):
        head.train()
        for idx in torch.randperm(len(y), generator=g).split(256):
            loss = F.cross_entropy(predict(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 10 == 9 or epoch == cfg.probe_epochs - 1:
            head.eval()
            with torch.no_grad():
                val = accuracy(predict(feats["val"][0]).argmax(-1), feats["val"][1])
            if val > best:
                best, best_state = val, copy.deepcopy((head.state_dict(), pooler.state_dict()))
    head.load_state_dict(best_state[0])
    pooler.load_state_dict(best_state[1])
    head.eval()
    with torch.no_grad():
        test = accuracy(predict(feats["test"][0]).argmax(-1), feats["test"][1])
    skipped = sum(f[2] for f in feats.values())
    return {"action/acc": test, "action/val_acc": best, "action/chance": 100.0 / num_classes,
            "action/skipped_videos": skipped}


def evaluate_task(model, cfg, tok, task, split, device, answer_vocab=None):
    """One evaluation -> flat metrics {"<task>/<metric>": value}. `zeroshot` = the end-of-pre-training suite."""
    model.eval()
    m = {}
    if task in ("zeroshot", "retrieval"):
        r, skipped, n = evaluate_retrieval(model, cfg, tok, split, device)
        m.update({f"retrieval/{k}": v for k, v in r.items()})
        m.update({"retrieval/num_clips": n, "retrieval/chance_R@1": 100.0 / max(1, n), "retrieval/skipped": skipped})
    if task == "zeroshot" or task == "mc":
        zero_shot = "mc_vqa_classifier" not in model.heads
        r, skipped, n = evaluate_mc(model, cfg, tok, split, device, zero_shot)
        m.update({"mc/acc": r["acc"], "mc/num_questions": n, "mc/skipped": skipped})
        if "order_acc" in r:
            m["mc_order/acc"], m["mc_order/ties"] = r["order_acc"], r["order_ties"]
    if task == "zeroshot":
        r, skipped, n = evaluate_mlm_motion(model, cfg, tok, split, device)
        m.update({"mlm_motion/acc": r["acc"], "mlm_motion/acc_reversed_video": r["acc_reversed_video"],
                  "mlm_motion/acc_other_video": r["acc_other_video"], "mlm_motion/num_tokens": r["n"]})
    if task == "qa":
        r, skipped, n = evaluate_qa(model, cfg, tok, split, device, answer_vocab)
        m.update({"qa/acc": r["acc"], "qa/unseen_answer_pct": r["oov"], "qa/num_questions": n, "qa/skipped": skipped})
    model.train()
    return m


SELECT_METRIC = {"pretrain": "retrieval/t2v_R@1", "retrieval": "retrieval/t2v_R@1", "qa": "qa/acc", "mc": "mc/acc"}
VAL_TASK = {"pretrain": "retrieval", "retrieval": "retrieval", "qa": "qa", "mc": "mc"}


# ---------------------------------------------------------------------------------------------------------------
# Training: the pieces main() calls by name (the model and its heads, the data, the optimiser, validation), then
# main(), the training story. Run start-up, checkpoints, step timing and the end-of-run summary: common/train.py.

def backbone_parameters(model):
    """Parameters of the shared transformer + text embeddings + modality embedding + pooler: the paper's count
    (12M / 33M / 110M for Ti / S / B). Pre-training and task heads are excluded."""
    parts = (model.text_embeddings, model.token_type_embeddings, model.transformer, model.pooler)
    return sum(p.numel() for m in parts for p in m.parameters())


def build_model(cfg, tok, device):
    """The model of this run, its task heads and its starting weights -> (model on device, answer_vocab or None).

    The architecture is the Config's, or --init's when that is one of our checkpoints (its ARCH_FIELDS). Heads: QA
    classifies over the train answers (most frequent first); MC gets its head when fine-tuned, or evaluated from a
    checkpoint that has one (else MC is zero-shot). Weights: --init_video (a timm ViT), --init_text (BERT's
    embeddings), then --init (a whole model), each reported key by key (common/weights.py)."""
    init = load_checkpoint(cfg.init, paper="all_in_one") if cfg.init else None
    init_state = find_state_dict(init) if init is not None else {}
    if isinstance(init, dict) and isinstance(init.get("config"), dict):  # ours: the architecture is the checkpoint's
        for k in ARCH_FIELDS:
            if k in init["config"]:  # (checkpoints from before a field existed keep this run's value)
                setattr(cfg, k, init["config"][k])
    if cfg.vocab_size == 0:
        cfg.vocab_size = tok.vocab_size
    check_vocab(tok, cfg.vocab_size)  # a token id past the word-embedding table would fail mid-run
    model = AllInOne(cfg)
    answer_vocab = None
    if cfg.finetune == "qa" or cfg.eval == "qa":
        counts = Counter(q["answer"] for q in build_task_items(cfg, "qa", "train"))
        answer_vocab = {a: i for i, (a, _) in enumerate(counts.most_common())}
        model.add_task_head("qa", len(answer_vocab))
    if cfg.finetune == "mc" or (cfg.eval == "mc" and any("mc_vqa_classifier." in k for k in init_state)):
        model.add_task_head("mc")
    load_weights(model, [(cfg.init_video, VIT_INIT), (cfg.init_text, BERT_INIT)], "all_in_one", log=print0)
    if cfg.init_video:  # from image weights the time code starts at zero, as released (departure 10)
        model.transformer.temporal_embed.data.zero_()
    if cfg.init:  # (read above for its architecture and heads: loaded from memory, not read twice)
        print0(load_into(model, init_state, **FULL_MODEL, source=cfg.init))
    if cfg.width in PAPER_INIT and not (cfg.init or cfg.init_video):
        print0(f"note: paper-size backbone from random weights; the paper starts from timm's {PAPER_INIT[cfg.width]}"
               f" (--init_video) and loads no BERT weights (only bert-base-uncased's vocab.txt, --vocab_file)")
    model.to(device)
    trained = not (cfg.eval or cfg.finetune == "action")  # (the action probe trains a head on frozen features)
    print0(compile_blocks(list(model.transformer.blocks), cfg.compile, device, cfg.max_steps if trained else 0))
    print0(f"All-in-one: D={cfg.width} depth={cfg.depth} temporal={cfg.temporal} "
           f"params={count_parameters(model) / 1e6:.2f}M (backbone+text emb {backbone_parameters(model) / 1e6:.2f}M)")
    return model, answer_vocab


def evaluate_only(model, cfg, dist, tok, answer_vocab):
    """No backbone training: --eval=<task> on test (and with --pictures, the pictures), or --finetune=action, a
    probe trained on frozen features and selected on val. -> (metrics, what they are)."""
    if (cfg.eval or cfg.finetune) == "action":
        metrics = action_probe(model, cfg, tok, dist.device, num_action_classes(cfg))
    else:
        metrics = evaluate_task(model, cfg, tok, cfg.eval, "test", dist.device, answer_vocab)
    if cfg.eval and cfg.pictures and dist.is_main:
        draw_pictures(model, cfg, tok, dist.device)
    return metrics, f"{cfg.eval} on test" if cfg.eval else "action probe (selected on val), test"


def training_data(cfg, task, tok, dist, answer_vocab, logger):
    """The training set of `task` and its endless loader -> (dataset, loader, bad: the unreadable videos met).

    Every annotation file a later evaluation reads is read now: a missing val list or a malformed MSR_VTT.json
    stops the run here, not at step eval_every with nothing saved. With cache_videos (and no workers, which would
    each fill their own cache) the training videos are decoded into RAM first."""
    if task == "pretrain":
        rows = read_webvid(cfg.data_root, "train")
        dataset, twin = ClipTextDataset(rows, cfg, train=True), rows.twin
    else:
        dataset, twin = ClipTextDataset(build_task_items(cfg, task, "train", answer_vocab), cfg, train=True), None
    if len(dataset) < cfg.batch_size:  # the sampler yields full batches only: it would never yield one
        raise no_items(len(dataset), cfg.batch_size)  # (none at all: the bad-row count and the first reasons)
    for t, split in ((VAL_TASK[task], "val"), ("zeroshot" if task == "pretrain" else task, "test")):
        for sub in ("retrieval", "mc") if t == "zeroshot" else (t,):
            build_task_items(cfg, sub, split, answer_vocab)
    loader = make_loader(dataset, Collate(tok, cfg, task), cfg, dist, True, twin)
    bad = BadVideos(len(dataset), cfg.max_bad_videos, log=print0, logger=logger)
    if cfg.cache_videos and cfg.num_workers == 0:
        t = time.time()
        unreadable = preload_clips([it["path"] for it in dataset.items])
        print0(f"decoded {len(dataset.items)} training clips into RAM in {time.time() - t:.0f} s "
               f"({len(unreadable)} unreadable)")
        bad.add(sorted(unreadable.items()), skipped=0)  # a corpus too broken stops here
    if skipped_rows():
        logger.log({"bad_rows": skipped_rows()})
    print0(f"task={task}: {len(dataset)} training items; contrastive batch = {cfg.batch_size} x {dist.world_size} "
           f"ranks = {cfg.batch_size * dist.world_size} (grad_accum={cfg.grad_accum} adds no negatives); "
           f"optimizer batch = {cfg.batch_size * cfg.grad_accum * dist.world_size}")
    return dataset, loader, bad


def make_optimizer(model, cfg, device):
    """AdamW, no weight decay on biases / norms / tokens (param_groups), the new task heads at lr x head_lr_mult
    (each group's `lr_mult`, applied by set_lr)."""
    groups = []
    for g in param_groups(model, cfg.weight_decay):
        for is_head in (False, True):
            ps = [p for p in g["params"] if any(p is q for q in model.heads.parameters()) == is_head]
            if ps:
                groups.append({"params": ps, "weight_decay": g["weight_decay"],
                               "lr_mult": cfg.head_lr_mult if is_head else 1.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8,
                             fused=device.type in ("cpu", "cuda"))  # one kernel for all tensors


def set_lr(opt, step, cfg):
    """The schedule's learning rate at `step` (warm-up, then `schedule`) into every group -> lr."""
    lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule)
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_mult"]
    return lr


def validate(model, cfg, tok, task, step, device, answer_vocab, logger, best, best_state):
    """Evaluate on val and log it. Model selection (fine-tuning): weights that beat the best score so far are kept
    and written to best.pt; pre-training keeps its last weights (the score is still tracked). -> (best, best_state)."""
    m = evaluate_task(model, cfg, tok, VAL_TASK[task], "val", device, answer_vocab)
    logger.log({"step": step, **{f"val/{k}": v for k, v in m.items()}})
    tqdm.write(f"step {step} val: " + " ".join(f"{k}={v:.2f}" for k, v in m.items()
                                               if k.endswith(("R@1", "R@5", "MdR", "acc"))))
    if m[SELECT_METRIC[task]] > best:
        best = m[SELECT_METRIC[task]]
        if task != "pretrain":
            best_state = copy.deepcopy(model.state_dict())
            save_checkpoint({"model": best_state, "step": step, "config": config_to_dict(cfg), "best": best,
                             "paper": "all_in_one"}, os.path.join(cfg.out_dir, "best.pt"))
    return best, best_state


@user_errors  # a failure the user can fix (path, data file, weights, disk) is one `error:` line (common/errors.py)
def main(argv=None):
    # --- set-up: the config, then strict, process group, precision, seed, corpus, inputs, out_dir, log (start_run)
    cfg = parse_config(Config, argv, PRESETS, CHOICES, RANGES)
    dist, logger = start_run(cfg, Config.data_root,
                             ["msrvtt"] + ([] if cfg.finetune or cfg.eval else ["webvid/results_train.csv"]))
    device, task = dist.device, cfg.finetune or (cfg.eval and "eval") or "pretrain"
    tok = Tokenizer(cfg.vocab_file or str(Path(cfg.data_root) / "vocab.txt"))

    # --- the model, its task heads and starting weights; --eval and the action probe end here
    model, answer_vocab = build_model(cfg, tok, device)
    if cfg.eval or cfg.finetune == "action":
        metrics, what = evaluate_only(model, cfg, dist, tok, answer_vocab)
        return end_run(cfg, dist, metrics, f"All-in-one: {what}")

    # --- data, optimiser, and where an interrupted run stopped (--resume)
    dataset, loader, bad = training_data(cfg, task, tok, dist, answer_vocab, logger)
    opt = make_optimizer(model, cfg, device)
    step, best, best_state, drawn, rng = 0, -1.0, None, 0, None
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume:
        ck = resume_state(ckpt_path, model, opt, "all_in_one", logger)
        step, best, drawn, rng = ck["step"], ck.get("best", -1.0), ck.get("batches_drawn", 0), ck.get("rng")
        if task != "pretrain" and os.path.exists(os.path.join(cfg.out_dir, "best.pt")):  # val-selected weights
            best_state = load_checkpoint(os.path.join(cfg.out_dir, "best.pt"), paper="all_in_one")["model"]
        loader.batch_sampler.skip = drawn  # the same data order as if the run had not stopped
        bad.load(ck.get("bad_videos"))
    ddp = model
    if dist.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=True)  # e.g. MLM head when mlm_weight=0

    # --- the loop: validate and checkpoint, then one optimiser step
    batches = iter(loader)
    if rng:  # after iter(): python / numpy / torch draws continue as in the interrupted run (exact with num_workers=0)
        set_rng_states(rng)
    clock, start_step = StepClock(), step  # step timing and the time spent waiting for data
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not dist.is_main, desc=task, dynamic_ncols=True)
    model.train()
    while True:
        last_step = step == cfg.max_steps
        if dist.is_main and step > start_step and (step % cfg.eval_every == 0 or last_step):
            best, best_state = validate(model, cfg, tok, task, step, device, answer_vocab, logger, best, best_state)
        if dist.is_main and step > start_step and (step % cfg.ckpt_every == 0 or last_step):
            save_state(ckpt_path, model, opt, step, cfg, "all_in_one", bad, best=best, batches_drawn=drawn)
        if last_step:
            break
        # --- the step: forward, loss, backward (over grad_accum micro-batches), update
        lr, clips = set_lr(opt, step, cfg), 0
        for micro in range(cfg.grad_accum):
            with clock.waiting():  # batches of unreadable videos only are skipped (and counted)
                batch, n = bad.next_batch(batches, len(dataset) // cfg.batch_size + 2)
                batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            drawn, clips = drawn + n, clips + batch["video"].shape[0] * dist.world_size
            sync = micro == cfg.grad_accum - 1 or dist.world_size == 1  # DDP all-reduces on the last micro-batch
            with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast(device, cfg.precision):
                out = ddp(batch, task)  # {"loss", and each term detached}: step_losses
                check_finite(step, **out)  # NaN / inf stops the run here, before backward() reaches the weights
                (out["loss"] / cfg.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        # --- diagnostics: progress, and every log_every steps the losses, speed and data wait
        clock.tick(clips)
        pbar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log_step(logger, step, {"lr": lr, **{k: round(float(v.detach()), 4) for k, v in out.items()}}, clock, bad,
                     cfg.num_workers, write=tqdm.write)
    pbar.close()

    # --- final evaluation on test (rank 0): the zero-shot suite after pre-training, the task after fine-tuning
    metrics = {}
    if dist.is_main:
        data = data_report(bad, clock, task)  # (the loop's data wait, measured before the test pass)
        if best_state is not None:
            model.load_state_dict(best_state)  # the val-selected weights (also in out_dir/best.pt)
        metrics = evaluate_task(model, cfg, tok, "zeroshot" if task == "pretrain" else task, "test", device,
                                answer_vocab)
        metrics.update({**data, f"{task}/val_best": best})
    return end_run(cfg, dist, metrics, "All-in-one: " + ("zero-shot on test" if task == "pretrain"
                                                        else f"{task} fine-tuned, test"))


# ---------------------------------------------------------------------------------------------------------------
# Appendix A. Pictures of what the model learned: `--eval=<task> --init=<ckpt> --pictures` writes them into
# out_dir/pictures (drawing helpers in common/pictures.py)

def token_addresses(model, T, N):
    """Where the model's temporal layer sends each visual token: the layer runs on tokens that carry their own
    address, (source frame, source patch) in two channels, and the addresses are read back out of its output.
    -> before, after: (T, 1+N, 2) long, patch -1 = CLS, frame -1 = a zero token (the shift's padding).
    temporal=mean / tsm / flatten move no tokens, so for them this shows what roll would do at the same
    roll_fraction."""
    D = model.cfg.width  # the release's shift moves D // 8 tokens: the width matters
    code = torch.zeros(1, T, 1 + N, D)                                   # (1, T, 1+N, D)
    code[..., 0] = torch.arange(T)[:, None] + 1                           # frame + 1 (0 = a zero token)
    code[..., 1] = torch.arange(-1, N) + 2                                # patch + 2 (CLS = -1)
    code[:, :, 1:] = shuffle_patches(code[:, :, 1:], model.cfg)         # video_tokens's slot order
    if model.cfg.temporal in ("roll", "shift"):
        after = temporal_mix(code, model.cfg)
    else:
        after = temporal_roll(code, roll_band(N, model.cfg.roll_fraction))
    address = lambda x: torch.stack([x[0, ..., 0] - 1, x[0, ..., 1] - 2], dim=-1).round().long()
    return address(code), address(after)


@torch.no_grad()
def retrieval_examples(model, cfg, tok, device, n_queries=4, top=5):
    """A few test captions (first caption of evenly spaced videos) with their top-ranked clips by cosine."""
    ds = ClipTextDataset(build_task_items(cfg, "retrieval", "test"), cfg, train=False)
    clips = [c for c in (ds[i] for i in range(len(ds))) if c is not None]
    video = []
    for s in range(0, len(clips), cfg.eval_batch_size):
        with autocast(device, cfg.precision):
            batch = torch.stack([c["video"] for c in clips[s:s + cfg.eval_batch_size]]).to(device)
            video.append(model.video_embedding(batch).float().cpu())
    video = torch.cat(video)                                              # (V, P)
    picks = list(range(0, len(clips), max(1, len(clips) // n_queries)))[:n_queries]
    t = tok([clips[i]["text"] for i in picks], cfg.max_text_len, pad_to_max=False)
    with autocast(device, cfg.precision):
        text = model.text_embedding(t["input_ids"].to(device), t["attention_mask"].to(device)).float().cpu()
    sim = text @ video.t()                                                # (queries, V)
    return pictures.ranked_queries(sim, [clips[i]["text"] for i in picks], picks, lambda j: clips[j]["video"],
                                   top), clips


def draw_pictures(model, cfg, tok, device):
    """Retrieval gallery, the temporal layer's token moves on a test clip, training curves -> out_dir/pictures."""
    model.eval()
    out = Path(cfg.out_dir) / "pictures"
    queries, clips = retrieval_examples(model, cfg, tok, device)
    written = [pictures.save(pictures.retrieval_gallery(queries, f"All-in-one ({cfg.temporal}): text -> video "
                                                                 f"retrieval on test, top 5 (green: the caption's "
                                                                 f"own clip)"), out / "retrieval_gallery.png")]
    video = clips[0]["video"]                                             # (T, 3, H, W)
    before, after = token_addresses(model, video.shape[0], (cfg.img_size // cfg.patch_size) ** 2)
    what = cfg.temporal if cfg.temporal in ("roll", "shift") else f"roll (this model: temporal={cfg.temporal})"
    title = (f"temporal {what}, roll_fraction={cfg.roll_fraction}, roll_tokens={cfg.roll_tokens}: one application, "
             f"before block 1 of {cfg.depth}, in the joint pass" + (" and the video-only pass" if cfg.roll_unimodal
                                                                    else ""))
    written.append(pictures.save(pictures.token_slots_picture(video, before, after, cfg.patch_size, title),
                                 out / "temporal_roll.png"))
    log = pictures.run_log(cfg.init, cfg.out_dir)
    written.append(pictures.save(pictures.training_curves(log, ["loss", "vtc", "vtm", "mlm"],
                                                          ["val/retrieval/t2v_R@1", "val/retrieval/t2v_R@5"],
                                                          f"All-in-one training curves ({log})"),
                                 out / "training_curves.png"))
    model.train()
    print0("pictures: " + ", ".join(map(str, written)))
    return written


# ---------------------------------------------------------------------------------------------------------------
# Appendix B. Pretrained weights: key maps for common/weights.py, which reads a file without running its pickled
# code, adapts temporal_embed (cut / zero-padded to num_frames, the release's `_inflate_positional_embeds`),
# pos_embed (bicubic for another img_size) and text positions (cut), and fails, listing the keys, on anything left
# unaccounted for.
#   FULL_MODEL: our checkpoints (same names) or the release's Lightning .ckpt ("state_dict"), whose heads are
#     named pooler.dense, itm_score.fc, mlm_score.{transform.dense, transform.LayerNorm, decoder, bias} and whose
#     blocks hold mlp.fc1 / mlp.fc2 (timm's Mlp; ours is a Sequential). Dropped on purpose: rank_output (a copy of
#     the ITM match row, rebuilt by the release for ranking), mpp_score (masked-patch head, never trained in the
#     paper), DeiT-S's dist_token (not modelled, departure 8) and task heads this run does not build. New when
#     absent: task heads built for this run, the VTC projections (the release pre-trains with VTC off) and
#     temporal_embed (which the March 2022 release code commented out, shared/papers/all_in_one.md §8.5).
#   VIT_INIT: timm vit_base_patch16_224 / deit_tiny_patch16_224 / deit_small(_distilled)_patch16_224 ->
#     transformer.*; the classifier heads and the distillation token dropped, everything outside the ViT new.
#   BERT_INIT: Hugging Face bert-base-uncased (BertModel names, or BertForPreTraining's under "bert.", old
#     LayerNorm.gamma / beta names too): only the embeddings, into text_embeddings.* (512 positions cut to
#     max_text_len); the BERT encoder, pooler and heads are dropped: All-in-one's transformer is the ViT. The
#     paper itself loads no BERT weights (only the tokenizer); this is an option, not the recipe.
PAPER_INIT = {192: "deit_tiny_patch16_224 (DeiT-Ti, ImageNet-1k)",
              384: "deit_small_distilled_patch16_224 (DeiT-S distilled, ImageNet-1k)",
              768: "vit_base_patch16_224 (jx_vit_base_p16_224, ImageNet-21k then 1k)"}
_MLP = [(r"\.mlp\.fc1\.", ".mlp.0."), (r"\.mlp\.fc2\.", ".mlp.3.")]
FULL_MODEL = dict(
    rules=_MLP + [(r"^pooler\.dense\.", "pooler."), (r"^itm_score\.fc\.", "itm_score."),
                  (r"^mlm_score\.transform\.dense\.", "mlm_transform.0."),
                  (r"^mlm_score\.transform\.LayerNorm\.", "mlm_transform.2."),
                  (r"^mlm_score\.decoder\.weight$", "mlm_decoder.weight"), (r"^mlm_score\.bias$", "mlm_decoder.bias"),
                  (r"^(vqa_classifier|mc_vqa_classifier)\.", r"heads.\1.")],
    drop=[r"position_ids$", r"^rank_output(_2)?\.", r"^mpp_score\.", r"^transformer\.dist_token$", r"^heads\."],
    new=[r"^heads\.", r"^(txt|vid)_proj\.", r"^transformer\.temporal_embed$"])
VIT_INIT = dict(rules=[(r"^", "transformer.")] + _MLP,
                drop=[r"^head\.", r"^head_dist\.", r"^pre_logits\.", r"^dist_token$"],
                new=[r"^(?!transformer\.)", r"^transformer\.temporal_embed$"])
BERT_INIT = dict(rules=[(r"^bert\.", ""), (r"LayerNorm\.gamma$", "LayerNorm.weight"),
                        (r"LayerNorm\.beta$", "LayerNorm.bias"), (r"^embeddings\.", "text_embeddings.")],
                 drop=[r"^encoder\.", r"^pooler\.", r"^cls\.", r"position_ids$"],
                 new=[r"^(?!text_embeddings\.)"])

ARCH_FIELDS = ("width", "depth", "heads", "mlp_ratio", "patch_size", "img_size", "num_frames", "max_text_len",
               "vocab_size", "embed_dim", "tied_mlm_decoder", "temporal", "roll_fraction", "roll_tokens",
               "roll_unimodal", "vtc_pool")


if __name__ == "__main__":
    main()
