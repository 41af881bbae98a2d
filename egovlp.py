"""EgoVLP: egocentric video-language pre-training, in one file.

Paper: Kevin Qinghong Lin, Alex Jinpeng Wang, Mattia Soldan, Michael Wray, Rui Yan, Eric Zhongcong Xu, Difei Gao,
Rongcheng Tu, Wenzhe Zhao, Weijie Kong, Chengfei Cai, Hongfa Wang, Dima Damen, Bernard Ghanem, Wei Liu,
Mike Zheng Shou. "Egocentric Video-Language Pretraining", NeurIPS 2022, arXiv:2206.01670.
Release: github.com/showlab/EgoVLP (model code from m-bain/frozen-in-time).

The idea
--------
Video-language models pre-trained on third-person web video transfer poorly to first-person ("egocentric")
video: the camera moves with the wearer, hands and the objects they touch fill the frame, and what matters is the
*action* (verb + noun), not the scene. EgoVLP keeps the Frozen-in-Time dual encoder (a divided space-time ViT for
video, DistilBERT for text, a linear head each to 256-d, cosine similarity) and changes what it learns from:

1. **EgoClip**, pre-training pairs cut out of Ego4D's timestamped narrations ("#C C picks a bag from the floor").
   The narration at time t_i gets the window [t_i - beta_i / (2 alpha), t_i + beta_i / (2 alpha)] (paper Eq. 1),
   beta_i the mean gap between consecutive narrations of that video, alpha the mean of beta over all videos
   (4.9 s). The CSV holds the window (`clip_start`, `clip_end`); this file reads it.
2. **EgoNCE** (paper Eq. 3), InfoNCE with egocentric-aware positives and negatives. With cosine similarities S
   (texts x videos) over the batch B~ and temperature tau,

       L_t2v = -1/|B~| sum_i log( sum_{j in P_i} exp(S_ij / tau) / sum_{k in B~} exp(S_ik / tau) )

   and symmetrically L_v2t; L = L_t2v + L_v2t.
   *Action-aware positives*: P_i = {i} plus every clip sharing at least one verb AND one noun class with i.
   *Scene-aware negatives*: each clip brings one more clip of the same video, nearby in time (B~ = B u N(B)); it
   shares the scene but usually not the action, so the model must look at the action, not the background.
   With P_i = {i} and no added clips, EgoNCE is InfoNCE (`--positives=self --negatives=none`).
3. **EgoMCQ**, a development benchmark: a narration and 5 candidate clips, pick the matching one. "Inter-video"
   questions (type 1) draw the 5 clips from 5 videos; "intra-video" ones (type 2) 5 contiguous clips of one video,
   so the scene gives nothing away.

Shapes legend: B batch (clips), T frames per clip, N patches per frame, L text tokens, D width, H heads,
M contrastive pool size (world x local batch, x2 with scene negatives), Cv / Cn verb / noun classes.

The file, in reading order
--------------------------
  Config       every field with its meaning and paper value; PRESETS (--pretrain, --paper, --paper_epic), ABLATION
               (Table 3), CHOICES / RANGES
  EgoNCE       the paper's idea: sim_matrix, egonce_loss, action_positive_mask, scene_buckets (the scene negatives'
               pools), pretrain_loss; then MI-MM, the EPIC-MIR fine-tuning loss (mi_mm_loss, finetune_loss)
  Model        VideoEncoder (Frozen's space-time ViT), TextEncoder (DistilBERT), FrozenInTime (the dual encoder);
               the same classes and names as oa_trans.py's copy
  Data         EgoClip rows, the clip reader (whole videos or the release's 600-s chunks), the flips, the sampler,
               EgoClipDataset (anchor + scene negative) and collate_pairs (the batch B~); EPIC-MIR fine-tuning pairs
  Evaluation   EgoMCQ, EPIC-KITCHENS-100 multi-instance retrieval, Charades-Ego zero-shot
  Training     the model, the training set, the evaluation-only run, then main(): the training story
  Appendix     pictures (`--eval=egomcq --init=<ckpt> --pictures`); key maps for our checkpoints, the release's,
               timm's ViT and Hugging Face's DistilBERT

What is reproduced, and what is not
-----------------------------------
The model (module names map one to one onto the release's checkpoint keys; `--paper` builds ViT-B/16 + DistilBERT-
base, 180,925,184 parameters with a 4-frame temporal embedding, 180,934,400 with the release's 16 rows), EgoNCE with
its Table 3 variants, the EgoClip loader (whole videos or the release's 600-s chunks, `--chunk_seconds=600`),
EgoMCQ, EPIC-KITCHENS-100 multi-instance retrieval (mAP / nDCG, optional dual-softmax), zero-shot Charades-Ego, and
EPIC-MIR fine-tuning with the multi-instance max-margin loss (margin 0.2, or the adaptive 0.4 x relevancy).
Not here: Ego4D itself (the default data is the synthetic corpus in data/synth, in the same formats); the
ImageNet-21k ViT and DistilBERT weights (not shipped: the CPU default trains from scratch; the paper's start is
`--init_video=<timm jx_vit_base_p16_224 .pth> --init_text=<distilbert-base-uncased .bin or .safetensors>
--vocab_file=<its vocab.txt>`; `--init` reads our checkpoints and the release's); the NLQ / MQ / OSCC / PNR heads.

Departures from the release (and why)
-------------------------------------
- Scene-aware negatives are ON by default: the release's config ships `neg_param: false`, but the paper model used
  them (run name `..._Neg_Seg_60`). The negative comes from the release's bucket floor(narration_time / 60 s) of
  the same video, but is never the anchor itself when the bucket has another clip (the release may draw it).
- Constant learning rate after warm-up, as the paper says (3e-5 for `--paper`); the release resets the lr to
  `learning_rate1` = 2e-4 after the first epoch, a bug.
- In-window frame sampling never crashes on clips shorter than 2 x T frames (the release's `'rand'` sampler
  raises and silently returns a black clip); unreadable videos are skipped and counted, never blacked out.
- Chunked videos use the chunk's real frame rate, not an assumed 30 fps.
- EgoMCQ accuracies are labelled by type id (1 = inter, 2 = intra); the release prints them swapped.
- MI-MM's adaptive margin is wired in (`--adaptive_margin`); the release defines it but never passes relevancy.
- `precision="auto"` runs bf16 autocast where a start-up matmul probe finds it faster; the paper trains in fp32
  (`--paper` keeps it). Similarities and losses always stay in fp32.
- The CPU default trains from scratch, and three release choices fail there (`--paper` keeps all three):
  `time_init="release"` (an all-ones temporal proj gives qkv no gradient, so the temporal branch barely trains;
  "live" draws proj ~ N(0, 0.02)), `text_pool="cls"` (a small post-LN text encoder trained from scratch puts every
  narration at one point; "mean" pools the tokens), and the release's flip, which keeps the narration, so a
  flipped "moves the cup to the left" shows a move to the right (in the synthetic corpus left / right are 2 of the
  8 verbs). `hflip="mirror"` is a label-preserving flip: it swaps left and right in the narration and verb tags.

CPU default vs paper (`--paper`)
--------------------------------
| field | CPU default | paper / release | why the default differs |
|---|---|---|---|
| `img_size` | 64 | 224 | the synthetic corpus is 64x64 |
| `vit_width` / `vit_depth` / `vit_heads` | 128 / 3 / 2 | 768 / 12 / 12 (ViT-B/16) | a model that trains on a CPU |
| `text_width` / `text_layers` / `text_heads` / `text_ffn` | 128 / 2 / 2 / 512 | 768 / 6 / 12 / 3072 | same |
| `text_positions` / `max_text_len` / `vocab_size` | 64 / 32 / 0 (vocab.txt) | 512 / 64 / 30522 | synthetic text |
| `time_init` | live | release | from scratch the release's init starves the temporal branch |
| `text_pool` | mean | cls | from scratch [CLS] puts every narration at one point |
| `batch_size` / `num_workers` | 32 / 1 | 16 per GPU x 32 GPUs / 16 | one CPU process |
| `max_steps` | 1200 | 75k (~10 epochs at 512) | a short run |
| `lr` / `warmup_steps` / `schedule` | 3e-4 / 50 / cosine | 3e-5 / 0 / constant | from scratch, no weights to protect |
| `weight_decay` / `grad_clip` | 0.01 / 1 | 0 / off | stabilises the from-scratch run |
| `hflip` | off | release (flip, narration kept) | "left" / "right" are synthetic verbs |
| `precision` | auto (bf16 where faster) | fp32 | speed |
| `cache_videos` | True | False | a small corpus fits in RAM |
| `eval_every` / `ckpt_every` / `eval_batch_size` | 0 (end) / 200 / 64 | 7500 / 7500 / 32 | cadence of a short run |
| `charades_frames` | 0 (= num_frames, 4) | 16 (frames 5-16 get a zero temporal embedding, as the release) | speed |

Commands
--------
  python egovlp.py --pretrain                                   # CPU default: pre-train on data/synth, evaluate
  python egovlp.py --pretrain --positives=self --negatives=none --out_dir=runs/egovlp_infonce   # InfoNCE (Table 3)
  python egovlp.py --finetune=epic_mir --init=runs/egovlp/ckpt.pt --out_dir=runs/egovlp_epic --max_steps=300 --lr=3e-4
  python egovlp.py --eval=all --init=runs/egovlp/ckpt.pt --out_dir=runs/egovlp_eval
  python egovlp.py --eval=egomcq --init=runs/egovlp/ckpt.pt --pictures --out_dir=runs/egovlp_pictures
  python egovlp.py --paper --device=cuda --precision=bf16 --data_root=/data/egoclip \
      --init_video=/w/jx_vit_base_p16_224-80ecf9dd.pth --init_text=/w/distilbert-base-uncased/pytorch_model.bin \
      --vocab_file=/w/distilbert-base-uncased/vocab.txt                                     # one GPU, paper init
  python egovlp.py --paper --eval=all --init=/w/egovlp.pth --vocab_file=/w/vocab.txt --data_root=/data/egoclip
  torchrun --nproc_per_node=8 egovlp.py --paper --precision=bf16 --data_root=/data/egoclip  # 8 GPUs
  python egovlp.py --help                                       # every field, its default and its meaning
"""
from __future__ import annotations

import ast
import copy
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

from common import pictures as P
from common.annotations import (BadRow, CodedColumn, Table, inside, no_items, read_json, read_rows, read_table,
                                skipped_rows, text_field)
