"""OA-Trans: Object-aware Video-language Pre-training for Retrieval.

Wang, Ge, Cai, Yan, Lin, Shan, Qie, Shou. CVPR 2022. arXiv:2112.00656.
Release: github.com/FingerRec/OA-Transformer (a research snapshot built on m-bain/frozen-in-time).

## The idea

Frozen in Time (Bain et al., ICCV 2021) retrieves videos with a *dual encoder*: a divided space-time ViT embeds
the clip, DistilBERT embeds the caption, both are projected to 256-d and compared by cosine similarity. Such a
model sees frames and sentences as wholes; the nouns of a caption ("a little *girl* using a *computer*") and the
objects in the clip are never tied to each other. OA-Trans adds that tie during pre-training only, at no cost at
inference, with the output of an offline object detector (boxes + class names) on ONE frame per clip:

    stream V    the sampled frames           -> video encoder -> [CLS]                       -> Vid Proj  = v
    stream T    the caption                  -> text encoder  -> [CLS]                       -> Txt Proj  = t
    stream O_v  the *anchor frame*, with every patch outside the detected boxes blanked
                                             -> the SAME video encoder -> mean of the in-box patch tokens
                                                                                             -> Vid Proj  = o_v
    stream O_t  the detected class names as a text ("person dog frisbee ...", plus one random distractor class)
                                             -> the SAME text encoder -> mean of the tag tokens
                                                (the distractor's tokens are left out)       -> Txt Proj  = o_t

The anchor frame is the pre-detected frame (detection ran on 8 frames per video) nearest the mean index of the
frames sampled for stream V. The object-aware loss contrasts the object streams with the *other* modality:

    L = main_weight * L(t, v)  +  tags_weight * L(o_t, v)  +  regions_weight * L(t, o_v)            (paper figure)

    L(a, b) = -1/B sum_i log softmax_j(cos(a_i, b_j) / tau)_i  -  1/B sum_j log softmax_i(cos(a_i, b_j) / tau)_j

with tau = 0.05 (Frozen's NormSoftmax: the SUM of both directions). The object streams add no parameters
(shared encoders, shared heads). Fine-tuning and testing drop them: the model is then exactly Frozen.
`--objects=off` pre-trains that plain Frozen baseline with otherwise the same command: a one-field ablation.

## What is reproduced, and what is not
- The Frozen dual encoder (divided space-time ViT with Frozen's residual and zero-initialised temporal attention,
  the DistilBERT architecture with dropout 0.1 in training, 256-d heads, cosine similarity): the paper preset is
  ViT-B/16 + DistilBERT = 180,925,184 parameters. Frozen's frame curriculum (`--curriculum=1to4`).
- Anchor frame, object-guided masking on the patch grid, tag stream with a random distractor, the loss above,
  top-K = 10 boxes by confidence; the release's pairs as `--oa_loss=release`: L(t, v) + L(caption+tags, v) +
  L(mean-region, mean-tag).
- MSR-VTT-style retrieval (t2v / v2t R@1/5/10, MdR, MnR), zero-shot and `--finetune=retrieval`, one caption per
  test video as 1k-A, and on the captions naming a small object (`retrieval_small/*`).
- Not here: pretrained weights (load them with `--init_video` / `--init_text`; the CPU default starts from random
  weights), the detector (the corpus ships BUTD-style `.npz` detections), CC3M + WebVid-2M (the built-in synthetic
  corpus instead; no CC3M image stream), the paper's ablation tables and exact K / pooling / weights (not at hand,
  see shared/papers/oa_trans.md).

## Departures from the release (and why)
- The release's training entry points do not run and its trainer optimises only L(t, v) (plain Frozen); its
  object models pair caption+tags with video and mean-region with mean-tag. The default is the paper figure's pairs.
- Boxes follow the random crop and flip (the release ignores the crop: up to a patch of misalignment).
- Detections are read from top-level `.npz` arrays; the release's pickled `info` dict only with `--allow_pickle`
  (np.load of a pickle can run arbitrary code).
- Top-K boxes by confidence and tags deduplicated in confidence order (the release's np.unique sorts by class id);
  region and tag features are means, not sums (sums grow with box size / tag length).
- The release's OA models only work with 1 frame (+ anchor); here any number of frames works.

## CPU default vs paper (`--paper`; `--paper --paper_ft` for fine-tuning)
The CPU default pre-trains from random weights on the synthetic corpus in minutes. Where it departs from the
paper's recipe, and why:
| field | CPU default | paper / release | why the default differs |
|---|---|---|---|
| `img_size` / `patch_size` | 64 / 8 | 224 / 16 | the corpus is 64x64; 8-px patches keep an 8x8 grid for the boxes |
| `vit_width` / `vit_depth` / `vit_heads` | 128 / 4 / 2 | 768 / 12 / 12 (ViT-B/16) | minutes on 2 CPU cores |
| `text_width` / `text_layers` / `text_heads` / `text_ffn` | 128 / 2 / 2 / 512 | 768 / 6 / 12 / 3072 | small model |
| `text_positions` / `max_text_len` / `max_tag_len` | 64 / 32 / 24 | 512 / 64 / 32 | synthetic captions are short |
| `vocab_size` | 0 (vocab.txt) | 30522 | synthetic vocabulary |
| `time_init` | live | release | from scratch the release's init starves the temporal branch |
| `text_pool` | mean | cls | a 2-layer text encoder from scratch learns a useful [CLS] slowly |
| `crop` | random_resized (0.6..1) | resize_random (Resize 242 -> RandomCrop 224) | a stronger crop for a small corpus |
| `color_jitter` / `jitter_hue` / `grayscale_p` | 0 / 0 / 0 | 0.5 / 0.1 / 0.3 (fine-tune 0.4/0.1/0.2) | colour names |
| `batch_size` / `num_workers` | 32 / 1 | 16 per GPU x 8 / 8 | one CPU process |
| `max_steps` | 800 | 200k | minutes, not days |
| `lr` / `warmup_steps` / `schedule` | 1e-3 / 50 / cosine | 2e-4 / 0 / constant | from scratch, short schedule |
| `weight_decay` / `grad_clip` | 0.01 / 1 | 0 / off | stabilises the from-scratch run |
| `eval_every` / `log_every` | 400 / 25 | 5000 / 100 | cadence of a short run |
| `precision` | auto | fp32 (not set by `--paper`) | bf16 where faster; similarities and losses stay fp32 |
| `curriculum_frac` | 0.85 | Frozen: 1 frame to convergence, then 4 (kept by `--paper`) | a shortened curriculum |

`--paper` also sets the release's augmentation (Resize(242) -> RandomCrop(224), ColorJitter(0.5, 0.5, 0.5, 0.1)
at p = 0.8, RandomGrayscale(0.3), no flip), `--paper_ft` its fine-tuning values. The CPU default keeps only
label-preserving augmentation: captions say "to the left / right" (no flip) and name colours (no jitter).

## The file, in reading order
    config              Config, PRESETS, ABLATION, CHOICES, RANGES
    the paper's idea    the object-aware streams: the four-stream model OATrans, its loss (every loss of the file
                        is here), and the object inputs: anchor frame, boxes -> patch masks, tag text, batching
    the Frozen encoder  what OA-Trans builds on and keeps at inference: divided space-time ViT, DistilBERT
    data                .npz detections, WebVid-style pre-training clips, collate, MSR-VTT-style annotations
    evaluation          text <-> video retrieval, object streams dropped
    training            frame curriculum, endless batches, the model, the training set, main()
    appendix            pictures (`--eval=retrieval --init=<ckpt> --pictures`); pretrained weights: key maps for
                        --init, --init_video, --init_text

## Shapes legend
    B batch, T frames, N patches per frame (= (size / patch)^2), L text tokens, D width, E = 256 embedding dim,
    K boxes per anchor (top_k), G tag groups (distinct tags)

## Commands
    python oa_trans.py --pretrain                                    # CPU default: pre-train + zero-shot eval
    python oa_trans.py --pretrain --objects=off --out_dir=runs/oa_trans_off   # ablation: the plain Frozen baseline
    python oa_trans.py --pretrain --regions_weight=0 --out_dir=runs/oa_trans_tags   # ablation: tags term only
    python oa_trans.py --finetune=retrieval --init=runs/oa_trans/ckpt.pt --out_dir=runs/oa_trans_ft --max_steps=150 \\
        --lr=1e-4
    python oa_trans.py --ft_retrieval                                # the same fine-tuning, as a preset
    python oa_trans.py --eval=retrieval --init=runs/oa_trans/ckpt.pt --out_dir=runs/oa_trans_eval --pictures
    python oa_trans.py --paper --device=cuda --data_root=/data --vocab_file=/data/vocab.txt \\
        --init_video=/w/jx_vit_base_p16_224-80ecf9dd.pth --init_text=/w/distilbert-base-uncased/model.safetensors
    torchrun --standalone --nproc_per_node=8 oa_trans.py --paper --data_root=/data --vocab_file=/data/vocab.txt
    python oa_trans.py --paper --paper_ft --init=CKPT --data_root=/data --vocab_file=/data/vocab.txt  # fine-tune
"""

