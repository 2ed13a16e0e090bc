"""The fused CPU update: its work sharing (hand-computed), its build failures, and its check against torch."""

import logging
import threading

import pytest
import torch

from modules import optimization, optimization_cpu
from modules.optimization_cpu import deal, run_parallel, split


def test_split_cuts_the_elements_laid_end_to_end_into_equal_runs():
    # 16 elements: [0, 5) tensor 0, [5, 8) tensor 1, [8, 16) tensor 2.
    assert split([5, 3, 8], 2) == [[(0, 0, 5), (1, 0, 3)], [(2, 0, 8)]]
    # Bounds 0, 5, 10, 16: the third tensor is cut after its second element.
    assert split([5, 3, 8], 3) == [[(0, 0, 5)], [(1, 0, 3), (2, 0, 2)], [(2, 2, 6)]]
    assert split([4], 1) == [[(0, 0, 4)]]
    assert split([1], 2) == [[], [(0, 0, 1)]]


def test_deal_gives_the_largest_tensor_first_to_the_lighter_hand():
    # 10 -> hand 0; 6 -> hand 1; 4 -> hand 1 (6 < 10); 1 -> hand 0 (10 = 10: the first).
    assert deal([1, 10, 4, 6], 2) == [[1, 0], [3, 2]]
    assert deal([3, 3, 3], 3) == [[0], [1], [2]]


def test_run_parallel_runs_every_part_once_and_raises_a_worker_error():
    seen, lock = [], threading.Lock()

    def record(part):
        with lock:
            seen.extend(part)

    run_parallel(record, [[1, 2], [], [3], [4, 5]])
    assert sorted(seen) == [1, 2, 3, 4, 5]

    def fail_on_three(part):
        if 3 in part:
            raise ValueError("part three")

    with pytest.raises(ValueError, match="part three"):
        run_parallel(fail_on_three, [[1], [2], [3]])


def test_a_compiler_that_cannot_run_or_compile_is_a_reason_not_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernels, reason = optimization_cpu.candidates()
    assert kernels == [] and "did not run" in reason
    monkeypatch.setenv("CC", "false")  # runs, compiles nothing
    kernels, reason = optimization_cpu.candidates()
    assert kernels == [] and "could not compile bert_adam_cpu.c" in reason


def test_without_a_kernel_the_torch_update_runs_and_the_log_says_why(monkeypatch, caplog):
    monkeypatch.setattr(optimization_cpu, "candidates", lambda: ([], "no C compiler found (set CC or install gcc)"))
    with caplog.at_level(logging.INFO, logger="modules.optimization"):
        assert optimization._cpu_kernel.__wrapped__() is None
    assert "fused CPU update off (no C compiler found (set CC or install gcc))" in caplog.text
    assert "same results, slower" in caplog.text


class _TorchUpdate:
    """A stand-in kernel doing the torch update; ``flip`` changes the last bit of one parameter afterwards."""

    def __init__(self, flip: bool):
        self.flip = flip

    def update(self, tensors, coefs, group, lr):
        optimization._torch_update(group, lr, list(tensors), [torch.tensor(c) for c in coefs])
        if self.flip:
            p = tensors[-1][0].view(-1).view(torch.int32)
            p[-1] ^= 1


def test_the_check_accepts_the_torch_update_and_refuses_one_bit_off():
    assert optimization._reproduces_torch_update(_TorchUpdate(flip=False))
    assert not optimization._reproduces_torch_update(_TorchUpdate(flip=True))


def _kernels_or_skip():
    kernels, reason = optimization_cpu.candidates()
    if not kernels:
        pytest.skip(f"the CPU kernel does not build here: {reason}")
    return kernels


def test_one_square_root_reproduces_torch_here():
    """torch's sqrt kernel is MKL's where torch ships MKL, else the hardware's: one candidate must match it."""
    kernels = _kernels_or_skip()
    matching = [k.sqrt_name for k in kernels if optimization._reproduces_torch_update(k)]
    assert len(matching) >= 1
    assert optimization._cpu_kernel() is not None


@pytest.mark.parametrize("threads", [1, 3])
def test_kernel_equals_the_torch_update_across_thread_cuts(threads, monkeypatch):
    """Tensors of odd sizes cut among three threads mid-tensor, clipped and not: every bit as the torch update."""
    kernel = optimization._cpu_kernel()
    if kernel is None:
        pytest.skip("the fused CPU update is off on this machine: see the log")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(7)
    sizes, coefs = (70_001, 3, 90_017), [0.5, 1.0, 0.93]
    drawn = [
        [torch.randn(n, generator=gen) * 10 ** torch.randint(-6, 1, (n,), generator=gen) for _ in "pgmv"] for n in sizes
    ]
    for four in drawn:
        four[3].abs_()
    ours = [tuple(t.clone() for t in four) for four in drawn]
    torchs = [tuple(t.clone() for t in four) for four in drawn]
    group = dict(b1=0.9, b2=0.98, e=1e-6, weight_decay=0.2)
    for lr in (1e-3, 2e-4, 5e-5):
        kernel.update(ours, coefs, group, lr)
        optimization._torch_update(group, lr, torchs, [torch.tensor(c) for c in coefs])
    for a, b in zip(ours, torchs):
        for x, y in zip(a, b):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32))
    assert not torch.equal(ours[0][0], drawn[0][0])  # it moved


def test_kernel_refuses_a_non_contiguous_tensor():
    kernel = optimization._cpu_kernel()
    if kernel is None:
        pytest.skip("the fused CPU update is off on this machine: see the log")
    p = torch.zeros(4, 4).t()
    with pytest.raises(RuntimeError, match="contiguous fp32 CPU"):
        kernel.update([(p, torch.zeros(4, 4), torch.zeros(4, 4), torch.zeros(4, 4))], [1.0], {}, 0.1)