from common.config import parse_config
from common.dist import all_gather_nograd, all_gather_with_grad, print0
from common.errors import user_errors
from common.metrics import map_relevancy, multilabel_map, ndcg_relevancy
from common.text import Tokenizer, check_vocab
from common.train import (BadVideos, StepClock, autocast, check_finite, compile_blocks, count_parameters, data_report,
                          end_run, loader_settings, log_step, lr_at, param_groups, resume_state, save_state,
                          set_rng_states, start_run)
from common.video import (ClipCache, VideoReadError, VideoTransform, load_clip, read_frames, sample_frame_indices,
                          video_meta, window_to_frames)
from common.weights import load_weights


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    # --- run
    out_dir: str = "runs/egovlp"  # checkpoints, log.jsonl, metrics.json (and pictures/)
    data_root: str = "data/synth"  # corpus root (egoclip/ below it); the default is generated on first use
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) | "cpu" | "cuda" | "mps"
    precision: str = "auto"  # "auto" (bf16 where a start-up probe finds it faster) | "bf16" | "fp32"; paper fp32
    compile: str = "off"  # torch.compile the transformer blocks: off | on | auto (on for runs of >= 200 steps)
    seed: int = 0  # python / numpy / torch seed
    max_steps: int = 1200  # optimiser steps; paper ~10 epochs x 7.5K = 75K at global batch 512
    init: str = ""  # a whole model to start from: a pre-training run's ckpt.pt, or the release's EgoVLP_PT_BEST.pth
    init_video: str = ""  # a timm ViT state dict for the video encoder's spatial part; paper: jx_vit_base_p16_224
    init_text: str = ""  # a Hugging Face DistilBERT state dict for the text encoder; paper: distilbert-base-uncased
    vocab_file: str = ""  # "" = data_root/vocab.txt; real data: bert-base-uncased's vocab.txt (DistilBERT's)
    resume: bool = False  # continue the run in out_dir from out_dir/ckpt.pt (random states and data order too)
    overwrite: bool = False  # let a new run replace the files of an earlier run in out_dir (refused otherwise)
    strict: bool = False  # a malformed annotation row stops the run (default: skipped, counted, named in the log)
    max_bad_videos: float = 0.1  # stop when more than this share of the training videos is unreadable (1 = never)
    finetune: str = ""  # "" = EgoNCE pre-training on EgoClip | "epic_mir" = EPIC-MIR fine-tuning with MI-MM
    eval: str = ""  # "" = train | "egomcq" | "epic_mir" | "charades" | "all": evaluate only, no training
    pictures: bool = False  # with --eval: draw EgoMCQ questions with the model's scores + the training curves
    # --- model: video encoder (Frozen-in-Time's divided space-time ViT)
    img_size: int = 64  # input frame side; paper 224
    patch_size: int = 16  # ViT patch side; paper 16
    num_frames: int = 4  # frames per clip = rows of the temporal embedding; paper 4 (pre-train), 16 (fine-tune)
    vit_width: int = 128  # D; paper 768 (ViT-B)
    vit_depth: int = 3  # blocks; paper 12
    vit_heads: int = 2  # heads; paper 12 (head dim 64)
    vit_mlp_ratio: float = 4.0  # MLP hidden = ratio x D; paper 4
    time_init: str = "live"  # temporal attention init: "release" (proj.weight = 1) | "live" (proj.weight ~ N(0, .02))
    # --- model: text encoder (DistilBERT architecture) and heads
    vocab_size: int = 0  # 0 = size of the tokenizer's vocab.txt; paper 30522 (BERT uncased)
    text_width: int = 128  # paper 768
    text_layers: int = 2  # paper 6
    text_heads: int = 2  # paper 12
    text_ffn: int = 512  # paper 3072
    text_positions: int = 64  # position-embedding rows; paper 512
    text_dropout: float = 0.1  # hidden and attention dropout, active in training as in the release; paper 0.1
    max_text_len: int = 32  # tokens per text incl. [CLS]/[SEP]; batches pad to the longest; paper 64
    embed_dim: int = 256  # shared embedding size of txt_proj / vid_proj; paper 256
    text_pool: str = "mean"  # text feature: "cls" = last_hidden_state[:, 0] (release) | "mean" over real tokens
    # --- loss: EgoNCE (paper Sec. 4.2, Table 3) and MI-MM (EPIC-MIR fine-tuning, Table 4)
    positives: str = "verb_and_noun"  # "verb_and_noun" (EgoNCE) | "verb" | "noun" | "self" (= InfoNCE)
    negatives: str = "scene"  # "scene" = + one same-video clip within neg_window per anchor (EgoNCE) | "none"
    neg_window: float = 60.0  # seconds; scene bucket floor(narration_time / neg_window); release 60
    temperature: float = 0.05  # tau, fixed; paper 0.05
    margin: float = 0.2  # MI-MM margin; paper 0.2
    adaptive_margin: bool = False  # MI-MM margin 0.4 x relevancy of the sampled caption (EgoVLP+ entry)
    # --- data
    chunk_seconds: float = 0.0  # 0 = read videos/<uid>.mp4 whole; 600 = release layout videos/<uid>/<k>.mp4
    cache_videos: bool = True  # keep decoded training videos in RAM (small corpora); False = seek per clip (release)
    batch_size: int = 32  # clips per device before scene negatives; paper 16 per GPU x 32 GPUs = 512
    num_workers: int = 1  # DataLoader worker processes; paper 16 per GPU
    crop_scale: float = 0.5  # RandomResizedCrop min scale (max 1.0); paper 0.5
    hflip: str = "off"  # flip half the training clips: "off" | "release" (text kept) | "mirror" (left/right swapped)
    rel_threshold: float = 0.1  # EPIC-MIR: captions sampled among sentences with relevancy > this; release 0.1
    # --- optimisation (AdamW, no decay on biases / norms / embeddings)
    lr: float = 3e-4  # peak learning rate; paper 3e-5 (pre-trained init), constant; higher collapses the text side
    weight_decay: float = 0.01  # paper 0 (transformers.AdamW default)
    adam_eps: float = 1e-6  # paper 1e-6
    warmup_steps: int = 50  # linear warm-up; paper 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" after warm-up; paper constant
    grad_clip: float = 1.0  # max grad norm, 0 = off; paper off
    # --- evaluation and logging
    eval_every: int = 0  # steps between evaluations (0 = only at the end); the release evaluates every epoch
    log_every: int = 25  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (also written at the end)
    eval_batch_size: int = 64  # clips per forward pass at evaluation; paper 32
    max_eval_items: int = 0  # cap on EgoMCQ questions per type / EPIC clips / Charades videos, 0 = all
    eval_cache_gb: float = 2.0  # keep an eval set's decoded clips in RAM up to this size, else decode per evaluation
    dual_softmax: bool = False  # EPIC-MIR: re-weight similarities by dual-softmax (release test_epic.py default)
    dual_softmax_temp: float = 500.0  # release: softmax(S / 500) over videos, times S, softmax over texts
    dual_softmax_over: str = "clips"  # texts of the 2nd softmax: "clips" (one per test clip, release) | "sentences"
    charades_frames: int = 0  # frames per Charades video at zero-shot eval, 0 = num_frames; paper 16


PRESETS = {
    # The CPU default (every field's default); named so that `python egovlp.py --pretrain` reads as intended.
    "pretrain": {},
    # The paper's model and optimisation: ViT-B/16 at 224, DistilBERT-base, 4 frames, AdamW 3e-5 constant. The
    # paper starts from ImageNet-21k ViT-B/16 (timm's jx_vit_base_p16_224) and distilbert-base-uncased: pass
    # them as --init_video / --init_text with --vocab_file=<bert-base-uncased vocab.txt> (nothing is downloaded).
    "paper": dict(img_size=224, patch_size=16, num_frames=4, vit_width=768, vit_depth=12, vit_heads=12,
                  vocab_size=30522, text_width=768, text_layers=6, text_heads=12, text_ffn=3072,
                  text_positions=512, max_text_len=64, batch_size=16, num_workers=16, max_steps=75_000,
                  lr=3e-5, weight_decay=0.0, warmup_steps=0, schedule="constant", grad_clip=0.0,
                  time_init="release", text_pool="cls", cache_videos=False, eval_every=7_500, ckpt_every=7_500,
                  eval_batch_size=32, precision="fp32", crop_scale=0.5, hflip="release", charades_frames=16),
    # EPIC-MIR fine-tuning at 16 frames (Table 4, last EgoVLP row); combine with --paper.
    "paper_epic": dict(finetune="epic_mir", num_frames=16, batch_size=4, max_steps=15_000, lr=3e-5,
                       eval_every=1_000, ckpt_every=1_000, charades_frames=16),
}

# The paper's central ablation (the shape of its Table 3), run over seeds by `bash run.sh ablate egovlp`
# (common/ablate.py): which pairs count as positives x whether scene-aware negatives are added. "self+none" is
# InfoNCE, "verb_and_noun+scene" is EgoNCE. Each run: --pretrain + the flags; reported on EgoMCQ inter / intra.
ABLATION = dict(
    reference="verb_and_noun+scene",
    variants={f"{p}+{n}": [f"--positives={p}", f"--negatives={n}"]
              for n in ("none", "scene") for p in ("self", "noun", "verb", "verb_and_noun")},
    metrics=["egomcq/inter_acc", "egomcq/intra_acc"],
)

# The values each field accepts, checked by parse_config before anything runs (a one-line error naming the field).
CHOICES = dict(precision=("auto", "bf16", "fp32"), compile=("auto", "on", "off"),
               finetune=("", "epic_mir"),
               eval=("", "egomcq", "epic_mir", "charades", "all"), time_init=("live", "release"),
               text_pool=("cls", "mean"), positives=("verb_and_noun", "verb", "noun", "self"),
               negatives=("scene", "none"), hflip=("off", "release", "mirror"),
               schedule=("cosine", "linear", "constant"), dual_softmax_over=("clips", "sentences"))
