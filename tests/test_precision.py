"""precision="auto" and device="auto" (common/train.py): the choice rules, without timing thresholds."""
import pytest
import torch

import common.train as train


def test_auto_picks_fp32_when_the_probe_finds_bf16_slow():
    # a CPU without native bf16: PyTorch's fallback runs bf16 matmuls ~150x slower than fp32
    chosen, why = train.choose_precision("auto", torch.device("cpu"), rates={"fp32": 49.0, "bf16": 0.3})
    assert chosen == "fp32" and "auto -> fp32" in why and "49" in why


def test_auto_picks_bf16_when_the_probe_finds_it_faster():
    chosen, _ = train.choose_precision("auto", torch.device("cpu"), rates={"fp32": 100.0, "bf16": 190.0})
    assert chosen == "bf16"


def test_auto_needs_a_real_speedup_for_bf16():
    # barely faster is not worth bf16's rounding: below min_speedup stays fp32
    chosen, _ = train.choose_precision("auto", torch.device("cpu"), rates={"fp32": 100.0, "bf16": 110.0})
    assert chosen == "fp32"


def test_explicit_bf16_on_a_slow_device_is_kept_with_a_warning():
    chosen, why = train.choose_precision("bf16", torch.device("cpu"), rates={"fp32": 50.0, "bf16": 0.5})
    assert chosen == "bf16" and why.startswith("warning") and "100x SLOWER" in why


def test_fp32_is_never_probed(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("fp32 must not run the probe")
    monkeypatch.setattr(train, "matmul_rates", boom)
    assert train.choose_precision("fp32", torch.device("cpu"))[0] == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(SystemExit, match="auto, bf16 or fp32"):
        train.choose_precision("fp16", torch.device("cpu"), rates={"fp32": 1.0, "bf16": 1.0})


def test_auto_runs_the_probe_and_it_measures_both_dtypes(monkeypatch):
    calls = []
    monkeypatch.setattr(train, "matmul_rates", lambda device: calls.append(device) or {"fp32": 10.0, "bf16": 1.0})
    assert train.choose_precision("auto", torch.device("cpu"))[0] == "fp32" and len(calls) == 1
    monkeypatch.undo()
    threads = torch.get_num_threads()
    rates = train.matmul_rates(torch.device("cpu"), n=64, budget_seconds=0.001, max_rounds=2)
    assert set(rates) == {"fp32", "bf16"} and all(r > 0 for r in rates.values())
    assert torch.get_num_threads() == threads  # the one-thread probe restores the thread count


@pytest.mark.parametrize("has_cuda,has_mps,expected", [(True, True, "cuda"), (True, False, "cuda"),
                                                         (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_order_is_cuda_then_mps_then_cpu(has_cuda, has_mps, expected, monkeypatch):
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    assert train.resolve_device("auto", has_cuda=has_cuda, has_mps=has_mps).type == expected


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_an_absent_device_is_an_error(name):
    with pytest.raises(SystemExit, match=name):
        train.resolve_device(name, has_cuda=False, has_mps=False)


def test_an_unknown_device_is_an_error():
    with pytest.raises(SystemExit, match="auto, cpu, cuda or mps"):
        train.resolve_device("tpu", has_cuda=False, has_mps=False)


def test_mps_without_the_cpu_fallback_says_how_to_enable_it(monkeypatch, capsys):
    monkeypatch.delenv("PYTORCH_ENABLE_MPS_FALLBACK", raising=False)
    assert train.resolve_device("mps", has_cuda=False, has_mps=True).type == "mps"
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in capsys.readouterr().out


# --- compile="auto" | "on" | "off" (common/train.py compile_blocks)

def _blocks(n=2):
    import all_in_one
    return [all_in_one.Block(32, 2, 4.0, 0.0, 0.0) for _ in range(n)]


def _compiled(block):
    return getattr(block, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("mode, steps, device, cxx, compiled", [
    ("auto", 1000, "cpu", "/usr/bin/g++", True),
    ("auto", 20, "cpu", "/usr/bin/g++", False),    # a short run (the tests, a smoke run) would mostly compile
    ("auto", 0, "cpu", "/usr/bin/g++", False),     # --eval: no training steps
    ("on", 20, "cpu", "/usr/bin/g++", True),
    ("off", 1000, "cpu", "/usr/bin/g++", False),
    ("auto", 1000, "cpu", "", False),              # no C++ compiler: inductor cannot build CPU kernels
    ("on", 1000, "mps", "", False),
])
def test_compile_blocks_decides_without_compiling_anything_yet(mode, steps, device, cxx, compiled):
    blocks = _blocks()
    note = train.compile_blocks(blocks, mode, torch.device(device), steps, cxx=cxx)
    assert all(_compiled(b) == compiled for b in blocks) and note.startswith("compile:")
    assert ("off" in note) != compiled


def test_a_compiled_block_computes_what_the_eager_block_computes():
    """The same weights, eager and compiled: the same output and the same gradients (fp32, to rounding)."""
    torch.manual_seed(0)
    eager, compiled = _blocks(1)[0], _blocks(1)[0]
    compiled.load_state_dict(eager.state_dict())
    train.compile_blocks([compiled], "on", torch.device("cpu"), 0)
    for length in (5, 9):  # a second length reuses the dynamic-shape kernels
        x = torch.randn(3, length, 32)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), compiled(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.allclose(ya, yb, atol=1e-5) and torch.allclose(xa.grad, xb.grad, atol=1e-4)
    for pa, pb in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-4)