import functools
import os
import random
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

from common import pictures as P
from common.annotations import (BadRow, bad_row, inside, no_items, read_json, read_rows, read_table, skipped_rows,
                                text_field)
from common.errors import user_errors
from common.config import parse_config
from common.dist import all_gather_with_grad, print0
from common.metrics import retrieval_metrics
from common.text import Tokenizer, check_vocab
from common.train import (BadVideos, StepClock, autocast, check_finite, compile_blocks, count_parameters, data_report,
                          end_run, log_step, loader_settings, lr_at, param_groups, resume_state, save_state,
                          set_rng_states, start_run)
from common.video import (IMAGENET_MEAN, IMAGENET_STD, ClipCache, VideoReadError, VideoTransform, decode_videos,
                          load_clip, read_frames, sample_frame_indices, video_meta)
from common.weights import load_weights


# -----------------------------------------------------------------------------
# config: one field per line, `--key=value` on the command line; `--help` prints these comments

@dataclass
class Config:
    # --- run
    out_dir: str = "runs/oa_trans"  # where ckpt.pt, log.jsonl, metrics.json (and pictures/) go
    data_root: str = "data/synth"  # corpus root (webvid/, msrvtt/, vocab.txt); the synthetic one is generated here
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    precision: str = "auto"  # auto (bf16 where a start-up probe finds it faster) | bf16 | fp32; losses stay fp32
    compile: str = "off"  # torch.compile the transformer blocks: off | on | auto (on for runs of >= 200 steps)
    seed: int = 0  # python / numpy / torch seed
    max_steps: int = 800  # optimizer steps (paper: 200k); CPU default: minutes on 2 cores
    init: str = ""  # a whole model to start from: our ckpt.pt, or a Frozen / OA-Trans-layout release checkpoint
    init_video: str = ""  # a timm ViT state dict for the video encoder's spatial part; paper: jx_vit_base_p16_224
    init_text: str = ""  # a Hugging Face DistilBERT state dict for the text encoder; paper: distilbert-base-uncased
    vocab_file: str = ""  # "" = data_root/vocab.txt; real data: bert-base-uncased's vocab.txt (DistilBERT's)
    allow_pickle: bool = False  # read the release's pickled `info` dict in .npz detections (runs code: trusted only)
    resume: bool = False  # continue the run in out_dir from out_dir/ckpt.pt (random states and data order too)
    overwrite: bool = False  # let a new run replace the files of an earlier run in out_dir (refused otherwise)
    strict: bool = False  # a malformed annotation row stops the run (default: skipped, counted, named in the log)
    max_bad_videos: float = 0.1  # stop when more than this share of training videos (or detections) is unreadable
    finetune: str = ""  # "" = pre-train on WebVid-style data | retrieval = fine-tune on the MSR-VTT-style train split
    eval: str = ""  # "" | retrieval: only evaluate --init on test (zero-shot when it is a pre-trained checkpoint)
    pictures: bool = False  # with --eval: draw a retrieval gallery, an anchor frame's objects, the training curves
    # --- model: the Frozen dual encoder (divided space-time ViT + DistilBERT)
    patch_size: int = 8  # ViT patch side in pixels (paper 16); 8 keeps an 8x8 grid for the boxes at 64 px
    vit_width: int = 128  # ViT width D (paper 768)
    vit_depth: int = 4  # ViT blocks (paper 12)
    vit_heads: int = 2  # ViT heads (paper 12, head dim 64)
    vit_mlp_ratio: float = 4.0  # ViT MLP hidden = ratio x D (paper 4)
    time_init: str = "live"  # TimeAttn init: live = out-proj ~ N(0, 0.02) | release = Frozen's ones (VideoEncoder)
    vocab_size: int = 0  # 0 = the size of the vocab file; paper 30522 (bert-base-uncased)
    text_width: int = 128  # DistilBERT width (paper 768)
    text_layers: int = 2  # DistilBERT layers (paper 6)
    text_heads: int = 2  # DistilBERT heads (paper 12)
    text_positions: int = 64  # DistilBERT position embeddings (paper 512)
    text_ffn: int = 512  # DistilBERT FFN hidden (paper 3072)
    text_dropout: float = 0.1  # hidden and attention dropout, active in training as the release's HF model (0.1)
    text_pool: str = "mean"  # text feature: mean over the real tokens | cls (Frozen / OA-Trans; needs pre-training)
    embed_dim: int = 256  # joint embedding size E (paper 256)
    # --- loss: the object-aware streams (the paper's idea)
    objects: str = "on"  # on = OA-Trans (4 streams) | off = plain Frozen (L(t, v) only, no detections read)
    oa_loss: str = "paper"  # paper = L(t,v)+L(tags,v)+L(t,regions) | release = L(t,v)+L(caption+tags,v)+L(reg,tags)
    main_weight: float = 1.0  # weight of L(t, v) (paper / release: 1)
    tags_weight: float = 1.0  # weight of L(tags, v), or L(caption+tags, v) with oa_loss=release (1)
    regions_weight: float = 1.0  # weight of L(t, regions), or L(mean region, mean tag) with oa_loss=release (1)
    temperature: float = 0.05  # tau of every contrastive term (Frozen / OA-Trans: 0.05)
    top_k: int = 10  # boxes kept per anchor frame, by detector confidence (release 10 = BUTD's min boxes)
    distractor: bool = True  # add a random class name to the tags, not pooled ("[Random Object]"); paper loss only
    region_mask: str = "blank"  # blank = paint non-object patches black before encoding (paper figure) | none
    det_frames: int = 8  # pre-detected frames per video: midpoints of det_frames equal segments (release: 8)
    # --- data (one augmentation draw per clip, shared by its frames, anchor and boxes; common/video.py)
    num_frames: int = 4  # frames per clip (paper 4); the model's temporal rows
    curriculum: str = "1to4"  # none | 1to4 = Frozen's: 1 frame for curriculum_frac of the steps, then num_frames
    curriculum_frac: float = 0.85  # share of pre-training steps at 1 frame (Frozen: 1 frame to convergence)
    img_size: int = 64  # input resolution (paper 224; the synthetic corpus is 64x64)
    crop: str = "random_resized"  # random_resized = RandomResizedCrop(crop_scale..1) | resize_random (release)
    crop_scale: float = 0.6  # RandomResizedCrop lower area bound (upper 1); crop=random_resized only
    resize_ratio: float = 242 / 224  # crop=resize_random: short side / img_size (release: 242/224, fine-tune 238)
    hflip: bool = False  # flip half the training clips (release: no); off: captions say "to the left / right"
    color_jitter: float = 0.0  # ColorJitter brightness = contrast = saturation (release 0.5, fine-tune 0.4); 0 = off
    jitter_hue: float = 0.0  # ColorJitter hue (release 0.1)
    jitter_p: float = 0.8  # probability of the jitter (release 0.8)
    grayscale_p: float = 0.0  # RandomGrayscale probability (release 0.3, fine-tune 0.2); off: captions name colours
    max_text_len: int = 32  # caption tokens incl. [CLS]/[SEP] (paper 64; Frozen pads to the longest in the batch)
    max_tag_len: int = 24  # tag-text tokens incl. specials (paper 32)
    num_workers: int = 1  # DataLoader workers decoding videos
    cache_videos: bool = True  # decode each training video once into RAM (False: at every step, as the release)
    # --- optimisation
    batch_size: int = 32  # per process; the contrastive batch is world_size x batch_size (paper: 16 per GPU x 8)
    lr: float = 1e-3  # peak AdamW lr (paper: 2e-4 pre-training, 3e-5 fine-tuning); higher for a short scratch run
    weight_decay: float = 0.01  # AdamW decay on matrices (paper 0)
    warmup_steps: int = 50  # linear warmup (paper: none)
    schedule: str = "cosine"  # cosine | linear | constant (paper: x0.1 at epochs 60, 80: effectively constant)
    grad_clip: float = 1.0  # max grad norm, 0 = off (paper: off)
    # --- evaluation
    log_every: int = 25  # steps between log lines
    eval_every: int = 400  # steps between validation evaluations (and checkpoints)
    eval_batch_size: int = 64  # clips per forward in evaluation
    retrieval_captions: str = "first"  # queries per test video: first (one, as MSR-VTT 1k-A) | all
    retrieval_views: int = 1  # frame samplings whose similarities are averaged; 1 = bin midpoints (Frozen)