RANGES = dict(img_size=(1, None), patch_size=(1, None), num_frames=(1, None), vit_width=(1, None),
              vit_depth=(1, None), vit_heads=(1, None), vit_mlp_ratio=(0, None), vocab_size=(0, None),
              text_width=(1, None), text_layers=(1, None), text_heads=(1, None), text_ffn=(1, None),
              text_positions=(1, None), text_dropout=(0, 1), max_text_len=(3, None), embed_dim=(1, None),
              neg_window=(0, None), temperature=(1e-6, None), chunk_seconds=(0, None), batch_size=(1, None),
              num_workers=(0, None), crop_scale=(0, 1), max_steps=(1, None), lr=(0, None), weight_decay=(0, None),
              adam_eps=(0, None), warmup_steps=(0, None), grad_clip=(0, None), eval_every=(0, None),
              log_every=(1, None), ckpt_every=(1, None), eval_batch_size=(1, None), max_eval_items=(0, None),
              eval_cache_gb=(0, None), dual_softmax_temp=(1e-6, None), charades_frames=(0, None), margin=(0, None),
              rel_threshold=(0, 1), max_bad_videos=(0, 1))


# ---------------------------------------------------------------------------------------------------------------
# EgoNCE (the paper's idea), then MI-MM: every loss of this file
# ---------------------------------------------------------------------------------------------------------------
# EgoNCE (paper Eq. 3) is InfoNCE over a batch B~ with a set of positives P_i per text i:
#
#     L = -1/|B~| sum_i log( sum_{j in P_i} exp(S_ij / tau) / sum_{k in B~} exp(S_ik / tau) )   (+ video -> text)
#
# S is sim_matrix, L egonce_loss. Two changes to InfoNCE fill it, here in this order:
#   1. action-aware positives: P_i holds i and every clip sharing a verb AND a noun class (action_positive_mask);
#   2. scene-aware negatives enlarge B~: each anchor brings one clip of the same video from its neg_window bucket
#      (scene_buckets here; EgoClipDataset.scene_negative draws it, in "Data"); collate_pairs lays the batch out as
#      [anchors | negatives], so pair i (text i, video i) stays on the diagonal and every added clip is a hard
#      negative for the others.
# pretrain_loss gathers the batch from every rank and applies egonce_loss. MI-MM (EPIC-MIR fine-tuning) closes it.
def sim_matrix(a, b, eps: float = 1e-8):
    """Cosine similarity of every row of a (P, E) with every row of b (Q, E) -> (P, Q), in fp32."""
    a, b = a.float(), b.float()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(eps)
    return a @ b.t()


def egonce_loss(sim, pos_mask, temperature: float):
    """EgoNCE (paper Eq. 3). sim (M, M) text-x-video cosines; pos_mask (M, M) bool with a true diagonal.

        L = -mean_i log( sum_{j: P_ij} exp(S_ij/tau) / sum_j exp(S_ij/tau) )      text -> video
            -mean_j log( sum_{i: P_ij} exp(S_ij/tau) / sum_i exp(S_ij/tau) )      video -> text
    computed as logsumexp(positives) - logsumexp(all); the two directions are summed, as in the release.
    With pos_mask = I this is exactly InfoNCE (Frozen's NormSoftmaxLoss).
    A non-square sim (texts != videos) raises a ValueError: its masked rows would otherwise give a huge loss.
    """
    if sim.shape[0] != sim.shape[1] or pos_mask.shape != sim.shape:
        raise ValueError(f"egonce_loss needs a square similarity and mask (pairs on the diagonal), got sim "
                         f"{tuple(sim.shape)} and pos_mask {tuple(pos_mask.shape)}")
    logits = sim.float() / temperature  # (M, M)
    neg_inf = torch.finfo(logits.dtype).min
    t2v = torch.logsumexp(logits.masked_fill(~pos_mask, neg_inf), 1) - torch.logsumexp(logits, 1)
    v2t = torch.logsumexp(logits.t().masked_fill(~pos_mask.t(), neg_inf), 1) - torch.logsumexp(logits.t(), 1)
    return -t2v.mean() - v2t.mean()


def action_positive_mask(verb, noun, positives: str):
    """EgoNCE's action-aware positives. verb (M, Cv), noun (M, Cn) multi-hot -> bool (M, M).

    The release builds mask = cos(verb_i, verb_j) * cos(noun_i, noun_j) + I and takes mask > 0. For non-negative
    multi-hots a cosine is > 0 exactly when the two share a class, so: j is a positive of i iff j = i or they share
    >= 1 verb AND >= 1 noun ("verb_and_noun"); only a verb ("verb"); only a noun ("noun"); nothing ("self" = InfoNCE).
    Untagged clips (all-zero rows) only get themselves.
    """
    eye = torch.eye(verb.shape[0], dtype=torch.bool, device=verb.device)
    share_verb = (verb.float() @ verb.float().t()) > 0  # (M, M)
    share_noun = (noun.float() @ noun.float().t()) > 0
    if positives == "verb_and_noun":
        return eye | (share_verb & share_noun)
    if positives == "verb":
        return eye | share_verb
    if positives == "noun":
        return eye | share_noun
    if positives == "self":
        return eye
    raise ValueError(f"positives must be verb_and_noun | verb | noun | self, got {positives!r}")


def scene_buckets(rows, window: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene-aware negative pools: the release's segment_id = video_uid + floor(narration_time / window), held as
    arrays, not a dict of lists (EgoClip has 3.8 M clips; python lists would be copied into every worker):
    -> (order, start, end), the clips of row i's pool being order[start[i]:end[i]], in ascending order.
    EgoClipDataset.scene_negative (in "Data") draws row i's negative from its pool."""
    if isinstance(rows, Table) and isinstance(rows.columns.get("video_uid"), CodedColumn):  # columnar: no objects
        uid, t = np.asarray(rows.columns["video_uid"].codes), np.asarray(rows.columns["narration_time"].array)
    else:
        codes: dict[str, int] = {}
        uid = np.array([codes.setdefault(r["video_uid"], len(codes)) for r in rows], dtype=np.int64)
        t = np.array([r["narration_time"] for r in rows], dtype=np.float64)
    seg = (t // window).astype(np.int64)  # python's // on floats, elementwise
    order = np.lexsort((seg, uid))  # by video, then window; stable, so each pool is in row order
    su, ss = uid[order], seg[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (su[1:] != su[:-1]) | (ss[1:] != ss[:-1])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(order))
    pool = np.cumsum(first) - 1  # the pool of each sorted position
    start, end = np.empty(len(order), dtype=np.int64), np.empty(len(order), dtype=np.int64)
    start[order], end[order] = starts[pool], ends[pool]
    return order, start, end


def pretrain_loss(text_embedding, video_embedding, batch, cfg: Config):
    """EgoNCE over the batch gathered from every rank (negatives from all ranks; tags gathered alongside).
    Returns (loss, the positive mask (M, M))."""
    text_all, video_all = all_gather_with_grad(text_embedding), all_gather_with_grad(video_embedding)  # (M, E)
    verb, noun = all_gather_nograd(batch["verb"]), all_gather_nograd(batch["noun"])  # (M, Cv), (M, Cn)
    pos = action_positive_mask(verb, noun, cfg.positives)  # (M, M)
    return egonce_loss(sim_matrix(text_all, video_all), pos, cfg.temperature), pos


# --- MI-MM: the loss of EPIC-MIR fine-tuning (paper Sec. 5, Table 4) ----------------------------------------------
def mi_mm_loss(sim, margin):
    """Multi-instance max-margin ranking loss (EPIC-MIR fine-tuning; Wray et al.). sim (M, M) cosines with the
    matched pairs on the diagonal; margin a float or a (M,) tensor (adaptive MI-MM: 0.4 x relevancy of pair i).

        L = mean over i != j of  relu(m_i - (S_ii - S_ij)) and relu(m_i - (S_ii - S_ji))
    A non-square sim raises a ValueError, as in egonce_loss.
    """
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"mi_mm_loss needs a square similarity (pairs on the diagonal), got {tuple(sim.shape)}")
    sim = sim.float()
    M = sim.shape[0]
    m = torch.as_tensor(margin, dtype=sim.dtype, device=sim.device).expand(M)[:, None]  # (M, 1)
    diag = sim.diagonal()[:, None]  # (M, 1)
    off = ~torch.eye(M, dtype=torch.bool, device=sim.device)
    rows = F.relu(m - (diag - sim))[off]  # text i against the other videos j
    cols = F.relu(m - (diag - sim.t()))[off]  # video i against the other texts j
    return torch.cat([rows, cols]).mean()


def finetune_loss(text_embedding, video_embedding, batch, cfg: Config):
    """MI-MM over the gathered batch; adaptive MI-MM scales the margin by each pair's relevancy (0.4 * r)."""
    sim = sim_matrix(all_gather_with_grad(text_embedding), all_gather_with_grad(video_embedding))  # (M, M)
    rel = all_gather_nograd(batch["relevancy"])
    return mi_mm_loss(sim, 0.4 * rel if cfg.adaptive_margin else cfg.margin)


# ---------------------------------------------------------------------------------------------------------------
# Model: video encoder (divided space-time ViT, the release's SpaceTimeTransformer). oa_trans.py carries the same
# classes under the same names (only SpaceTimeBlock builds its modules in another order); tests/test_oa_trans.py
# loads one copy's weights into the other and checks that the outputs agree.
# ---------------------------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class DividedAttention(nn.Module):
    """Multi-head self-attention along one axis of a clip's token grid (the release's VarAttention).

    x is (B, 1 + T*N, D): a [CLS] token, then T frames of N patches, frame-major. axis="space": each patch attends
    to the N patches of its own frame; axis="time": each patch attends to the T patches at its grid position. In
    both, every group also sees the [CLS] key / value, and the [CLS] query attends to all 1 + T*N tokens.
    Module names (qkv, proj) are timm's, so ViT checkpoints load.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, axis: str, T: int, N: int):
        q, k, v = rearrange(self.qkv(x), "b l (three h e) -> three b h l e", three=3, h=self.heads)
        cls_out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # (B, h, 1, e): [CLS] sees everything
        if axis == "time":
            split = "b h (t n) e -> (b n) h t e"  # one group per grid position
        else:
            split = "b h (t n) e -> (b t) h n e"  # one group per frame
        qg, kg, vg = (rearrange(z[:, :, 1:], split, t=T, n=N) for z in (q, k, v))  # (B * groups, h, len, e)
        groups = qg.shape[0] // x.shape[0]
        kc, vc = (repeat(z[:, :, :1], "b h one e -> (b g) h one e", g=groups) for z in (k, v))
        out = F.scaled_dot_product_attention(qg, torch.cat([kc, kg], 2), torch.cat([vc, vg], 2))
        merge = split.split("->")[1] + "->" + split.split("->")[0]
        out = torch.cat([cls_out, rearrange(out, merge, t=T, n=N)], 2)  # (B, h, 1 + T*N, e)
        return self.proj(rearrange(out, "b h l e -> b l (h e)"))


class SpaceTimeBlock(nn.Module):
    """Frozen-in-Time's divided space-time block: temporal attention, then spatial attention, then the MLP, with
    the release's residual wiring:

        t = x + TimeAttn(LN3(x));   x = x + SpaceAttn(LN1(t));   x = x + MLP(LN2(x))

    (the spatial output is added to x, not to t, unlike TimeSformer), so temporal attention reaches the stream
    only through the input of spatial attention.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        # (modules built and registered in this order since this file's first version, so that a seed gives the
        # same weights as before; oa_trans.py's copy builds them in another order -- same keys, same computation)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DividedAttention(dim, heads)  # space
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.timeattn = DividedAttention(dim, heads)  # time

    def forward(self, x, T: int, N: int):
        t = x + self.timeattn(self.norm3(x), "time", T, N)
        x = x + self.attn(self.norm1(t), "space", T, N)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B*T, 3, S, S) -> (B*T, N, D)
        return rearrange(self.proj(x), "bt d h w -> bt (h w) d")


