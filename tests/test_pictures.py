"""The picture commands: each paper's `--eval=<task> --init=<ckpt> --pictures` writes valid, non-blank PNGs (tiny
models on the tiny corpus, a few steps each), and the token-move picture reads the temporal layer itself.

    python -m pytest -q tests/test_pictures.py
"""
import json

import numpy as np
import torch
from PIL import Image, ImageStat

import all_in_one as aio
import egovlp
import oa_trans as oa
from common import pictures as P

EGO_TINY = ["--img_size=32", "--patch_size=16", "--vit_width=32", "--vit_depth=2", "--vit_heads=2", "--text_width=32",
            "--text_layers=1", "--text_heads=2", "--text_ffn=64", "--embed_dim=16", "--num_workers=0",
            "--eval_batch_size=16", "--max_eval_items=5"]
OA_TINY = ["--img_size=32", "--patch_size=8", "--vit_width=32", "--vit_depth=1", "--vit_heads=2", "--text_width=32",
           "--text_layers=1", "--text_heads=2", "--num_frames=2", "--curriculum=none", "--num_workers=0",
           "--precision=fp32", "--eval_batch_size=8"]


def check_png(path, min_size=(200, 100)):
    """A PNG that PIL reads as RGB, at least min_size, with real content: many colours and a spread of grey levels."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.width >= min_size[0] and img.height >= min_size[1], img.size
        img.load()
        grey = img.convert("L")
        assert ImageStat.Stat(grey).stddev[0] > 10, "a nearly uniform picture"
        assert len(img.getcolors(maxcolors=1 << 20)) > 20, "too few colours: nothing drawn"
        return img.copy()


def has_colour(img, colour, tolerance=10, min_pixels=20):
    px = torch.from_numpy(np.asarray(img).reshape(-1, 3).astype(np.int64))
    near = (px - torch.tensor(colour)).abs().max(1).values <= tolerance
    return int(near.sum()) >= min_pixels


def logged_steps(run_dir):
    return [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def test_all_in_one_pictures(tiny_corpus, tmp_path):
    pre, ev = tmp_path / "pre", tmp_path / "ev"
    aio.main(["--tiny", f"--data_root={tiny_corpus}", f"--out_dir={pre}", "--img_size=32", "--max_steps=2",
              "--max_eval_items=8", "--precision=fp32"])
    assert logged_steps(pre)
    aio.main(["--tiny", f"--data_root={tiny_corpus}", f"--out_dir={ev}", "--eval=retrieval", f"--init={pre / 'ckpt.pt'}",
              "--max_eval_items=5", "--precision=fp32", "--pictures"])
    gallery = check_png(ev / "pictures" / "retrieval_gallery.png")
    assert has_colour(gallery, P.GREEN)  # 5 test clips: each query's own clip is in its top 5, framed green
    check_png(ev / "pictures" / "temporal_roll.png")
    curves = check_png(ev / "pictures" / "training_curves.png")
    assert has_colour(curves, P.PALETTE[0]) and has_colour(curves, P.PALETTE[1])  # the loss and a val metric line


def test_egovlp_pictures(tiny_corpus, tmp_path):
    pre, ev = tmp_path / "pre", tmp_path / "ev"
    egovlp.main([f"--data_root={tiny_corpus}", f"--out_dir={pre}", "--batch_size=4", "--max_steps=2", "--log_every=1",
                 *EGO_TINY])
    assert logged_steps(pre)
    egovlp.main([f"--data_root={tiny_corpus}", f"--out_dir={ev}", "--eval=egomcq", f"--init={pre / 'ckpt.pt'}",
                 "--pictures", *EGO_TINY])
    mcq = check_png(ev / "pictures" / "egomcq.png", min_size=(300, 300))
    assert has_colour(mcq, P.GREEN)  # the answer's frame
    check_png(ev / "pictures" / "training_curves.png")


def test_oa_trans_pictures(tiny_corpus, tmp_path):
    pre, ev = tmp_path / "pre", tmp_path / "ev"
    oa.main([f"--data_root={tiny_corpus}", f"--out_dir={pre}", "--batch_size=4", "--max_steps=2", "--log_every=1",
             "--eval_every=1", *OA_TINY])
    assert logged_steps(pre)
    oa.main([f"--data_root={tiny_corpus}", f"--out_dir={ev}", "--eval=retrieval", f"--init={pre / 'ckpt.pt'}",
             "--pictures", *OA_TINY])
    check_png(ev / "pictures" / "retrieval_gallery.png")
    check_png(ev / "pictures" / "anchor_objects.png")
    curves = check_png(ev / "pictures" / "training_curves.png")
    assert has_colour(curves, P.PALETTE[0])


def test_token_addresses_follow_the_temporal_layer():
    """The token-move picture is read from temporal_mix itself: with fixed slots, roll sends slots 1..k to the next
    frame (circularly) and the last k to the previous one; the shift zero-pads at the ends; mean moves nothing."""
    torch.manual_seed(0)
    model = aio.AllInOne(aio.Config(width=16, depth=1, heads=2, vocab_size=10, embed_dim=8, roll_fraction=0.25,
                                    roll_tokens="fixed"))
    cfg = model.cfg
    T, N = 3, 16
    before, after = aio.token_addresses(model, T, N)
    k = int(N * 0.25 / 2)
    assert before[:, :, 0].tolist() == [[t] * (1 + N) for t in range(T)]
    assert before[0, :, 1].tolist() == list(range(-1, N))
    for t in range(T):
        assert after[t, 0].tolist() == [t, -1]                                   # CLS stays
        assert after[t, 1:1 + k, 0].tolist() == [(t - 1) % T] * k                # from the previous frame
        assert after[t, N + 1 - k:, 0].tolist() == [(t + 1) % T] * k             # from the next frame
        assert after[t, 1 + k:N + 1 - k, 0].tolist() == [t] * (N - 2 * k)
    cfg.temporal = "shift"
    _, after = aio.token_addresses(model, T, N)
    f = cfg.width // 8
    assert after[T - 1, :f, 0].tolist() == [-1] * f                             # nothing after the last frame
    assert after[0, :f, 0].tolist() == [1] * f and after[0, :f, 1].tolist() == list(range(-1, f - 1))
    cfg.temporal, cfg.roll_tokens = "roll", "random"
    before, after = aio.token_addresses(model, T, N)
    assert sorted(before[0, 1:, 1].tolist()) == list(range(N)) and before[0, 1:, 1].tolist() != list(range(N))
    img = P.token_slots_picture(torch.randn(T, 3, 64, 64), before, after, 16, "roll")
    assert img.width > 300 and img.height > 200