PRESETS = {
    # CPU pre-training on the synthetic corpus: the defaults above (named so the command reads as what it does)
    "pretrain": {},
    # the paper's model and pre-training recipe (ViT-B/16 + DistilBERT, 224 px, 4 frames, tau 0.05, AdamW 2e-4);
    # the paper starts from ImageNet-21k ViT-B/16 (timm's jx_vit_base_p16_224) and distilbert-base-uncased: pass
    # them as --init_video / --init_text (with --vocab_file = its vocab.txt); nothing is downloaded here
    "paper": dict(img_size=224, patch_size=16, vit_width=768, vit_depth=12, vit_heads=12, vocab_size=30522,
                  text_width=768, text_layers=6, text_heads=12, text_positions=512, text_ffn=3072, text_dropout=0.1,
                  max_text_len=64, max_tag_len=32, num_frames=4, batch_size=16, lr=2e-4, weight_decay=0.0,
                  warmup_steps=0, schedule="constant", grad_clip=0.0, crop="resize_random", resize_ratio=242 / 224,
                  hflip=False, color_jitter=0.5, jitter_hue=0.1, jitter_p=0.8, grayscale_p=0.3, time_init="release",
                  text_pool="cls", max_steps=200_000, eval_every=5000, log_every=100, num_workers=8),
    # CPU fine-tuning of the default pre-trained checkpoint on the MSR-VTT-style train split (object streams dropped)
    "ft_retrieval": dict(finetune="retrieval", init="runs/oa_trans/ckpt.pt", out_dir="runs/oa_trans_ft",
                         max_steps=150, lr=1e-4, warmup_steps=10, eval_every=75),
    # the paper's fine-tuning recipe (combine with --paper): 4 frames, AdamW 3e-5, batch 64, L(t, v) only
    "paper_ft": dict(finetune="retrieval", lr=3e-5, batch_size=64, max_steps=15_000, eval_every=1000,
                     resize_ratio=238 / 224, color_jitter=0.4, grayscale_p=0.2),
}

# The paper's central ablation, run over seeds by `bash run.sh ablate oa_trans` (common/ablate.py): plain Frozen
# (objects off) against OA-Trans, and each object term alone (the other's weight 0; both streams are still
# computed). Each run: --pretrain + the flags; zero-shot retrieval on all test captions and on the captions whose
# main object is small (retrieval_small/*, where object regions should help most).
ABLATION = dict(
    reference="on",
    variants={"off": ["--objects=off"],
              "on": [],
              "tags_only": ["--regions_weight=0"],
              "regions_only": ["--tags_weight=0"]},
    metrics=["retrieval/t2v_R@1", "retrieval/t2v_R@5", "retrieval_small/t2v_R@1", "retrieval_small/t2v_R@5"],
)

# The values each field accepts, checked by parse_config before anything runs (a one-line error naming the field).
CHOICES = dict(precision=("auto", "bf16", "fp32"), compile=("auto", "on", "off"),
               finetune=("", "retrieval"), eval=("", "retrieval"),
               objects=("on", "off"), oa_loss=("paper", "release"), region_mask=("blank", "none"),
               curriculum=("none", "1to4"), crop=("random_resized", "resize_random"), time_init=("live", "release"),
               text_pool=("mean", "cls"), schedule=("cosine", "linear", "constant"),
               retrieval_captions=("first", "all"))
RANGES = dict(num_workers=(0, None), top_k=(1, None), main_weight=(0, None), tags_weight=(0, None),
              regions_weight=(0, None), temperature=(1e-6, None), det_frames=(1, None), num_frames=(1, None),
              curriculum_frac=(0, 1), img_size=(1, None), crop_scale=(0, 1), resize_ratio=(1, None),
              color_jitter=(0, None), jitter_hue=(0, 0.5), jitter_p=(0, 1), grayscale_p=(0, 1), patch_size=(1, None),
              vit_width=(1, None), vit_depth=(1, None), vit_heads=(1, None), vit_mlp_ratio=(0, None),
              vocab_size=(0, None), text_width=(1, None), text_layers=(1, None), text_heads=(1, None),
              text_positions=(1, None), text_ffn=(1, None), text_dropout=(0, 1), max_text_len=(3, None),
              max_tag_len=(3, None), embed_dim=(1, None), batch_size=(1, None), max_steps=(1, None), lr=(0, None),
              weight_decay=(0, None), warmup_steps=(0, None), grad_clip=(0, None), log_every=(1, None),
              eval_every=(1, None), eval_batch_size=(1, None), retrieval_views=(1, None), max_bad_videos=(0, 1))


# -----------------------------------------------------------------------------
# the paper's idea: the object-aware streams and their loss
#
# Pre-training adds two streams built from an offline detector's output on ONE frame of the clip, each contrasted
# with the other modality; fine-tuning and evaluation drop them (only L(t, v) remains). In reading order:
#   1. the model    OATrans: the Frozen dual encoder (next section) and, through the same encoders and heads, the
#                   region stream O_v (mask_anchor + encode_regions) and the tag stream O_t (pool_tags)
#   2. the loss     nce_loss per pair, LOSS_TERMS (which pairs, by oa_loss), oa_trans_loss (their weighted sum).
#                   Every loss of the file is here.
#   3. the inputs   the anchor frame (detection_frames, anchor_position), its top-K boxes as patch masks after the
#                   clip's crop / flip (top_k_detections, boxes_to_patch_mask, region_masks), its class names as a
#                   text with a distractor (tag_tokens, object_tags), and their batching (collate_objects)
# The data section calls 3 for each clip and batch; all the code that --oa_loss=paper|release switches is here.

# --- 1. the model: one dual encoder, four streams ---------------------------------------------------------------------

def masked_mean(tokens, mask):
    """Mean of the tokens where mask is true. tokens (..., L, D), mask (..., L) bool -> (..., D)."""
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(-2) / w.sum(-2).clamp(min=1)


class OATrans(nn.Module):
    """The dual encoder with its four streams. Only V and T exist at inference; O_v reuses video_model + vid_proj,
    O_t reuses text_model + txt_proj, so `objects=on|off` builds the same parameters.

    forward(video, text) returns the embeddings (B, E) of every stream given:
        video (B, T, 3, H, W); text = (ids, mask) (B, L)
        anchor (B, 3, H, W) + regions (B, G, N) bool: patches of each region group (G = 1: the union of the
            top-K boxes, the paper; G = K: one group per box, the release's mean-region)
        tags = (ids, mask) (B, Lt) + tag_groups (B, G', Lt) bool: positions of each tag group (the distractor
            belongs to none); with oa_loss=release the tag text starts with the caption and its pooled output
            (as a caption's) is the extra "caption_tags" stream
    The encoders are called through forward so that DDP sees every use of the parameters.
    """

    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        assert cfg.time_init in ("release", "live") and cfg.text_pool in ("cls", "mean")
        self.video_model = VideoEncoder(cfg.img_size, cfg.patch_size, cfg.num_frames, cfg.vit_width, cfg.vit_depth,
                                        cfg.vit_heads, cfg.vit_mlp_ratio).init_weights(cfg.time_init)
        self.text_model = TextEncoder(vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_ffn,
                                      cfg.text_positions, cfg.text_dropout).init_weights()
        self.vid_proj = nn.Linear(cfg.vit_width, cfg.embed_dim)  # Vid Proj: Linear, no activation
        self.txt_proj = nn.Sequential(nn.ReLU(), nn.Linear(cfg.text_width, cfg.embed_dim))  # Txt Proj: ReLU -> Linear
        # the colour of a black pixel after ImageNet normalisation: what a "blanked" patch is painted with
        black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
        self.register_buffer("black", black.view(1, 3, 1, 1), persistent=False)

    def encode_video(self, video):
        return self.vid_proj(self.video_model(video)[:, 0])  # (B, E) from CLS

    def pool_text(self, hidden, mask):
        """(B, L, D) -> (B, D): the [CLS] output (Frozen), or the mean over the real tokens (text_pool=mean)."""
        return hidden[:, 0] if self.cfg.text_pool == "cls" else masked_mean(hidden, mask.bool())

    def encode_text(self, ids, mask):
        return self.txt_proj(self.pool_text(self.text_model(ids, mask), mask))  # (B, E)

    def mask_anchor(self, anchor, keep):
        """Object-guided masking: with region_mask=blank, paint the patches outside every box black (the paper
        figure). anchor (B, 3, H, W), keep (B, N) bool -> (B, 3, H, W)."""
        if self.cfg.region_mask != "blank":
            return anchor
        g, p = self.video_model.grid, self.cfg.patch_size
        pix = repeat(keep.view(-1, g, g), "b h w -> b 1 (h p1) (w p2)", p1=p, p2=p)  # (B, 1, H, W)
        return torch.where(pix, anchor, self.black.to(anchor.dtype))

    def encode_regions(self, anchor, regions):
        """Stream O_v: mask the anchor, encode it as a 1-frame clip with the shared video encoder, pool each region
        group's output tokens, project, average the groups."""
        anchor = self.mask_anchor(anchor, regions.any(1))  # keep (B, N): patches covered by some box
        tokens = self.video_model(anchor[:, None])[:, 1:]  # (B, N, D): patch tokens of the masked anchor
        per_group = self.vid_proj(masked_mean(tokens[:, None], regions))  # (B, G, E)
        return masked_mean(per_group, regions.any(-1))  # (B, E): mean over non-empty groups

    def pool_tags(self, hidden, tag_groups):
        """Stream O_t: mean over each tag group's token outputs, project, average the groups. hidden (B, Lt, D)
        -> (B, E)."""
        per_group = self.txt_proj(masked_mean(hidden[:, None], tag_groups))  # (B, G', E)
        return masked_mean(per_group, tag_groups.any(-1))

    def forward(self, video, text, anchor=None, regions=None, tags=None, tag_groups=None):
        out = {"video": self.encode_video(video), "text": self.encode_text(*text)}
        if anchor is not None:
            out["regions"] = self.encode_regions(anchor, regions)
        if tags is not None:
            hidden = self.text_model(*tags)  # (B, Lt, D): the tags through the shared text encoder
            out["tags"] = self.pool_tags(hidden, tag_groups)
            if self.cfg.oa_loss == "release":  # the text is "caption tag1 tag2 ...", pooled like a caption
                out["caption_tags"] = self.txt_proj(self.pool_text(hidden, tags[1]))
        return out