class VideoEncoder(nn.Module):
    """Frozen-in-Time's divided space-time ViT (the release's SpaceTimeTransformer). video (B, T, 3, S, S) ->
    tokens (B, 1 + T*N, D) after the final LayerNorm; token 0 is [CLS].

    Patch n of frame f gets pos_embed[1 + n] + temporal_embed[f]; [CLS] gets pos_embed[0] only. temporal_embed
    starts at zero and is sliced to the T frames given; frames past its rows get a zero temporal embedding (the
    release's 16-frame evaluation of a 4-frame model: rows 5-16 never get a gradient and stay zero).
    """

    def __init__(self, img_size: int, patch_size: int, num_frames: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float):
        super().__init__()
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        self.temporal_embed = nn.Parameter(torch.zeros(1, num_frames, dim))
        self.blocks = nn.ModuleList(SpaceTimeBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    @torch.no_grad()
    def init_weights(self, time_init: str = "live"):
        """timm's init for the spatial parts (what a ViT checkpoint would overwrite), then the temporal attention:
        qkv = 0 (so v = 0 and every block starts as an image ViT block) and

          "release": proj.weight = 1 (Frozen's time_init='zeros', meant to "let gradients reach the zeroed qkv").
              But an all-ones projection outputs the same value in every channel, LN1 removes it, and the
              gradient reaching qkv is W^T g = 1 * sum_i g_i = 0 (LayerNorm's input gradient sums to zero over
              channels): from scratch the temporal branch never trains. --paper keeps it, made for pre-trained
              weights.
          "live": proj.weight ~ N(0, 0.02): the same start (v = 0), and qkv gets a real gradient.
        """
        assert time_init in ("release", "live"), time_init
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.zeros_(blk.timeattn.qkv.weight)
            nn.init.zeros_(blk.timeattn.qkv.bias)
            if time_init == "release":
                nn.init.ones_(blk.timeattn.proj.weight)
            nn.init.zeros_(blk.timeattn.proj.bias)
        return self

    def forward(self, video):
        B, T = video.shape[:2]
        x = self.patch_embed(rearrange(video, "b t c h w -> (b t) c h w"))  # (B*T, N, D)
        x = rearrange(x, "(b t) n d -> b t n d", b=B)
        N = x.shape[2]
        tem = self.temporal_embed[:, :T]  # (1, min(T, rows), D); zero rows for frames past the table
        tem = torch.cat([tem, tem.new_zeros(1, T - tem.shape[1], tem.shape[2])], 1)
        x = x + self.pos_embed[:, None, 1:] + tem[:, :, None]  # space + time position
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, rearrange(x, "b t n d -> b (t n) d")], dim=1)  # (B, 1 + T*N, D)
        for blk in self.blocks:
            x = blk(x, T, N)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------
# Model: text encoder (DistilBERT architecture; names follow Hugging Face's DistilBertModel)
# ---------------------------------------------------------------------------------------------------------------
class TextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, dim: int, positions: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids):  # (B, L) -> (B, L, D)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(pos)))


class TextAttention(nn.Module):
    """DistilBERT's MultiHeadSelfAttention: padding keys masked, dropout on the attention weights in training."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_lin, self.k_lin, self.v_lin, self.out_lin = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, keep):  # x (B, L, D), keep (B, 1, 1, L) bool: the real tokens
        q, k, v = (rearrange(lin(x), "b l (h e) -> b h l e", h=self.heads)
                   for lin in (self.q_lin, self.k_lin, self.v_lin))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_lin(rearrange(out, "b h l e -> b l (h e)"))


class TextFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.lin2(F.gelu(self.lin1(x))))


class TextLayer(nn.Module):
    """DistilBERT's TransformerBlock, post-LayerNorm: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.attention = TextAttention(dim, heads, dropout)
        self.sa_layer_norm = nn.LayerNorm(dim, eps=1e-12)
        self.ffn = TextFFN(dim, hidden, dropout)
        self.output_layer_norm = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x, keep):
        x = self.sa_layer_norm(x + self.attention(x, keep))
        return self.output_layer_norm(x + self.ffn(x))


class TextEncoder(nn.Module):
    """The DistilBERT architecture, module names as in Hugging Face's DistilBertModel (so its checkpoints load).
    input_ids, attention_mask (B, L) -> last hidden state (B, L, D). Dropout (embeddings, attention weights, FFN
    output) is active in training, as in the release, which runs HF's DistilBERT in train mode."""

    def __init__(self, vocab_size: int, dim: int, depth: int, heads: int, hidden: int, positions: int,
                 dropout: float):
        super().__init__()
        self.embeddings = TextEmbeddings(vocab_size, dim, positions, dropout)
        self.transformer = nn.Module()  # (HF's key names: transformer.layer.<i>)
        self.transformer.layer = nn.ModuleList(TextLayer(dim, heads, hidden, dropout) for _ in range(depth))

    @torch.no_grad()
    def init_weights(self):  # BERT's init, N(0, 0.02) (what a DistilBERT checkpoint would overwrite)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        return self

    def forward(self, input_ids, attention_mask):
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padding is never attended to
        x = self.embeddings(input_ids)
        for layer in self.transformer.layer:
            x = layer(x, keep)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Model: the dual encoder
# ---------------------------------------------------------------------------------------------------------------
class FrozenInTime(nn.Module):
    """Dual encoder. Returns *unnormalised* 256-d embeddings; similarities are cosines (sim_matrix).

    text : DistilBERT [CLS] -> ReLU -> Linear   (txt_proj.1; the ReLU comes first, Frozen's "minimal" head)
    video: ViT [CLS]        -> Linear           (vid_proj.0)
    """

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.video_model = VideoEncoder(cfg.img_size, cfg.patch_size, cfg.num_frames, cfg.vit_width, cfg.vit_depth,
                                        cfg.vit_heads, cfg.vit_mlp_ratio)
        self.text_model = TextEncoder(vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_ffn,
                                      cfg.text_positions, cfg.text_dropout)
        self.txt_proj = nn.Sequential(nn.ReLU(), nn.Linear(cfg.text_width, cfg.embed_dim))
        self.vid_proj = nn.Sequential(nn.Linear(cfg.vit_width, cfg.embed_dim))
        self.text_pool = cfg.text_pool

    def init_weights(self, time_init: str = "live"):
        self.video_model.init_weights(time_init)
        self.text_model.init_weights()
        return self

    def encode_text(self, input_ids, attention_mask):  # (B, L) -> (B, 256)
        hidden = self.text_model(input_ids, attention_mask)  # (B, L, D)
        if self.text_pool == "cls":  # the release (DistilBERT has no pooler)
            return self.txt_proj(hidden[:, 0])
        mask = attention_mask[..., None].to(hidden.dtype)  # (B, L, 1)
        return self.txt_proj((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))

    def encode_video(self, video):  # (B, T, 3, S, S) -> (B, 256)
        return self.vid_proj(self.video_model(video)[:, 0])  # from [CLS]

    def forward(self, input_ids, attention_mask, video):  # -> text (B, 256), video (B', 256)
        return self.encode_text(input_ids, attention_mask), self.encode_video(video)


# ---------------------------------------------------------------------------------------------------------------
# Data: EgoClip annotations, the clip reader, the flips, the sampler, and the batch EgoNCE sees
# ---------------------------------------------------------------------------------------------------------------
def parse_tags(text: str) -> list[int]:
    """'[5, 12]' -> [5, 12]. EgoClip stores tags as stringified lists; ast.literal_eval parses literals only
    (the release calls eval on file contents). Empty or missing cells are untagged."""
    text = (text or "").strip()
    if text in ("", "nan", "[]"):
        return []
    value = ast.literal_eval(text)
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def multi_hot(ids: list[int], size: int) -> torch.Tensor:
    out = torch.zeros(size)
    out[[i for i in ids if 0 <= i < size]] = 1.0
    return out


def read_egoclip(path) -> Table:
    """egoclip.csv (tab-separated, EgoClip's columns) -> a Table of rows, columnar and cached beside the file
    (common/annotations.py: EgoClip has 3.8 M rows). A malformed line (a missing column, a tag list that
    is not a list of ints, an empty narration, a window ending before it starts, a video_uid leaving the videos
    folder) is a bad row, named with its file and line: skipped and counted, or an error with --strict
    (common/annotations.py; the release's pandas `error_bad_lines=False` drops such lines silently)."""
    videos = str(Path(path).parent / "videos")

    def parse(r):
        row = dict(video_uid=text_field(r, "video_uid"), narration_time=float(r["narration_time"]),
                   clip_start=float(r["clip_start"]), clip_end=float(r["clip_end"]),
                   clip_text=text_field(r, "clip_text"), tag_verb=parse_tags(r["tag_verb"]),
                   tag_noun=parse_tags(r["tag_noun"]))
        inside(videos, row["video_uid"])
        if not row["clip_end"] >= row["clip_start"]:  # (also false for NaN)
            raise BadRow(f"clip window [{row['clip_start']}, {row['clip_end']}] ends before it starts")
        return row
    return read_table(path, parse, "tsv", columns=("video_uid", "narration_time", "clip_start", "clip_end",
                                                    "clip_text", "tag_verb", "tag_noun"), version="egovlp.egoclip/1")


def read_csv(path, columns=()) -> list[dict]:
    """The rows of an EPIC / Charades CSV; a row with too few or too many cells, or bytes that are not UTF-8, is a
    bad row (common/annotations.py); a header without one of `columns` is an error before any row is read."""
    return read_rows(path, lambda row: row, columns=columns)


def hms_to_seconds(stamp: str) -> float:
    """EPIC-KITCHENS timestamps 'HH:MM:SS.fff' -> seconds."""
    h, m, s = stamp.split(":")
    return 3600 * int(h) + 60 * int(m) + float(s)


def chunk_frame(g: int, frames_per_chunk: int) -> tuple[int, int]:
    """Global frame index -> (chunk k, frame inside chunk k) for the release's fixed-length chunk layout."""
    return g // frames_per_chunk, g % frames_per_chunk


class ClipReader:
    """Decodes T frames of the window [start, end] (seconds) of a long video, clamped to the video.

    chunk_seconds = 0: videos/<uid>.mp4 whole (PyAV seeks to the window).
    chunk_seconds > 0: the release's layout videos/<uid>/<k>.mp4, chunk k holding [k*chunk, (k+1)*chunk) s, so a
    clip is read from one or two short files; frame indices are global and mapped with chunk_frame().
    cache = True: decode each whole video once and keep its frames in RAM (for small corpora like data/synth,
    where seeking per clip would cost more than the model's step); sampling is unchanged. Call preload() before a
    DataLoader forks its workers, or each worker fills its own copy.
    Raises common.video.VideoReadError for missing or corrupt files.
    """

    def __init__(self, video_dir, chunk_seconds: float = 0.0, cache: bool = False):
        self.video_dir, self.chunk_seconds, self.cache = Path(video_dir), chunk_seconds, cache
        self._chunks: dict[str, list] = {}  # uid -> [VideoMeta of chunk 0, 1, ...]
        self._frames: dict[str, tuple] = {}  # uid -> (all frames uint8 (num_frames, H, W, 3), fps)
        self.unreadable: dict[str, str] = {}  # uid -> error, of the videos preload() could not decode

    def chunk_metas(self, uid: str):
        if uid not in self._chunks:
            folder = self.video_dir / uid
            paths = sorted(folder.glob("*.mp4"), key=lambda p: int(p.stem)) if folder.is_dir() else []
            if not paths:
                raise VideoReadError(f"no chunks {folder}/<k>.mp4")
            self._chunks[uid] = [video_meta(p) for p in paths]
        return self._chunks[uid]

    def whole_video(self, uid: str):
        if uid not in self._frames:
            path = self.video_dir / f"{uid}.mp4"
            meta = video_meta(path)
            self._frames[uid] = read_frames(path, range(meta.num_frames)), meta.fps
        return self._frames[uid]

    def preload(self, uids, threads: int = 8) -> int:
        """Decode these whole videos into the cache now. Called in the main process before the DataLoader forks
        its workers, so they share one copy (a cache filled inside each worker would decode every video once per
        worker). Returns how many could not be read (their clips are skipped and counted when sampled); their
        errors are kept in self.unreadable (uid -> message)."""

        def decode(uid) -> bool:
            try:
                self.whole_video(uid)
                return True
            except VideoReadError as e:
                self.unreadable[uid] = str(e)
                return False
        with ThreadPoolExecutor(threads) as pool:  # PyAV decodes outside the GIL
            return sum(not ok for ok in pool.map(decode, sorted(set(uids))))

    def __call__(self, uid, start, end, n, mode, rng=None) -> np.ndarray:  # -> uint8 (n, H, W, 3)
        start, end = max(start, 0.0), max(end, start)  # EgoClip windows may start before 0
        if not self.chunk_seconds:
            if not self.cache:
                return load_clip(self.video_dir / f"{uid}.mp4", n, mode, start, end, rng)[0]
            frames, fps = self.whole_video(uid)
            a, b = window_to_frames(start, end, fps, len(frames))
            return frames[sample_frame_indices(len(frames), n, mode, a, b, rng)]
        metas = self.chunk_metas(uid)
        fps = metas[0].fps  # the chunk's real rate (the release assumes 30)
        per_chunk = int(round(self.chunk_seconds * fps))
        total = per_chunk * (len(metas) - 1) + metas[-1].num_frames
        a, b = window_to_frames(start, end, fps, total)
        frames = []
        for g in sample_frame_indices(total, n, mode, a, b, rng):
            k, local = chunk_frame(g, per_chunk)
            local = min(local, metas[k].num_frames - 1)
            frames.append(read_frames(self.video_dir / uid / f"{k}.mp4", [local])[0])
        return np.stack(frames)


def mirror_text(text: str) -> str:
    """The narration of a horizontally mirrored clip: "left" and "right" swap ("C slides the cup to the left" ->
    "... to the right", "in his left hand" -> "in his right hand"); lower-case words only."""
    return re.sub(r"\b(left|right)(?=(wards?)?\b)", lambda m: "right" if m.group(1) == "left" else "left", text)


def mirror_classes(names: list[str]) -> list[int]:
    """Class index -> the index of its mirror image (move_left <-> move_right); classes without one map to
    themselves. Names use "_" for spaces, as EgoClip's verb_classes."""
    index = {n: i for i, n in enumerate(names)}
    return [index.get(mirror_text(n.replace("_", " ")).replace(" ", "_"), i) for i, n in enumerate(names)]


def random_flip(video, text: str, mode: str, rng=random):
    """Flip half the training clips horizontally (video (T, 3, S, S)). mode "off": never; "release": the text is
    kept, so a flipped "moves it to the left" shows a move to the right; "mirror": left and right swap in the
    text too. Returns (video, text, flipped)."""
    if mode == "off" or rng.random() >= 0.5:
        return video, text, False
    return video.flip(-1), mirror_text(text) if mode == "mirror" else text, True


def drop_unreadable(items) -> tuple[list, dict]:
    """A batch's items -> (the readable ones, dict(skipped, bad_videos=[(uid, error)]) for the loop's count). An
    unreadable item is the dict(bad_video=uid, error) a dataset returns when it cannot read a video."""
    ok = [it for it in items if not (isinstance(it, dict) and "error" in it)]
    bad = [it for it in items if isinstance(it, dict) and "error" in it]
    return ok, dict(skipped=len(bad), bad_videos=[(it.get("bad_video", "?"), it["error"]) for it in bad])


class EpochSampler(torch.utils.data.Sampler):
    """Endless shuffled indices, a new permutation every epoch, split across ranks (rank::world). `skip` indices are
    passed over first: a resumed run continues the interrupted run's order."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, skip: int = 0):
        self.n, self.seed, self.rank, self.world, self.skip = n, seed, rank, world, skip

    def __iter__(self):
        epoch, skip = 0, self.skip
        while True:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank::self.world].tolist()
            yield from order[skip:]
            skip, epoch = max(0, skip - len(order)), epoch + 1


class EgoClipDataset(torch.utils.data.Dataset):
    """EgoClip pairs as EgoNCE sees them. Item i = (anchor i, its scene negative, or None with --negatives=none);
    each is dict(video (T, 3, S, S), text, verb (Cv,), noun (Cn,)), read with ClipReader and the flips above; the
    negative is drawn from the anchor's pool of scene_buckets (EgoNCE section). Returns dict(bad_video=uid, error)
    when a video cannot be read (the collate skips it, the loop names and counts it)."""

    def __init__(self, root, cfg: Config, rows: list[dict], verb_names: list[str], num_nouns: int):
        self.cfg, self.rows, self.num_verbs, self.num_nouns = cfg, rows, len(verb_names), num_nouns
        self.verb_mirror = mirror_classes(verb_names)  # for hflip="mirror": move_left <-> move_right
        self.reader = ClipReader(Path(root) / "videos", cfg.chunk_seconds, cfg.cache_videos)
        self.order, self.pool_start, self.pool_end = scene_buckets(rows, cfg.neg_window)
        self.transform = VideoTransform(cfg.img_size, train=True, scale=(cfg.crop_scale, 1.0), flip=False)

    def __len__(self):
        return len(self.rows)

    def scene_negative(self, i: int, rng=random) -> int:
        """One clip from the anchor's neg_window bucket, drawn uniformly; the anchor itself only if it is alone."""
        pool = self.order[self.pool_start[i]:self.pool_end[i]]  # ascending row numbers
        if len(pool) == 1:
            return i
        k = rng.randrange(len(pool) - 1)  # the k-th of the others (the same draw as rng.choice(others))
        return int(pool[k] if k < np.searchsorted(pool, i) else pool[k + 1])

    def load(self, i: int) -> dict:
        r = self.rows[i]
        frames = self.reader(r["video_uid"], r["clip_start"], r["clip_end"], self.cfg.num_frames, "rand")
        video, text, flipped = random_flip(self.transform(frames)[0], r["clip_text"], self.cfg.hflip)
        verbs = r["tag_verb"]
        if flipped and self.cfg.hflip == "mirror":
            verbs = [self.verb_mirror[v] for v in verbs]
        return dict(video=video, text=text,  # verbatim narration, "#C C ..." included (mirrored if flipped)
                    verb=multi_hot(verbs, self.num_verbs), noun=multi_hot(r["tag_noun"], self.num_nouns))

    def __getitem__(self, i):
        try:  # the scene negative comes from the same video
            anchor = self.load(i)
            negative = self.load(self.scene_negative(i)) if self.cfg.negatives == "scene" else None
        except VideoReadError as e:
            return dict(bad_video=self.rows[i]["video_uid"], error=str(e))
        return anchor, negative


def collate_pairs(items) -> dict:
    """Stack the anchors, then their scene negatives: the batch B~ = B u N(B) is [a_1 .. a_b | n_1 .. n_b] (2b clips
    when negatives are on, text i with video i); each member brings its text and tags, so a negative is also a
    pair of its own. Unreadable items are dropped and counted."""
    ok, bad = drop_unreadable(items)
    if not ok:
        return bad  # no "video": the loop draws the next batch
    members = [a for a, _ in ok] + [n for _, n in ok if n is not None]
    return dict(video=torch.stack([m["video"] for m in members]), text=[m["text"] for m in members],
                verb=torch.stack([m["verb"] for m in members]), noun=torch.stack([m["noun"] for m in members]),
                **bad)