# --- 2. the loss: Frozen's NormSoftmax on each pair of streams --oa_loss names ----------------------------------------

def l2norm(x):
    return F.normalize(x, dim=-1, eps=1e-8)


def cosine_sim(a, b):
    """(Ba, E), (Bb, E) -> (Ba, Bb) cosine similarities, in fp32."""
    return l2norm(a.float()) @ l2norm(b.float()).t()


def nce_loss(sim, temperature):
    """Frozen's NormSoftmax on a square similarity matrix whose diagonal holds the positive pairs:
    L = -mean_i log softmax_j(S/tau)[i, i] - mean_j log softmax_i(S/tau)[j, j]  (the sum of both directions).
    A non-square S (captions != videos) raises: the release's diag() would silently average min(N, M) terms."""
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"nce_loss needs a square similarity with the pairs on the diagonal, got {tuple(sim.shape)}")
    logits = sim / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)


# which embeddings each loss term contrasts: (weight field, query stream, item stream). The release's object models
# pair caption+tags with video and mean-region with mean-tag; the paper figure pairs each object stream with the
# other modality.
LOSS_TERMS = {
    "paper": [("main_weight", "text", "video"), ("tags_weight", "tags", "video"),
              ("regions_weight", "text", "regions")],
    "release": [("main_weight", "text", "video"), ("tags_weight", "caption_tags", "video"),
                ("regions_weight", "regions", "tags")],
}


def oa_trans_loss(emb, terms, weights, temperature):
    """Object-aware contrastive loss: sum over terms of weight * L(cos(emb[a], emb[b])).

    emb: stream name -> (B, E) embeddings (already gathered across ranks); terms: (weight name, a, b) triples
    from LOSS_TERMS, restricted to the streams present (objects=off leaves only L(t, v)); weights: name -> float.
    Returns (total loss, {term name: loss value}).
    """
    parts = {}
    for w, a, b in terms:
        if a in emb and b in emb:
            parts[f"{a}-{b}"] = weights[w] * nce_loss(cosine_sim(emb[a], emb[b]), temperature)
    return sum(parts.values()), parts


# --- 3. the inputs: the anchor frame, its boxes as patch masks, its class names as a text -----------------------------