# --- EPIC-KITCHENS-100 multi-instance retrieval: the fine-tuning pairs (the test split is in "Evaluation") ---------
def read_epic_split(root: Path, split: str) -> tuple[list[dict], list[str], np.ndarray]:
    """EPIC_100_retrieval_<split>.csv (clips), its _sentence.csv (the unique sentences) and the relevancy matrix
    (clips, sentences) in [0, 1]. Rows align by position, so a skipped bad row stops here with a clear error."""
    clips = read_csv(root / f"EPIC_100_retrieval_{split}.csv",
                     ("video_id", "start_timestamp", "stop_timestamp", "narration"))
    sentences = [r["narration"] for r in read_csv(root / f"EPIC_100_retrieval_{split}_sentence.csv", ("narration",))]
    relevancy = np.load(root / f"caption_relevancy_EPIC_100_retrieval_{split}.npy")
    if relevancy.shape != (len(clips), len(sentences)):
        raise SystemExit(f"error: {root}: the relevancy matrix is {tuple(relevancy.shape)}, the CSVs hold "
                         f"{len(clips)} clips x {len(sentences)} sentences (a bad row?)")
    return clips, sentences, relevancy


class EpicMIRTrain(torch.utils.data.Dataset):
    """EPIC-MIR training pairs, multi-instance sampling: the caption of clip i is drawn uniformly among the
    sentences with relevancy(i, s) > rel_threshold (its own narration if none); the pair's relevancy is kept for
    the adaptive margin."""

    def __init__(self, root, cfg: Config):
        root = Path(root)
        self.cfg = cfg
        self.clips, self.sentences, self.relevancy = read_epic_split(root, "train")
        self.reader = ClipReader(root / "videos")
        self.transform = VideoTransform(cfg.img_size, train=True, scale=(cfg.crop_scale, 1.0), flip=False)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        c = self.clips[i]
        candidates = np.flatnonzero(self.relevancy[i] > self.cfg.rel_threshold)
        if len(candidates):
            s = int(random.choice(candidates))
            text, rel = self.sentences[s], float(self.relevancy[i, s])
        else:
            text, rel = c["narration"], 1.0
        try:
            frames = self.reader(c["video_id"], hms_to_seconds(c["start_timestamp"]),
                                 hms_to_seconds(c["stop_timestamp"]), self.cfg.num_frames, "rand")
        except VideoReadError as e:
            return dict(bad_video=c["video_id"], error=str(e))
        video, text, _ = random_flip(self.transform(frames)[0], text, self.cfg.hflip)
        return dict(video=video, text=text, relevancy=rel)


def collate_epic(items) -> dict:
    ok, bad = drop_unreadable(items)
    if not ok:
        return bad  # no "video": the loop draws the next batch
    return dict(video=torch.stack([it["video"] for it in ok]), text=[it["text"] for it in ok],
                relevancy=torch.tensor([it["relevancy"] for it in ok]), **bad)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: EgoMCQ, EPIC-KITCHENS-100 multi-instance retrieval, Charades-Ego zero-shot
# ---------------------------------------------------------------------------------------------------------------
class ClipBank:
    """One benchmark's clips (T uniform frames = bin midpoints, centre crop), encoded on demand.

    Nothing is decoded when the bank is built, so training starts at once. The first evaluation decodes the clips
    through a DataLoader (cfg.num_workers processes, overlapping the model's forward passes); a set that fits in
    cfg.eval_cache_gb (the synthetic ones) is then kept in RAM as bf16 (`cache`, a common.video.ClipCache keyed by
    clip index) for later evaluations, and a larger one (the real EgoMCQ has ~40K questions x 5 clips) is decoded
    again each time (`cache` None), so memory stays flat. Unreadable clips are counted (`skipped`) and marked
    missing (`ok`), and encode to zeros."""

    def __init__(self, reader: ClipReader, cfg: Config, windows: list[tuple], num_frames: int):
        self.reader, self.windows, self.num_frames = reader, list(windows), num_frames
        self.transform = VideoTransform(cfg.img_size, train=False)
        self.num_workers = cfg.num_workers
        fits = len(self.windows) * num_frames * 3 * cfg.img_size ** 2 * 2 <= cfg.eval_cache_gb * 2 ** 30  # bf16
        self.cache = ClipCache() if fits else None  # all or nothing: the whole set in RAM, or decoded every time
        self.ok, self.skipped = [True] * len(self.windows), 0  # known once the clips are decoded

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i: int):  # -> bf16 (T, 3, S, S), or None when the clip cannot be read
        uid, start, end = self.windows[i]
        try:
            video, _ = self.transform(self.reader(uid, start, end, self.num_frames, "uniform"))
        except VideoReadError:
            return None
        return video.to(torch.bfloat16)  # halves the memory; the model casts back

    def batches(self, size: int):
        """Yield (indices, clips) of the readable clips in order; a decoding pass refreshes ok / skipped."""
        if self.cache is not None and len(self.cache) == len(self):  # every clip in RAM (None: unreadable): the
            for s in range(0, len(self), size):                    # decoding pass's batches, so the same sums
                idx = [i for i in range(s, min(s + size, len(self))) if self.ok[i]]
                if idx:
                    yield idx, [self.cache.clips[i] for i in idx]
            return
        workers = loader_settings(self.num_workers, torch.device("cpu"), log=lambda _: None)["num_workers"]  # <= cores
        loader = torch.utils.data.DataLoader(self, batch_size=size, num_workers=workers, collate_fn=list)
        ok = []
        for clips in loader:  # in order: batch b holds clips b*size ...
            first, ok = len(ok), ok + [clip is not None for clip in clips]
            if self.cache is not None:  # complete once the pass is: later evaluations read from RAM
                for k, clip in enumerate(clips):
                    self.cache.put(first + k, clip)
            idx = [first + k for k, clip in enumerate(clips) if clip is not None]
            if idx:
                yield idx, [clip for clip in clips if clip is not None]
        self.ok, self.skipped = ok, ok.count(False)

    @torch.no_grad()
    def encode(self, model, device, batch: int, ctx) -> torch.Tensor:  # -> (num_clips, E), zeros where missing
        out = torch.zeros(len(self), model.vid_proj[0].out_features)
        for idx, clips in self.batches(batch):
            with ctx:
                out[idx] = model.encode_video(torch.stack(clips).to(device).float()).float().cpu()
        return out


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], cfg: Config, device, ctx) -> torch.Tensor:  # (n, E)
    """The text embeddings of `texts`, eval_batch_size at a time."""
    out = []
    for s in range(0, len(texts), cfg.eval_batch_size):
        tok = tokenizer(texts[s:s + cfg.eval_batch_size], cfg.max_text_len, pad_to_max=False)
        with ctx:
            out.append(model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
    return torch.cat(out)


def clip_window(c: dict) -> tuple:
    return c["video_uid"], float(c["clip_start"]), float(c["clip_end"])


def mcq_accuracy(sim, answer, types) -> dict:
    """sim (Q, 5) query-choice cosines, answer (Q,), types (Q,) -> percent correct per type (argmax choice)."""
    correct = (sim.argmax(1) == answer).float()  # (Q,)
    out = {}
    for t, name in ((1, "inter_acc"), (2, "intra_acc")):  # type 1 = inter-video, type 2 = intra-video
        if (types == t).any():
            out[f"egomcq/{name}"] = 100.0 * correct[types == t].mean().item()
    return out


class EgoMCQ:
    """EgoMCQ: a narration and 5 clips; predict argmax cosine. Accuracy per type: 1 = inter-video (5 videos),
    2 = intra-video (5 contiguous clips of one video). The release prints the two labels swapped."""

    def __init__(self, root, cfg: Config):
        questions = list(read_json(Path(root) / "egomcq.json").values())
        if cfg.max_eval_items:  # the first questions of each type
            questions = [q for t in (1, 2) for q in [q for q in questions if int(q["types"]) == t][:cfg.max_eval_items]]
        windows: dict[tuple, int] = {}
        for q in questions:
            for c in q["choices"].values():
                windows.setdefault(clip_window(c), len(windows))
        self.queries = [q["query"]["clip_text"] for q in questions]
        self.choices = torch.tensor([[windows[clip_window(q["choices"][str(k)])] for k in range(len(q["choices"]))]
                                     for q in questions])  # (Q, 5) indices into the clip bank
        self.answer = torch.tensor([int(q["answer"]) for q in questions])
        self.types = torch.tensor([int(q["types"]) for q in questions])
        self.bank = ClipBank(ClipReader(Path(root) / "videos", cfg.chunk_seconds), cfg, list(windows),
                             cfg.num_frames)

    def scores(self, model, tokenizer, cfg, device, ctx):  # -> (Q, 5) cosine of each query with its 5 choices
        text = encode_texts(model, tokenizer, self.queries, cfg, device, ctx)  # (Q, E)
        video = self.bank.encode(model, device, cfg.eval_batch_size, ctx)  # (clips, E)
        return torch.einsum("qe,qke->qk", F.normalize(text, dim=-1), F.normalize(video, dim=-1)[self.choices])

    def __call__(self, model, tokenizer, cfg, device, ctx) -> dict:
        sim = self.scores(model, tokenizer, cfg, device, ctx)
        return {**mcq_accuracy(sim, self.answer, self.types), "egomcq/skipped_clips": float(self.bank.skipped)}


def dual_softmax(sim, temp: float, caption_rows=None):
    """The release's optional EPIC-MIR re-weighting of a (sentences, videos) score matrix (test_epic.py):
    S1 = softmax(S / temp over videos) * S, then a softmax over texts. Transductive: every score depends on the
    whole test set.

    caption_rows (C,) long = the sentence index of each test clip's own caption. The release embeds one caption
    per clip (C rows, a sentence shared by k clips appears k times), takes the softmax over those rows, and only
    then keeps one column per unique sentence; so a duplicated sentence weighs k times in the denominator. With
    caption_rows this function does the same; None normalises over the S unique sentences instead
    (`--dual_softmax_over=sentences`), which moves text->video nDCG when captions repeat."""
    s1 = F.softmax(sim / temp, dim=1) * sim  # (S, V)
    rows = s1 if caption_rows is None else s1[caption_rows]  # (C, V): the rows the text softmax runs over
    return torch.exp(s1 - torch.logsumexp(rows, dim=0, keepdim=True))


def epic_mir_metrics(sim_vt, relevancy) -> dict:
    """sim_vt (videos, sentences) scores, relevancy (videos, sentences) in [0, 1] -> mAP and nDCG for video->text
    (rows), text->video (the transpose) and their mean, in percent.

    `mAP_*` is the release's definition (utils/mAP.py, the number papers quote): hits are the items with
    relevancy == 1, but P@k sums the *graded* relevancies of the top k. `mAP_binary_*` is textbook AP (P@k counts
    only the hits); it is never higher, a few points lower on EPIC-like relevancies. nDCG is graded (top K_q)."""
    out = {}
    for name, precision in (("mAP", "graded"), ("mAP_binary", "binary")):
        out[f"epic_mir/{name}_v2t"] = map_relevancy(sim_vt, relevancy, precision)
        out[f"epic_mir/{name}_t2v"] = map_relevancy(sim_vt.t(), relevancy.t(), precision)
        out[f"epic_mir/{name}_avg"] = (out[f"epic_mir/{name}_v2t"] + out[f"epic_mir/{name}_t2v"]) / 2
    out["epic_mir/nDCG_v2t"] = ndcg_relevancy(sim_vt, relevancy)
    out["epic_mir/nDCG_t2v"] = ndcg_relevancy(sim_vt.t(), relevancy.t())
    out["epic_mir/nDCG_avg"] = (out["epic_mir/nDCG_v2t"] + out["epic_mir/nDCG_t2v"]) / 2
    return out


class EpicMIR:
    """EPIC-KITCHENS-100 multi-instance retrieval, test split: every test clip against every unique sentence,
    graded relevancy from verb/noun class overlap. Zero-shot after pre-training, or after --finetune=epic_mir."""

    def __init__(self, root, cfg: Config):
        root = Path(root)
        clips, self.sentences, relevancy = read_epic_split(root, "test")
        self.relevancy = torch.from_numpy(relevancy)
        if cfg.max_eval_items:
            clips, self.relevancy = clips[:cfg.max_eval_items], self.relevancy[:cfg.max_eval_items]
        windows = [(c["video_id"], hms_to_seconds(c["start_timestamp"]), hms_to_seconds(c["stop_timestamp"]))
                   for c in clips]
        sentence_index = {text: k for k, text in enumerate(self.sentences)}
        missing = [c["narration"] for c in clips if c["narration"] not in sentence_index]
        if missing:
            raise ValueError(f"{root}: {len(missing)} test narrations are not in the sentence CSV, e.g. {missing[0]!r}")
        self.caption_rows = torch.tensor([sentence_index[c["narration"]] for c in clips])  # each clip's caption
        self.bank = ClipBank(ClipReader(root / "videos"), cfg, windows, cfg.num_frames)

    def __call__(self, model, tokenizer, cfg, device, ctx) -> dict:
        text = encode_texts(model, tokenizer, self.sentences, cfg, device, ctx)  # (S, E)
        video = self.bank.encode(model, device, cfg.eval_batch_size, ctx)  # (V, E)
        if cfg.dual_softmax:
            rows = self.caption_rows if cfg.dual_softmax_over == "clips" else None
            sim_vt = dual_softmax(text @ video.t(), cfg.dual_softmax_temp, rows).t()
        else:
            sim_vt = (sim_matrix(video, text) + 1) / 2  # the release's (cos + 1) / 2
        keep = torch.tensor(self.bank.ok)  # unreadable clips are left out of the ranking
        return {**epic_mir_metrics(sim_vt[keep], self.relevancy[keep]),
                "epic_mir/skipped_clips": float(self.bank.skipped)}


class CharadesEgo:
    """Zero-shot Charades-Ego-style action recognition: each test video (T uniform frames over the whole video)
    scored against the class-name texts by cosine; mAP over classes (multi-label)."""

    def __init__(self, root, cfg: Config):
        root = Path(root)
        classes = [line.strip().split(" ", 1) for line in open(root / "Charades_v1_classes.txt", encoding="utf-8-sig")
                   if line.strip()]  # (utf-8-sig: a byte-order mark a Windows editor wrote is dropped)
        self.class_ids = {cid: k for k, (cid, _) in enumerate(classes)}
        self.class_texts = [name for _, name in classes]  # "cXXX " prefix dropped, as the release
        videos = read_csv(root / "CharadesEgo_v1_test_only1st.csv", ("id", "length"))
        if cfg.max_eval_items:
            videos = videos[:cfg.max_eval_items]
        self.labels = torch.zeros(len(videos), len(classes))
        for i, v in enumerate(videos):
            for action in filter(None, (v.get("actions") or "").split(";")):
                self.labels[i, self.class_ids[action.split()[0]]] = 1
        frames = cfg.charades_frames or cfg.num_frames
        self.bank = ClipBank(ClipReader(root / "videos"), cfg, [(v["id"], 0.0, float(v["length"])) for v in videos],
                             frames)

    def __call__(self, model, tokenizer, cfg, device, ctx) -> dict:
        text = encode_texts(model, tokenizer, self.class_texts, cfg, device, ctx)  # (C, E)
        video = self.bank.encode(model, device, cfg.eval_batch_size, ctx)  # (V, E)
        keep = torch.tensor(self.bank.ok)
        return {"charades/mAP": multilabel_map(sim_matrix(video, text)[keep], self.labels[keep]),
                "charades/skipped_videos": float(self.bank.skipped)}


def build_evaluators(tasks: list[str], root: Path, cfg: Config) -> dict:
    evaluators = {}
    if "egomcq" in tasks:
        evaluators["egomcq"] = EgoMCQ(root / "egoclip", cfg)
    if "epic_mir" in tasks:
        evaluators["epic_mir"] = EpicMIR(root / "egoclip" / "epic_mir", cfg)
    if "charades" in tasks:
        evaluators["charades"] = CharadesEgo(root / "egoclip" / "charades", cfg)
    return evaluators


def evaluate(model, evaluators: dict, tokenizer, cfg, device, ctx) -> dict:
    was_training = model.training
    model.eval()
    metrics = {}
    for name, ev in evaluators.items():
        metrics.update(ev(model, tokenizer, cfg, device, ctx))
    model.train(was_training)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Training: the model, the training set and the evaluation-only run, then main(): the training story
# ---------------------------------------------------------------------------------------------------------------
def build_model(cfg: Config, root: Path, device):
    """The tokenizer and the dual encoder, initialised, then loaded from --init_video / --init_text / --init (key
    maps in the appendix)."""
    tokenizer = Tokenizer(cfg.vocab_file or str(root / "vocab.txt"))
    vocab = cfg.vocab_size or tokenizer.vocab_size
    check_vocab(tokenizer, vocab)  # a token id past the word-embedding table would fail mid-run
    model = FrozenInTime(cfg, vocab).init_weights(cfg.time_init)
    load_weights(model, [(cfg.init_video, VIT_INIT), (cfg.init_text, DISTILBERT_INIT), (cfg.init, FULL_MODEL)],
                 "egovlp", log=print0)
    if cfg.vit_width == 768 and not (cfg.init or cfg.init_video or cfg.init_text):
        print0(f"note: paper-size model from random weights; {PAPER_INIT}")
    model = model.to(device)
    print0(compile_blocks([*model.video_model.blocks, *model.text_model.transformer.layer], cfg.compile, device,
                          0 if cfg.eval else cfg.max_steps))
    print0(f"EgoVLP dual encoder: {count_parameters(model):,} parameters")
    return tokenizer, model


def training_set(cfg: Config, root: Path, logger):
    """-> (dataset, collate, the evaluations run during training, clips per item in the contrastive batch, the
    unreadable-video counter). EgoClip's training videos are decoded into RAM here (cache_videos), before the
    DataLoader forks its workers."""
    if cfg.finetune == "epic_mir":
        dataset = EpicMIRTrain(root / "egoclip" / "epic_mir", cfg)
        bad = BadVideos(len({c["video_id"] for c in dataset.clips}), cfg.max_bad_videos, print0, logger)
        return dataset, collate_epic, ["epic_mir"], 1, bad
    rows = read_egoclip(root / "egoclip" / "egoclip.csv")
    with open(root / "egoclip" / "verb_classes.txt", encoding="utf-8-sig") as f:
        verb_names = [line.strip() for line in f]
    with open(root / "egoclip" / "noun_classes.txt", encoding="utf-8-sig") as f:
        num_nouns = sum(1 for _ in f)
    dataset = EgoClipDataset(root / "egoclip", cfg, rows, verb_names, num_nouns)
    uids = rows.distinct("video_uid")
    bad = BadVideos(len(uids), cfg.max_bad_videos, print0, logger)
    if cfg.cache_videos and not cfg.chunk_seconds:
        t0 = time.time()
        n_bad = dataset.reader.preload(uids, threads=min(8, os.cpu_count() or 1))
        print0(f"decoded {len(uids) - n_bad} training videos into RAM in {time.time() - t0:.0f} s"
               + (f" ({n_bad} unreadable: their clips are skipped and counted)" if n_bad else ""))
        bad.add(sorted(dataset.reader.unreadable.items()), skipped=0)  # a corpus too broken stops here
    print0(f"EgoClip: {len(rows)} pairs, {len(verb_names)} verbs, {num_nouns} nouns")
    return dataset, collate_pairs, ["egomcq", "epic_mir", "charades"], 2 if cfg.negatives == "scene" else 1, bad


def training_loader(dataset, collate, cfg: Config, dist, skip: int):
    """Endless shuffled batches of the training set, this rank's share, the first `skip` items passed over (a
    resumed run continues the interrupted run's order). A set smaller than one batch is an error: a batch would
    repeat clips, and duplicates are false negatives for EgoNCE."""
    if len(dataset) < cfg.batch_size:  # (none at all: the bad-row count and the first reasons)
        raise no_items(len(dataset), cfg.batch_size)
    sampler = EpochSampler(len(dataset), cfg.seed, dist.rank, dist.world_size, skip=skip)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                                       **loader_settings(cfg.num_workers, dist.device, print0),  # <= cores
                                       generator=torch.Generator().manual_seed(cfg.seed))  # not the global RNG