def detection_frames(num_frames, n_det=8):
    """Frame indices the detector ran on: the midpoints (a + b) // 2 of n_det equal segments [a, b) of the clip."""
    edges = np.linspace(0, num_frames, n_det + 1).astype(int)  # integer segment bounds, as in the release
    return [min(int((edges[k] + edges[k + 1]) // 2), num_frames - 1) for k in range(n_det)]


def anchor_position(sampled, det_frames):
    """Which pre-detected frame is the anchor: the one nearest the mean sampled index (the first on a tie)."""
    m = float(np.mean(sampled))
    return min(range(len(det_frames)), key=lambda k: abs(det_frames[k] - m))


def top_k_detections(det, k):
    """The k most confident boxes, most confident first (a stable sort: ties keep the file's order). The release
    keeps K = 10 (BUTD's minimum number of boxes)."""
    order = np.argsort(-det["scores"], kind="stable")[:k]
    return det["boxes"][order], det["labels"][order]


def boxes_to_patch_mask(boxes, img_size, patch_size):
    """Patches covered by each box. boxes (K, 4) x1,y1,x2,y2 in input pixels -> (K, N) bool, row-major grid.

    Box k covers rows floor(y1/p) .. ceil(y2/p) - 1 and cols floor(x1/p) .. ceil(x2/p) - 1 (the release's rule:
    any patch the box touches with positive area); boxes are clipped to the image; an empty box covers nothing.
    """
    g = img_size // patch_size
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).clamp(0, img_size)
    x1, y1, x2, y2 = boxes.unbind(-1)
    nonempty = (x2 > x1) & (y2 > y1)
    r0, r1 = (y1 / patch_size).floor(), (y2 / patch_size).ceil()
    c0, c1 = (x1 / patch_size).floor(), (x2 / patch_size).ceil()
    idx = torch.arange(g, dtype=torch.float32)
    rows = (idx >= r0[:, None]) & (idx < r1[:, None])  # (K, g)
    cols = (idx >= c0[:, None]) & (idx < c1[:, None])  # (K, g)
    mask = rows[:, :, None] & cols[:, None, :] & nonempty[:, None, None]  # (K, g, g)
    return mask.flatten(1)


def region_masks(boxes, top_k, img_size, patch_size):
    """(K, N) bool: the patches of each of the (at most K) boxes, given in input pixels after the clip's crop.
    Fewer boxes leave empty rows; when every box was cropped away the whole frame is the one region."""
    regions = torch.zeros(top_k, (img_size // patch_size) ** 2, dtype=torch.bool)  # (K, N)
    regions[:len(boxes)] = boxes_to_patch_mask(boxes, img_size, patch_size)
    if not regions.any():
        regions[0] = True
    return regions


def tag_tokens(tokenizer, tags, max_len, caption=None, distractor=None, rng=random):
    """Token ids of the tag text and which positions belong to each tag.

    tags: class names (confidence order). The distractor (a random class name) is inserted at a random position;
    its tokens belong to no group, so pooling never sees it. With `caption` (the release variant) the tags follow
    the caption's tokens: [CLS] caption tags [SEP]. Returns (ids list[int], groups list[list[int]]).
    """
    words = [(t, True) for t in tags]
    if distractor is not None:
        words.insert(rng.randint(0, len(words)), (distractor, False))
    ids = [tokenizer.cls_id]
    if caption is not None:
        ids += [tokenizer.vocab.get(p, tokenizer.unk_id) for p in tokenizer.tokenize(caption)]
    groups = []
    for name, pooled in words:
        pieces = [tokenizer.vocab.get(p, tokenizer.unk_id) for p in tokenizer.tokenize(name)]
        pos = list(range(len(ids), len(ids) + len(pieces)))
        ids += pieces
        if pooled:
            groups.append(pos)
    ids = ids[:max_len - 1] + [tokenizer.sep_id]
    groups = [[p for p in g if p < max_len - 1] for g in groups]
    return ids, [g for g in groups if g]


def object_tags(tokenizer, labels, class_names, caption, cfg, rng):
    """The tag text of one clip from its top-K class ids, as tag_tokens' (ids, groups). The names are deduplicated
    in confidence order (the release's np.unique sorts them by class id).
    paper:   "tag1 tag2 ... [distractor] ... tagK", the distractor a random class not among the tags (--distractor)
    release: "caption tag1 tag2 ...", no distractor (the release never enables its helper)."""
    names = list(dict.fromkeys(class_names[j] for j in labels))  # distinct, in confidence order
    if cfg.oa_loss == "release":
        return tag_tokens(tokenizer, names, cfg.max_text_len + cfg.max_tag_len, caption)
    distractor = None
    if cfg.distractor:
        others = [c for c in class_names if c not in names]
        distractor = rng.choice(others) if others else None
    return tag_tokens(tokenizer, names, cfg.max_tag_len, None, distractor, rng)


def collate_objects(items, tokenizer, oa_loss):
    """The object fields of a batch: anchor (B, 3, S, S); regions (B, G, N) bool; tags = (ids, mask) (B, Lt),
    padded; tag_groups (B, G', Lt) bool. The paper pools the union of the boxes and of the tags (G = G' = 1); the
    release averages per-box regions and per-tag groups (G = K, G' = the most distinct tags in the batch)."""
    regions = torch.stack([it["regions"] for it in items])  # (B, K, N)
    L = max(len(it["tag_ids"]) for it in items)
    G = max(len(it["tag_groups"]) for it in items)
    ids = torch.full((len(items), L), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    groups = torch.zeros(len(items), G, L, dtype=torch.bool)  # (B, G', Lt)
    for b, it in enumerate(items):
        ids[b, :len(it["tag_ids"])], mask[b, :len(it["tag_ids"])] = torch.tensor(it["tag_ids"]), 1
        for j, g in enumerate(it["tag_groups"]):
            groups[b, j, g] = True
    if oa_loss == "paper":  # one group each: the union of the boxes, the union of the tags
        regions, groups = regions.any(1, keepdim=True), groups.any(1, keepdim=True)
    return dict(anchor=torch.stack([it["anchor"] for it in items]), regions=regions, tags=(ids, mask),
                tag_groups=groups)


# -----------------------------------------------------------------------------
# the Frozen encoder OA-Trans builds on: Frozen in Time's divided space-time ViT and DistilBERT, what stays at
# inference (OATrans above adds the heads). egovlp.py carries the same classes under the same names (only
# SpaceTimeBlock builds its modules in another order); tests/test_oa_trans.py loads one copy's weights into the
# other and checks that the outputs agree.

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
        # same weights as before; egovlp.py's copy builds them in another order -- same keys, same computation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.attn = DividedAttention(dim, heads)  # space
        self.timeattn = DividedAttention(dim, heads)  # time
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

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


# -----------------------------------------------------------------------------
# data: BUTD-style .npz detections, WebVid-style pre-training clips, MSR-VTT-style retrieval annotations

class DetectionReadError(ValueError):
    """A detection file that is missing, empty, truncated or lacks its arrays; the message names the path."""


def read_detections(path, allow_pickle=False):
    """One BUTD-style .npz -> dict(boxes (K, 4) float32 x1,y1,x2,y2 px, labels (K,) int, scores (K,), image_h, image_w).

    Class ids and scores are read from top-level arrays (objects_id, objects_conf). Files written by the release's
    extractor keep them in a pickled `info` dict instead; unpickling runs code, so it is read only when asked.
    A missing or broken file raises DetectionReadError (its clip is skipped and counted like an unreadable video).
    """
    try:
        with np.load(path, allow_pickle=allow_pickle) as z:
            if "objects_id" in z.files:
                labels, scores = z["objects_id"], z["objects_conf"]
            elif "info" in z.files:
                if not allow_pickle:
                    raise ValueError(f"{path}: class ids are only in the pickled `info` dict; loading a pickle can "
                                     f"run arbitrary code, pass --allow_pickle to read trusted files")
                info = z["info"].item()
                labels, scores = info["objects_id"], info["objects_conf"]
            else:
                raise DetectionReadError(f"{path}: no objects_id / info array")
            return dict(boxes=z["bbox"].astype(np.float32).reshape(-1, 4), labels=np.asarray(labels, dtype=np.int64),
                        scores=np.asarray(scores, dtype=np.float32), image_h=int(z["image_h"]),
                        image_w=int(z["image_w"]))
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:  # 0-byte, truncated, not a zip, missing array
        raise DetectionReadError(f"{path}: unreadable detections ({type(e).__name__}: {e})") from None


def read_vocab_lines(path):
    with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark is dropped)
        return [line.strip() for line in f if line.strip()]


def clip_transform(cfg, train):
    """The clip augmentation of the config (training) or the centre crop (evaluation)."""
    jitter = (cfg.color_jitter,) * 3 + (cfg.jitter_hue,) if cfg.color_jitter or cfg.jitter_hue else None
    return VideoTransform(cfg.img_size, train, scale=(cfg.crop_scale, 1.0), flip=cfg.hflip, crop=cfg.crop,
                          resize_ratio=cfg.resize_ratio, jitter=jitter, jitter_p=cfg.jitter_p,
                          grayscale_p=cfg.grayscale_p)


class WebVidObjects(torch.utils.data.Dataset):
    """WebVid-style clips with their anchor frame and detections.

    Item: video (T, 3, S, S), caption str, and with objects: anchor (3, S, S), regions (K, N) bool (the patches of
    each of the top-K boxes), tag_ids list[int] + tag_groups list[list[int]] (see object_tags). The T frames and
    the anchor frame are decoded together and get ONE random crop / flip / colour jitter, which also moves the
    boxes, so the patch mask lines up with the pixels it masks.
    """

    def __init__(self, root, split, cfg, tokenizer, objects=True, train=True):
        self.root, self.cfg, self.tok, self.objects, self.train = root, cfg, tokenizer, objects, train
        path, seen = os.path.join(root, "webvid", f"results_{split}.csv"), set()

        def parse(r):  # no id, an empty caption, a repeated id, a path leaving root: a bad row (common/annotations.py)
            vid = text_field(r, "videoid")
            if vid in seen:
                raise BadRow(f"duplicate videoid {vid!r}")
            seen.add(vid)
            inside(os.path.join(root, "webvid", "videos"), text_field(r, "page_dir"), vid + ".mp4")
            inside(os.path.join(root, "webvid", "objects"), r["page_dir"], vid)
            return dict(videoid=vid, page_dir=r["page_dir"], name=text_field(r, "name"))
        self.rows = read_table(path, parse, columns=("videoid", "page_dir", "name"),  # columnar, cached (annotations)
                               version="oa_trans.webvid/1")
        self.transform = clip_transform(cfg, train)
        self.num_frames = cfg.num_frames  # changed by the frame curriculum
        self.object_names = read_vocab_lines(os.path.join(root, "webvid", "objects_vocab.txt"))
        self.cache = {}  # video path -> every decoded frame, uint8 (F, H, W, 3), when cfg.cache_videos
        self.unreadable = {}  # video path -> error, of the videos preload() could not decode

    def __len__(self):
        return len(self.rows)

    def video_path(self, row):
        return os.path.join(self.root, "webvid", "videos", row["page_dir"], row["videoid"] + ".mp4")

    def preload(self, threads=2):
        """Decode every video whole into the cache, in the main process before the DataLoader forks its workers
        (they share the one copy, and it outlives the loader that the frame curriculum rebuilds). At every step the
        frames are then sampled from memory exactly as they would be decoded. Returns the number unreadable."""
        self.cache, self.unreadable = decode_videos([self.video_path(r) for r in self.rows], threads)
        return len(self.unreadable)  # skipped and counted when sampled

    def read(self, path, indices):
        """Frames `indices` of a video: from the cache when preloaded, else decoded now."""
        return self.cache[path][indices] if path in self.cache else read_frames(path, indices)

    def num_frames_of(self, path):
        return len(self.cache[path]) if path in self.cache else video_meta(path).num_frames

    def frames_and_objects(self, row, path, idx, n):
        """Frames `idx` of a video of n frames plus its anchor frame, uint8 (T + 1, H, W, 3) with the anchor last,
        and the anchor's top-K boxes (K, 4) in pixels of the decoded frames and their class ids (K,)."""
        det_idx = detection_frames(n, self.cfg.det_frames)
        a = anchor_position(idx, det_idx)
        frames = self.read(path, idx + [det_idx[a]])
        det = read_detections(os.path.join(self.root, "webvid", "objects", row["page_dir"], row["videoid"],
                                           f"{a}.npz"), self.cfg.allow_pickle)
        boxes, labels = top_k_detections(det, self.cfg.top_k)
        h, w = frames.shape[1:3]  # the detector may have seen another resolution: rescale to the decoded frames
        boxes = boxes * np.array([w / det["image_w"], h / det["image_h"]] * 2, dtype=np.float32)
        return frames, boxes, labels

    def __getitem__(self, i):
        row, cfg = self.rows[i], self.cfg
        rng = random.Random(random.getrandbits(64))  # DataLoader workers get distinct python seeds from torch
        path = self.video_path(row)
        try:
            n = self.num_frames_of(path)
            idx = sample_frame_indices(n, self.num_frames, "rand" if self.train else "uniform", rng=rng)
            if not self.objects:
                video, _ = self.transform(self.read(path, idx), rng=rng)
                return dict(video=video, caption=row["name"])
            frames, boxes, labels = self.frames_and_objects(row, path, idx, n)
        except VideoReadError as e:  # skipped by the collate function, named and counted by the loop
            return dict(bad_video=path, error=str(e))
        except (DetectionReadError, FileNotFoundError) as e:  # missing or broken detections
            return dict(bad_video=path, error=f"its detections: {e}")
        video, boxes = self.transform(frames, boxes, rng=rng)  # same crop / flip for frames, anchor and boxes
        regions = region_masks(boxes, cfg.top_k, cfg.img_size, cfg.patch_size)  # (K, N)
        tag_ids, tag_groups = object_tags(self.tok, labels, self.object_names, row["name"], cfg, rng)
        return dict(video=video[:-1], anchor=video[-1], regions=regions, caption=row["name"],
                    tag_ids=tag_ids, tag_groups=tag_groups)


def collate(items, tokenizer, cfg):
    """List of items -> batch: stacks clips, tokenises captions, and with objects adds collate_objects' fields.
    Unreadable videos arrive as dict(bad_video, error): dropped (gathers accept a shorter batch), listed in
    batch["bad_videos"] and counted in batch["skipped"]; a batch of unreadable videos only has no "video"."""
    n_in = len(items)
    bad = [(it["bad_video"], it["error"]) for it in items if "bad_video" in it]
    items = [it for it in items if "bad_video" not in it]
    if not items:
        return dict(skipped=n_in, bad_videos=bad)
    enc = tokenizer([it["caption"] for it in items], cfg.max_text_len, pad_to_max=False)
    batch = dict(video=torch.stack([it["video"] for it in items]),  # (B, T, 3, S, S)
                 text=(enc["input_ids"], enc["attention_mask"]), skipped=n_in - len(items), bad_videos=bad)
    if "anchor" in items[0]:
        batch.update(collate_objects(items, tokenizer, cfg.oa_loss))
    return batch


class MSRVTT:
    """MSR-VTT-style annotations: videos of a split and all their captions (several per video)."""

    def __init__(self, root, split):
        base = os.path.join(root, "msrvtt")
        videos = os.path.join(base, "videos", "all")
        ids = read_rows(os.path.join(base, "splits", f"{split}_list.txt"), lambda v: (v, inside(videos, v + ".mp4")),
                        "lines")
        self.videos, self.paths = [v for v, _ in ids], [p for _, p in ids]
        index = {v: i for i, v in enumerate(self.videos)}
        json_path, anns = os.path.join(base, "annotation", "MSR_VTT.json"), []
        for n, a in enumerate(read_json(json_path)["annotations"]):
            try:  # an annotation without image_id or with an empty caption is a bad row, named by its index
                if a["image_id"] in index:
                    anns.append(dict(a, caption=text_field(a, "caption")))
            except (BadRow, KeyError, TypeError) as e:
                bad_row(json_path, f"annotations[{n}]", str(e) if isinstance(e, BadRow) else f"missing {e}")
        self.captions = [a["caption"] for a in anns]
        self.caption_video = [index[a["image_id"]] for a in anns]
        self.small = [bool(a.get("small_object", False)) for a in anns]


class MSRVTTTrain(torch.utils.data.Dataset):
    """Fine-tuning pairs: one clip of a train video and one of its captions, drawn at random (Frozen's protocol)."""

    def __init__(self, ann, cfg):
        self.ann, self.cfg = ann, cfg
        self.by_video = {}
        for c, v in zip(ann.captions, ann.caption_video):
            self.by_video.setdefault(v, []).append(c)
        self.transform = clip_transform(cfg, True)
        self.num_frames = cfg.num_frames

    def __len__(self):
        return len(self.ann.videos)

    def __getitem__(self, i):
        rng = random.Random(random.getrandbits(64))
        try:
            frames, _ = load_clip(self.ann.paths[i], self.num_frames, "rand", rng=rng)
        except VideoReadError as e:
            return dict(bad_video=self.ann.paths[i], error=str(e))
        video, _ = self.transform(frames, rng=rng)
        return dict(video=video, caption=rng.choice(self.by_video[i]))


# -----------------------------------------------------------------------------
# evaluation: MSR-VTT-style text <-> video retrieval, object streams dropped

class EvalClips:
    """Decoded eval clips (centre crop), cached as uint8 after the first read (common/video.py's ClipCache, keyed
    by (video, view)): view None = bin-midpoint frames; view k = frames drawn at random in each bin with a generator
    seeded by (seed, k, video), the k-th of the All-in-one release's retrieval views."""

    def __init__(self, ann, cfg):
        self.ann, self.cfg = ann, cfg
        self.transform = VideoTransform(cfg.img_size, False)
        self.cache = ClipCache()  # (video, view) -> uint8 frames, None when unreadable

    @property
    def unreadable(self):
        """Unreadable videos, each counted once (at its midpoint view, or its first random one)."""
        return sum(view is None or view == 0 for _, view in self.cache.unreadable)

    def frames(self, i, view=None):
        def read():
            rng = None if view is None else random.Random(f"{self.cfg.seed}/{view}/{i}")
            mode = "uniform" if view is None else "rand"
            return load_clip(self.ann.paths[i], self.cfg.num_frames, mode, rng=rng)[0]
        return self.cache.get((i, view), read)

    def clip(self, i, view=None):
        """Clip i of a view as (T, 3, S, S), and whether its video was readable (an unreadable one is zeros)."""
        fr = self.frames(i, view)
        if fr is None:
            return torch.zeros(self.cfg.num_frames, 3, self.cfg.img_size, self.cfg.img_size), False
        return self.transform(fr)[0], True


def first_captions(ann):
    """Video -> the index of its first caption (the one query per video of MSR-VTT 1k-A)."""
    first = {}
    for c, v in enumerate(ann.caption_video):
        first.setdefault(v, c)
    return first


@torch.no_grad()
def encode_videos(model, clips, cfg, device, view=None):
    """(videos, E) embeddings of one view of every split video; unreadable videos get zeros (they rank last)."""
    vids = []
    for s in range(0, len(clips.ann.videos), cfg.eval_batch_size):
        batch, ok = zip(*(clips.clip(i, view) for i in range(s, min(s + cfg.eval_batch_size, len(clips.ann.videos)))))
        with autocast(device, cfg.precision):
            v = model.encode_video(torch.stack(batch).to(device)).float()
        vids.append(v * torch.tensor(ok, device=device, dtype=v.dtype)[:, None])
    return torch.cat(vids)


@torch.no_grad()
def encode_captions(model, captions, tokenizer, cfg, device):
    """(len(captions), E) text embeddings in one forward (padded to the longest caption)."""
    enc = tokenizer(captions, cfg.max_text_len, pad_to_max=False)
    with autocast(device, cfg.precision):
        return model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float()


@torch.no_grad()
def evaluate_retrieval(model, clips, tokenizer, cfg, device):
    """Embed every split video and the query captions; retrieval metrics over them and over the small-object ones.

    The protocol is set by two fields, shared with all_in_one.py:
    retrieval_captions  "first": one query per video, its first caption (MSR-VTT 1k-A scores one caption per video)
                        | "all": every caption (v2t counts the best-ranked one).
    retrieval_views     1: bin-midpoint frames. V > 1: V random frame samplings, cosine similarities averaged over
                        the views (the All-in-one release's 3 views; Frozen / OA-Trans evaluate one).
    Unreadable videos get a zero embedding (they rank last) and are counted in `unreadable`."""
    assert cfg.retrieval_captions in ("first", "all") and cfg.retrieval_views >= 1, (cfg.retrieval_captions,
                                                                                     cfg.retrieval_views)
    model.eval()
    ann = clips.ann
    views = [None] if cfg.retrieval_views == 1 else range(cfg.retrieval_views)
    vids = [encode_videos(model, clips, cfg, device, view) for view in views]  # each (videos, E)
    queries = (list(range(len(ann.captions))) if cfg.retrieval_captions == "all"
               else sorted(first_captions(ann).values()))
    text = torch.cat([encode_captions(model, [ann.captions[c] for c in queries[s:s + cfg.eval_batch_size]], tokenizer,
                                     cfg, device) for s in range(0, len(queries), cfg.eval_batch_size)])
    sim = torch.stack([cosine_sim(text, v) for v in vids]).mean(0).cpu()  # (queries, videos), mean over views
    t2v = torch.tensor([ann.caption_video[c] for c in queries])
    metrics = {f"retrieval/{k}": v for k, v in retrieval_metrics(sim, t2v).items()}
    small = torch.tensor([ann.small[c] for c in queries])
    if small.any():
        metrics.update({f"retrieval_small/{k}": v for k, v in retrieval_metrics(sim[small], t2v[small]).items()
                        if k.startswith("t2v")})
    model.train()
    return metrics


# -----------------------------------------------------------------------------
# training: the frame curriculum and its batches, the model, the training set, then main() with the step loop

def frames_at(step, cfg):
    """Frozen's curriculum: 1 frame for the first curriculum_frac of pre-training, then num_frames."""
    if cfg.curriculum == "1to4" and not cfg.finetune and step < int(cfg.curriculum_frac * cfg.max_steps):
        return 1
    return cfg.num_frames


def infinite_batches(dataset, collate, cfg, world, rank, seed, skip=0, device=torch.device("cpu")):
    """Endless shuffled batches (a new permutation every pass), this rank's shard only. The first `skip` batches
    are passed over without being read: a resumed run continues the interrupted run's order."""
    epoch = 0
    while True:
        sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip * cfg.batch_size:]
        skip = max(0, skip - len(sampler) // cfg.batch_size)
        settings = dict(loader_settings(cfg.num_workers, device, log=lambda _: None), persistent_workers=False)
        loader = torch.utils.data.DataLoader(dataset, cfg.batch_size, sampler=indices, collate_fn=collate,
                                             drop_last=True, **settings,
                                             generator=torch.Generator().manual_seed(seed + epoch))  # not the global
        yield from loader
        epoch += 1


def start_batches(dataset, frames, order, step, cfg, tokenizer, dist):
    """The endless batches of clips of `frames` frames -> (batches, order). `order` (frames, seed, batches drawn) is
    what a checkpoint keeps of them: a resumed run continues its order; a new frame count (the curriculum's switch)
    starts a new one, seeded by the step."""
    dataset.num_frames = frames
    if order.get("frames") != frames:
        order = dict(frames=frames, seed=cfg.seed + step, drawn=0)
    batches = infinite_batches(dataset, functools.partial(collate, tokenizer=tokenizer, cfg=cfg), cfg,
                               dist.world_size, dist.rank, order["seed"], skip=order["drawn"], device=dist.device)
    return batches, order


def to_device(batch, device):
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, tuple):
            out[k] = tuple(t.to(device, non_blocking=True) for t in v)
        else:
            out[k] = v
    return out


def build_model(cfg, tokenizer, dist):
    """OATrans, initialised, then loaded from --init_video / --init_text / --init, on the device (its blocks compiled
    with --compile) -> (the model, what the training step calls: the model DDP-wraps when there are several ranks)."""
    vocab_size = cfg.vocab_size or tokenizer.vocab_size
    check_vocab(tokenizer, vocab_size)  # a token id past the table would fail mid-run
    model = OATrans(cfg, vocab_size)
    # ours: {"model": ...}; a release: {"state_dict": ...}; timm / HF: the tensors themselves (key maps: appendix)
    load_weights(model, [(cfg.init_video, VIT_INIT), (cfg.init_text, DISTILBERT_INIT), (cfg.init, FULL_MODEL)],
                 "oa_trans", log=print0)
    if cfg.vit_width == 768 and not (cfg.init or cfg.init_video or cfg.init_text):
        print0(f"note: paper-size model from random weights; {PAPER_INIT}")
    model = model.to(dist.device)
    print0(compile_blocks([*model.video_model.blocks, *model.text_model.transformer.layer], cfg.compile, dist.device,
                          0 if cfg.eval else cfg.max_steps))
    print0(f"parameters: {count_parameters(model):,} (the object streams share them)")
    if dist.world_size == 1:
        return model, model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def evaluate_only(model, test_clips, tokenizer, cfg, dist):
    """--eval=retrieval: test the --init weights once (zero-shot for a pre-trained checkpoint), draw the pictures
    with --pictures -> the metrics."""
    metrics = evaluate_retrieval(model, test_clips, tokenizer, cfg, dist.device)
    if cfg.pictures and dist.is_main:
        draw_pictures(model, cfg, tokenizer, dist.device, test_clips)
    return end_run(cfg, dist, metrics, "test retrieval (object streams dropped)")


def training_set(cfg, tokenizer, objects, dist, logger):
    """-> (the training clips, the unreadable-video counter): WebVid-style clips with their objects (pre-training;
    with cache_videos the videos are decoded into RAM here, before the DataLoader forks its workers), or the
    MSR-VTT-style train split (--finetune). Refused when no full batch could be drawn."""
    dataset = (MSRVTTTrain(MSRVTT(cfg.data_root, "train"), cfg) if cfg.finetune
               else WebVidObjects(cfg.data_root, "train", cfg, tokenizer, objects=objects))
    bad = BadVideos(len(dataset), cfg.max_bad_videos, print0, logger)
    if cfg.cache_videos and not cfg.finetune:
        t = time.time()
        n_bad = dataset.preload(threads=min(8, os.cpu_count() or 1))
        print0(f"decoded {len(dataset.cache)} training videos into RAM in {time.time() - t:.0f} s "
               f"({n_bad} unreadable)")
        bad.add(sorted(dataset.unreadable.items()), skipped=0)  # a corpus too broken stops here
    if len(dataset) // dist.world_size < cfg.batch_size:  # full batches only: none could ever be drawn
        if not len(dataset):  # no usable row: the bad-row count and the first reasons, not a batch size
            raise no_items(0, cfg.batch_size, "training clips")
        raise SystemExit(f"error: {len(dataset)} training clips over {dist.world_size} rank(s), fewer than "
                         f"--batch_size={cfg.batch_size} per rank: no batch can be drawn; lower --batch_size")
    if skipped_rows():
        logger.log({"bad_rows": skipped_rows()})
    return dataset, bad


def loss_setup(cfg, objects, dataset, dist):
    """-> (the loss terms of --oa_loss, their weights by field name); says what the run trains on."""
    terms = LOSS_TERMS[cfg.oa_loss]
    if objects and cfg.distractor and cfg.oa_loss == "release":
        print0("note: --distractor has no effect with --oa_loss=release (the release's tag text has no distractor)")
    print0(f"{'fine-tuning' if cfg.finetune else 'pre-training'}: {len(dataset)} clips, "
           f"objects={'on' if objects else 'off'}, "
           f"loss terms {[t[1] + '-' + t[2] for t in terms] if objects else ['text-video']}, "
           f"contrastive batch = {dist.world_size} x {cfg.batch_size} = {dist.world_size * cfg.batch_size}")
    return terms, dict(main_weight=cfg.main_weight, tags_weight=cfg.tags_weight, regions_weight=cfg.regions_weight)


def validate(model, val_clips, tokenizer, cfg, device, logger, step):
    """Val retrieval during training: logged as val_*, and one console line."""
    val = evaluate_retrieval(model, val_clips, tokenizer, cfg, device)
    logger.log({"step": step, **{f"val_{k}": v for k, v in val.items()}})
    print0(f"step {step} | val t2v R@1 {val['retrieval/t2v_R@1']:.1f} R@5 {val['retrieval/t2v_R@5']:.1f} "
           f"MdR {val['retrieval/t2v_MdR']:.0f}")


@user_errors  # a failure the user can fix (path, data file, weights, disk) is one `error:` line (common/errors.py)
def main(argv=None):
    """Pre-train OA-Trans (--finetune: fine-tune it; --eval: only test it), then test it on text <-> video retrieval
    with the object streams dropped -> the test metrics."""
    cfg = parse_config(Config, argv, PRESETS, CHOICES, RANGES)
    needs = ["msrvtt"] + ([] if cfg.finetune or cfg.eval else ["webvid/results_train.csv"])
    dist, logger = start_run(cfg, Config.data_root, needs)  # seeds, data and weights files checked, out_dir locked
    device, ckpt_path = dist.device, os.path.join(cfg.out_dir, "ckpt.pt")
    tokenizer = Tokenizer(cfg.vocab_file or os.path.join(cfg.data_root, "vocab.txt"))
    objects = cfg.objects == "on" and not cfg.finetune  # fine-tuning and testing drop the object streams

    # --- model, optimiser (--resume: the interrupted run's weights, optimiser state, step, random states, data order)
    model, ddp_model = build_model(cfg, tokenizer, dist)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-6,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for all tensors
    ckpt = resume_state(ckpt_path, model, optimizer, "oa_trans", logger) if cfg.resume else {}
    step = start_step = ckpt.get("step", 0)

    # --- evaluation data (MSR-VTT-style): val is watched during training, the final weights are tested once
    val_clips = EvalClips(MSRVTT(cfg.data_root, "val"), cfg)
    test_clips = EvalClips(MSRVTT(cfg.data_root, "test"), cfg)
    if cfg.eval:
        return evaluate_only(model, test_clips, tokenizer, cfg, dist)

    # --- training data and the loss
    dataset, bad = training_set(cfg, tokenizer, objects, dist, logger)
    bad.load(ckpt.get("bad_videos"))
    terms, weights = loss_setup(cfg, objects, dataset, dist)

    # --- the loop: validate and checkpoint every eval_every steps; the batches restart when the frame count changes
    order = ckpt.get("data_order", ckpt.get("stream", {}))  # frames, seed, batches drawn ("stream": older checkpoints)
    if ckpt.get("rng"):  # random draws continue as in the interrupted run (exact with num_workers=0)
        set_rng_states(ckpt["rng"])
    batches, clock = None, StepClock()
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not dist.is_main, dynamic_ncols=True)
    while True:
        last_step = step == cfg.max_steps
        if step > start_step and (step % cfg.eval_every == 0 or last_step):
            validate(model, val_clips, tokenizer, cfg, device, logger, step)
            if dist.is_main:
                save_state(ckpt_path, model, optimizer, step, cfg, "oa_trans", bad, data_order=dict(order))
        if last_step:
            break
        frames = frames_at(step, cfg)  # Frozen's curriculum: 1 frame, then num_frames
        if batches is None or frames != order["frames"]:  # at the start, and when the curriculum switches
            batches, order = start_batches(dataset, frames, order, step, cfg, tokenizer, dist)
        with clock.waiting():
            batch, n = bad.next_batch(batches, len(dataset) // cfg.batch_size + 2)  # unreadable-only batches skipped
            order["drawn"] += n
            batch = to_device(batch, device)
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # --- the step: every stream forward, the object-aware loss, backward, update
        with autocast(device, cfg.precision):
            emb = ddp_model(**{k: v for k, v in batch.items() if k in ("video", "text") or objects})
        emb = {k: all_gather_with_grad(v.float()) for k, v in emb.items()}  # negatives from every rank
        loss, parts = oa_trans_loss(emb, terms, weights, cfg.temperature)
        check_finite(step, loss=loss, **parts)  # NaN / inf stops the run here, before backward() reaches the weights
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # with grad_clip=0 the norm is only measured (max_norm inf)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        step += 1

        # --- diagnostics: speed, data wait, the losses in the log
        clock.tick(batch["video"].shape[0] * dist.world_size)
        pbar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            numbers = {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}, "lr": lr,
                       "grad_norm": grad_norm.item(), "frames": frames}
            log_step(logger, step, numbers, clock, bad, cfg.num_workers, write=pbar.write)
    pbar.close()

    # --- the test: the final weights, object streams dropped
    data = data_report(bad, clock, "train")  # (the loop's data wait: before the test)
    metrics = evaluate_retrieval(model, test_clips, tokenizer, cfg, device)
    metrics.update({**data, "retrieval/unreadable_videos": test_clips.unreadable})
    logger.log({"step": step, **{f"test_{k}": v for k, v in metrics.items()}})
    return end_run(cfg, dist, metrics, f"test retrieval ({'fine-tuned' if cfg.finetune else 'zero-shot'}, "
                                       f"object streams dropped)")


# -----------------------------------------------------------------------------
# appendix: pictures of what the model learned, `--eval=retrieval --init=<ckpt> --pictures` (common/pictures.py)

@torch.no_grad()
def anchor_example(model, cfg, tokenizer, device, i=0):
    """Val clip i as pre-training sees it (without augmentation): its anchor frame, top-K boxes and tags, the
    object-guided patch mask, the masked anchor the region stream encodes, and the cosines of the three loss terms."""
    ds = WebVidObjects(cfg.data_root, "val", cfg, tokenizer, objects=True, train=False)
    row = ds.rows[i]
    path = ds.video_path(row)
    n = ds.num_frames_of(path)
    frames, boxes, labels = ds.frames_and_objects(row, path, sample_frame_indices(n, cfg.num_frames, "uniform"), n)
    video, boxes = ds.transform(frames, boxes)                            # (T + 1, 3, S, S), boxes in S px
    keep = boxes_to_patch_mask(boxes, cfg.img_size, cfg.patch_size).any(0)  # (N,): patches under some box
    masked = model.mask_anchor(video[None, -1].to(device), keep[None].to(device))[0].cpu()
    names = list(dict.fromkeys(ds.object_names[j] for j in labels))
    tag_ids, groups = tag_tokens(tokenizer, names, cfg.max_tag_len)
    tags = torch.tensor([tag_ids], device=device)
    tag_groups = torch.zeros(1, 1, len(tag_ids), dtype=torch.bool, device=device)
    tag_groups[0, 0, [q for grp in groups for q in grp]] = True           # the paper pools the union of the tags
    enc = tokenizer([row["name"]], cfg.max_text_len, pad_to_max=False)
    model.eval()
    with autocast(device, cfg.precision):
        emb = model(video[None, :-1].to(device), (enc["input_ids"].to(device), enc["attention_mask"].to(device)),
                    anchor=video[None, -1].to(device), regions=keep[None, None].to(device),
                    tags=(tags, torch.ones_like(tags)), tag_groups=tag_groups)
    cos = {f"{q}-{k}": cosine_sim(emb[q], emb[k]).item() for q, k in (("text", "video"), ("tags", "video"),
                                                                       ("text", "regions"))}
    return dict(caption=row["name"], anchor=video[-1], boxes=boxes, names=[ds.object_names[j] for j in labels],
                keep=keep, masked=masked, cos=cos, grid=cfg.img_size // cfg.patch_size)


@torch.no_grad()
def draw_pictures(model, cfg, tokenizer, device, clips):
    """A retrieval gallery (two queries naming a big object, two a small one), the anchor frame with its boxes and
    object-guided mask, and the training curves -> out_dir/pictures."""
    out = os.path.join(cfg.out_dir, "pictures")
    ann = clips.ann
    model.eval()
    vids = encode_videos(model, clips, cfg, device)                        # (videos, E); unreadable: zeros
    first = first_captions(ann).values()
    picks = [c for c in first if not ann.small[c]][:2] + [c for c in first if ann.small[c]][:2]
    text = encode_captions(model, [ann.captions[c] for c in picks], tokenizer, cfg, device)
    sim = cosine_sim(text, vids).cpu()                                    # (queries, videos)
    queries = P.ranked_queries(sim, [ann.captions[c] + ("  [small object]" if ann.small[c] else "") for c in picks],
                               [ann.caption_video[c] for c in picks], lambda j: clips.clip(j)[0])
    written = [P.save(P.retrieval_gallery(queries, f"OA-Trans (objects={cfg.objects}): zero-shot text -> video "
                                                   f"retrieval on test, top 5 (green: the caption's own video)"),
                      os.path.join(out, "retrieval_gallery.png"))]

    ex = anchor_example(model, cfg, tokenizer, device)
    s = 4  # enlarge the 64 px frame
    big = lambda img: img.resize((img.width * s, img.height * s), P.Image.NEAREST)
    panels = [P.stack([P.text_image(f"anchor frame, top-{len(ex['boxes'])} boxes", size=11),
                       P.draw_boxes(big(P.to_pil(ex["anchor"])), ex["boxes"] * s, ex["names"])], gap=1),
              P.stack([P.text_image(f"patches under a box ({int(ex['keep'].sum())} of {ex['keep'].numel()})", size=11),
                       P.patch_overlay(big(P.to_pil(ex["anchor"])), ex["keep"].tolist(), ex["grid"])], gap=1),
              P.stack([P.text_image(f"what the region stream encodes (region_mask={cfg.region_mask})", size=11),
                       big(P.to_pil(ex["masked"]))], gap=1)]
    cos = ", ".join(f"cos({k.replace('-', ', ')}) {v:.2f}" for k, v in ex["cos"].items())
    img = P.stack([P.text_image(f'OA-Trans object streams on a val clip: "{ex["caption"]}"', size=13),
                   P.text_image(f"tags: {' '.join(dict.fromkeys(ex['names']))}\nthe loss terms' cosines on this "
                                f"pair: {cos}", size=11),
                   P.stack(panels, vertical=False, gap=10)], gap=4)
    written.append(P.save(img, os.path.join(out, "anchor_objects.png")))
    log = P.run_log(cfg.init, cfg.out_dir)
    written.append(P.save(P.training_curves(log, ["loss", "text-video", "tags-video", "text-regions"],
                                            ["val_retrieval/t2v_R@1", "val_retrieval_small/t2v_R@1"],
                                            f"OA-Trans training curves ({log})"),
                          os.path.join(out, "training_curves.png")))
    model.train()
    print0("pictures: " + ", ".join(written))
    return written


# -----------------------------------------------------------------------------
# appendix: pretrained weights, key maps for common/weights.py (safe reading, every tensor accounted for, shapes
# adapted: temporal_embed cut or zero-padded to num_frames, pos_embed resampled for another img_size, text positions
# cut)
#   FULL_MODEL: our checkpoints, or a Frozen / OA-Trans-layout release ("state_dict", "module." stripped); the
#       release's video head is Sequential(Linear) (vid_proj.0), ours a plain Linear
#   VIT_INIT: a timm ViT / DeiT state dict -> video_model.* (same names; the ImageNet head dropped); the temporal
#       branch (timeattn, norm3, temporal_embed) is new, and with its zero qkv the encoder starts as the image ViT
#   DISTILBERT_INIT: HF DistilBertModel names (or DistilBertForMaskedLM's under "distilbert.", MLM head dropped)
PAPER_INIT = ("the paper starts from ImageNet-21k ViT-B/16 (--init_video=jx_vit_base_p16_224-80ecf9dd.pth) and "
              "distilbert-base-uncased (--init_text, with --vocab_file=its vocab.txt)")
FULL_MODEL = dict(rules=[(r"^vid_proj\.0\.", "vid_proj.")], drop=[r"position_ids$"], new=[])
VIT_INIT = dict(rules=[(r"^", "video_model.")], drop=[r"^head\.", r"^head_dist\.", r"^pre_logits\.", r"^dist_token$"],
                new=[r"^(?!video_model\.)", r"\.timeattn\.", r"\.norm3\.", r"\.temporal_embed$"])
DISTILBERT_INIT = dict(rules=[(r"^distilbert\.", ""), (r"^", "text_model.")],
                       drop=[r"^vocab_(transform|layer_norm|projector)\.", r"position_ids$"],
                       new=[r"^(?!text_model\.)"])


if __name__ == "__main__":
    main()