def evaluate_only(cfg: Config, dist, model, tokenizer, root: Path, ctx) -> dict:
    """--eval: the chosen benchmark (all three with --eval=all) on rank 0 -> metrics (metrics.json and the table),
    then, with --pictures, the EgoMCQ pictures and the training curves (appendix)."""
    metrics = {}
    if dist.is_main:
        tasks = ["egomcq", "epic_mir", "charades"] if cfg.eval == "all" else [cfg.eval]
        metrics = evaluate(model, build_evaluators(tasks, root, cfg), tokenizer, cfg, dist.device, ctx)
    end_run(cfg, dist, metrics, f"EgoVLP eval ({cfg.eval})")
    if dist.is_main and cfg.pictures:
        draw_pictures(model, tokenizer, cfg, dist.device, ctx, root)
    return metrics


@user_errors  # a failure the user can fix (path, data file, weights, disk) is one `error:` line (common/errors.py)
def main(argv: list[str] | None = None) -> dict:
    """Train (EgoNCE pre-training, or EPIC-MIR fine-tuning with --finetune) or only evaluate (--eval); returns the
    final metrics."""
    # --- set-up: the config, then strict, process group, precision, seed, corpus, inputs, out_dir, log (start_run)
    cfg = parse_config(Config, argv, PRESETS, CHOICES, RANGES)
    dist, logger = start_run(cfg, Config.data_root, ["egoclip/epic_mir" if cfg.finetune else
                                                     "egoclip/egoclip.csv" if not cfg.eval else "egoclip"])
    device, world, root, out_dir = dist.device, dist.world_size, Path(cfg.data_root), Path(cfg.out_dir)
    ctx = autocast(device, cfg.precision)

    # --- model (and, with --eval, only the evaluation)
    tokenizer, model = build_model(cfg, root, device)
    if cfg.eval:
        return evaluate_only(cfg, dist, model, tokenizer, root, ctx)

    # --- optimiser; with --resume the interrupted run's weights, optimiser, step and data position
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_eps,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for all tensors
    ckpt = resume_state(out_dir / "ckpt.pt", model, optimizer, "egovlp", logger) if cfg.resume else {}
    step, drawn = ckpt.get("step", 0), ckpt.get("batches_drawn", 0)  # drawn: batches taken from the loader
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    # --- data: EgoClip pairs + scene negatives (or EPIC-MIR pairs), and the evaluations run during training
    dataset, collate, eval_tasks, per_clip, bad = training_set(cfg, root, logger)
    bad.load(ckpt.get("bad_videos"))
    loader = training_loader(dataset, collate, cfg, dist, skip=drawn * cfg.batch_size)
    print0(f"contrastive batch: {world} rank(s) x {cfg.batch_size} x {per_clip} = {world * cfg.batch_size * per_clip}"
           f" clips per step ({cfg.finetune or 'pre-training'}, positives={cfg.positives}, "
           f"negatives={cfg.negatives})")
    evaluators = build_evaluators(eval_tasks, root, cfg) if dist.is_main else {}  # reads every eval file now
    if skipped_rows():
        logger.log({"bad_rows": skipped_rows()})

    # --- the loop: evaluate and save on schedule, draw a batch, take one step
    metrics, clock = {}, StepClock()  # clock: step timing and the time spent waiting for data
    batches = iter(loader)
    if ckpt.get("rng"):  # after iter(): random draws continue as in the interrupted run (exact with num_workers=0)
        set_rng_states(ckpt["rng"])
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not dist.is_main, desc="egovlp", dynamic_ncols=True)
    model.train()
    while True:
        last_step = step == cfg.max_steps
        if dist.is_main and (last_step or (cfg.eval_every and step > 0 and step % cfg.eval_every == 0)):
            metrics = evaluate(raw_model, evaluators, tokenizer, cfg, device, ctx)
            logger.log({"step": step, **metrics})
            bar.write(f"step {step} eval: " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        if dist.is_main and step > 0 and (last_step or step % cfg.ckpt_every == 0):
            save_state(out_dir / "ckpt.pt", raw_model, optimizer, step, cfg, "egovlp", bad, batches_drawn=drawn)
        if last_step:
            break

        with clock.waiting():  # unreadable-only batches are skipped; every tensor goes to the device once
            batch, n = bad.next_batch(batches, len(dataset) // cfg.batch_size + 2)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        drawn += n
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # ---- the step: forward, loss (EgoNCE, or MI-MM when fine-tuning), backward, update
        tok = tokenizer(batch["text"], cfg.max_text_len, pad_to_max=False)  # pad to the longest, as the release
        with ctx:
            text_embedding, video_embedding = model(tok["input_ids"].to(device), tok["attention_mask"].to(device),
                                                    batch["video"])
        if cfg.finetune == "epic_mir":
            loss, pos = finetune_loss(text_embedding, video_embedding, batch, cfg), None
        else:
            loss, pos = pretrain_loss(text_embedding, video_embedding, batch, cfg)
        check_finite(step, loss=loss)  # NaN / inf stops the run here, before backward() reaches the weights
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1

        # ---- diagnostics: speed, data wait, unreadable videos; EgoNCE's positives per text
        clock.tick(len(batch["text"]) * world)
        bar.update(1)
        if dist.is_main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            numbers = {"loss": loss.item(), "lr": lr}
            if pos is not None:
                numbers["positives_per_row"] = pos.float().sum(1).mean().item()
            log_step(logger, step, numbers, clock, bad, cfg.num_workers, write=bar.write)
    bar.close()
    if world > 1:  # clips of unreadable training videos dropped on any rank (the names are rank 0's)
        bad.skipped = int(all_gather_nograd(torch.tensor([bad.skipped], device=device)).sum())
    if dist.is_main:
        metrics.update(data_report(bad, clock, "train"))
    return end_run(cfg, dist, metrics, f"EgoVLP {cfg.finetune or 'pre-training'}: final metrics (step {step})")


# ---------------------------------------------------------------------------------------------------------------
# Appendix: pictures of what the model learned, `--eval=egomcq --init=<ckpt> --pictures` (common/pictures.py)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def draw_pictures(model, tokenizer, cfg, device, ctx, root) -> list:
    """The first EgoMCQ question of each type: the narration, its 5 candidate clips with the model's cosines (green:
    the answer; red: the model's pick when wrong); and the training curves -> out_dir/pictures."""
    model.eval()
    first = copy.copy(cfg)
    first.max_eval_items = 1  # the first question of each type
    mcq = EgoMCQ(Path(root) / "egoclip", first)
    sim = mcq.scores(model, tokenizer, first, device, ctx)  # (Q, 5)
    blocks = [P.text_image(f"EgoVLP (positives={cfg.positives}, negatives={cfg.negatives}): EgoMCQ,\n"
                           f"the model picks the clip of highest cosine", size=13)]
    for q in range(len(mcq.queries)):
        kind = "inter-video: 5 clips from 5 videos" if mcq.types[q] == 1 else "intra-video: 5 clips of one video"
        answer, pick = int(mcq.answer[q]), int(sim[q].argmax())
        lo, hi = sim[q].min().item() - 0.05, sim[q].max().item()
        rows = [P.text_image(f'"{mcq.queries[q]}"  ({kind}; the model is {"right" if pick == answer else "wrong"})',
                             size=12)]
        for k in range(sim.shape[1]):
            clip = mcq.bank[int(mcq.choices[q, k])]                                   # (T, 3, S, S) or None
            colour = P.GREEN if k == answer else P.RED if k == pick else (210, 210, 210)
            label = f"candidate {k}: cos {sim[q, k]:.3f}" + (", answer" if k == answer else "") + \
                    (", model's pick" if k == pick else "")
            strip = P.frame_strip(clip.float(), border=colour) if clip is not None else P.text_image("(unreadable)")
            rows.append(P.stack([P.stack([P.text_image(label, width=210, size=11, fill=colour if k in (answer, pick)
                                                       else P.BLACK), P.bar(sim[q, k].item(), lo, hi, 120)], gap=1),
                                 strip], vertical=False, gap=10))
        blocks.append(P.stack(rows, gap=3))
    out = Path(cfg.out_dir) / "pictures"
    written = [P.save(P.stack(blocks, gap=12), out / "egomcq.png")]
    log = P.run_log(cfg.init, cfg.out_dir)
    written.append(P.save(P.training_curves(log, ["loss"], ["egomcq/inter_acc", "egomcq/intra_acc"],
                                            f"EgoVLP training curves ({log})"), out / "training_curves.png"))
    print(f"pictures: {', '.join(map(str, written))}")
    return written


# ---------------------------------------------------------------------------------------------------------------
# Appendix: pretrained weights, the key maps for common/weights.py (used by build_model)
# ---------------------------------------------------------------------------------------------------------------
# common/weights.py reads a file without running its pickled code and
# fails, listing the keys, on any tensor or parameter left unaccounted for (see its docstring).
#   FULL_MODEL: one of our checkpoints, or the release's (its "state_dict", DDP's "module." stripped); the
#       release's 16-row temporal_embed is cut to num_frames (or zero-padded when fine-tuning at more frames).
#   VIT_INIT: a timm ViT / DeiT state dict (`vit_base_patch16_224`, the release's jx ViT-B/16) -> video_model.*,
#       names unchanged; the ImageNet head is dropped; pos_embed is resampled for another image size; the temporal
#       branch (timeattn, norm3, temporal_embed) is new and keeps init_weights' values, so with qkv = 0 the
#       encoder starts as the image ViT on every frame.
#   DISTILBERT_INIT: Hugging Face `distilbert-base-uncased` (DistilBertModel names, or DistilBertForMaskedLM's
#       under "distilbert." with its MLM head dropped) -> text_model.*; 512 position rows cut to text_positions.
PAPER_INIT = ("the paper starts from ImageNet-21k ViT-B/16 (--init_video=jx_vit_base_p16_224-80ecf9dd.pth) and "
              "distilbert-base-uncased (--init_text, with --vocab_file=its vocab.txt)")
FULL_MODEL = dict(rules=[], drop=[r"position_ids$"], new=[])
VIT_INIT = dict(rules=[(r"^", "video_model.")], drop=[r"^head\.", r"^head_dist\.", r"^pre_logits\.", r"^dist_token$"],
                new=[r"^(?!video_model\.)", r"\.timeattn\.", r"\.norm3\.", r"\.temporal_embed$"])
DISTILBERT_INIT = dict(rules=[(r"^distilbert\.", ""), (r"^", "text_model.")],
                       drop=[r"^vocab_(transform|layer_norm|projector)\.", r"position_ids$"],
                       new=[r"^(?!text_model\.)"])


if __name__ == "__main__":
    main()
