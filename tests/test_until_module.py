"""TF-style LayerNorm, weight init, the logging non-strict load, CrossEn, and AllGather across two gloo processes."""

from __future__ import annotations

import logging
import math
import types

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from modules.until_module import CrossEn, LayerNorm, PreTrainedModel, allgather, get_rank, get_world_size


def test_layernorm_matches_hand_formula_with_eps_inside_sqrt():
    torch.manual_seed(0)
    ln = LayerNorm(6, eps=0.5)  # a large eps makes "inside the sqrt" and "biased variance" observable
    with torch.no_grad():
        ln.weight.copy_(torch.arange(1.0, 7.0))
        ln.bias.copy_(torch.full((6,), 0.25))
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = torch.empty_like(x)
    for r in range(3):
        row = x[r].tolist()
        mean = sum(row) / 6
        var = sum((v - mean) ** 2 for v in row) / 6
        for c in range(6):
            expected[r, c] = (c + 1) * (row[c] - mean) / math.sqrt(var + 0.5) + 0.25
    assert torch.allclose(ln.double()(x), expected, atol=1e-12)
    assert LayerNorm(4).variance_epsilon == 1e-12
    assert LayerNorm(6)(x.float()).dtype == torch.float32  # computed in the input dtype, no casts


class _Toy(PreTrainedModel):
    def __init__(self):
        super().__init__(types.SimpleNamespace(initializer_range=0.02))
        self.lin = nn.Linear(300, 200)
        self.emb = nn.Embedding(400, 100)
        self.ln = LayerNorm(5)
        self.torch_ln = nn.LayerNorm(5)
        self.lstm = nn.LSTM(4, 4)
        self.raw = nn.Parameter(torch.full((3,), 7.0))


def test_init_weights_touches_linear_embedding_and_tf_layernorm_only():
    torch.manual_seed(0)
    toy = _Toy()
    with torch.no_grad():
        toy.ln.weight.fill_(3.0)
        toy.ln.bias.fill_(3.0)
        toy.torch_ln.weight.fill_(3.0)
    lstm_before = toy.lstm.weight_ih_l0.detach().clone()
    toy.apply(toy.init_weights)
    assert abs(toy.lin.weight.std().item() - 0.02) < 0.001
    assert abs(toy.emb.weight.std().item() - 0.02) < 0.001
    assert torch.count_nonzero(toy.lin.bias) == 0
    assert torch.equal(toy.ln.weight, torch.ones(5)) and torch.equal(toy.ln.bias, torch.zeros(5))
    assert torch.equal(toy.torch_ln.weight, torch.full((5,), 3.0))  # torch's LayerNorm (CLIP's) is left alone
    assert torch.equal(toy.lstm.weight_ih_l0, lstm_before)
    assert torch.equal(toy.raw, torch.full((3,), 7.0))


def test_pretrained_model_needs_initializer_range():
    with pytest.raises(ValueError, match="initializer_range"):
        PreTrainedModel(types.SimpleNamespace())


class _Small(PreTrainedModel):
    def __init__(self):
        super().__init__(types.SimpleNamespace(initializer_range=0.02))
        self.ln = LayerNorm(3)
        self.fp16 = nn.Linear(2, 2).half()
        self.other = nn.Linear(2, 3)


def test_init_preweight_renames_keeps_dtype_and_logs(caplog):
    model = _Small()
    other_before = model.other.weight.detach().clone()
    state = {
        "ln.gamma": torch.tensor([1.0, 2.0, 3.0]),
        "ln.beta": torch.tensor([4.0, 5.0, 6.0]),
        "fp16.weight": torch.tensor([[0.5, 0.25], [1.5, 2.0]], dtype=torch.float32),
        "fp16.bias": torch.tensor([1.0, -1.0], dtype=torch.float64),
        "other.weight": torch.zeros(5, 5),  # wrong shape: logged as an error, not raised
        "stray.key": torch.zeros(1),
    }
    with caplog.at_level(logging.INFO, logger="modules.until_module"):
        PreTrainedModel.init_preweight(model, state, task_config=types.SimpleNamespace(local_rank=0))
    assert torch.equal(model.ln.weight, torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(model.ln.bias, torch.tensor([4.0, 5.0, 6.0]))
    assert model.fp16.weight.dtype == torch.float16 and model.fp16.bias.dtype == torch.float16
    assert torch.equal(model.fp16.weight.float(), state["fp16.weight"])
    assert torch.equal(model.other.weight, other_before)
    text = caplog.text
    assert "not initialized from pretrained model" in text and "other.bias" in text and "other.weight" in text
    assert "not used in _Small" in text and "stray.key" in text
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "size mismatch for other.weight" in errors[0].getMessage()


def test_init_preweight_quiet_off_rank_zero_and_with_prefix(caplog):
    model = _Small()
    with caplog.at_level(logging.INFO, logger="modules.until_module"):
        PreTrainedModel.init_preweight(
            model, {"stray": torch.zeros(1)}, task_config=types.SimpleNamespace(local_rank=1)
        )
        PreTrainedModel.init_preweight(model, {"weight": torch.full((3, 2), 2.0)}, prefix="other.")
    assert caplog.text == ""
    assert torch.equal(model.other.weight, torch.full((3, 2), 2.0))


def test_crossen_matches_hand_computation():
    sim = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [1.0, 4.0, 3.0]], dtype=torch.float64)
    expected = 0.0
    for i in range(3):
        row = sim[i].tolist()
        expected += -(row[i] - math.log(sum(math.exp(v) for v in row)))
    expected /= 3
    assert CrossEn()(sim).item() == pytest.approx(expected, abs=1e-12)


def test_allgather_without_process_group_is_identity():
    assert get_rank() == 0 and get_world_size() == 1
    x = torch.randn(2, 3)
    assert allgather(x) is x


def _symmetric_loss(text: torch.Tensor, video: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    sim = scale * text @ video.T
    ce = CrossEn()
    return (ce(sim) + ce(sim.T)) / 2


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(100 + rank)  # each rank's own local batch
        text = torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_()
        video = torch.randn(2, 4, generator=gen, dtype=torch.float64).requires_grad_()
        scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)  # not gathered, like logit_scale
        loss = _symmetric_loss(allgather(text), allgather(video), scale)
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "text_grad": text.grad, "video_grad": video.grad, "scale_grad": scale.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


def test_allgather_two_gloo_processes_same_global_loss_and_local_slice_gradient(tmp_path):
    world = 2
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    # Single-process reference: the global batch is the ranks' batches concatenated in rank order.
    texts, videos = [], []
    for rank in range(world):
        gen = torch.Generator().manual_seed(100 + rank)
        texts.append(torch.randn(2, 4, generator=gen, dtype=torch.float64))
        videos.append(torch.randn(2, 4, generator=gen, dtype=torch.float64))
    text = torch.cat(texts).requires_grad_()
    video = torch.cat(videos).requires_grad_()
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    loss = _symmetric_loss(text, video, scale)
    loss.backward()

    for rank, res in enumerate(results):
        assert torch.allclose(res["loss"], loss.detach(), rtol=0, atol=1e-12)
        local = slice(2 * rank, 2 * rank + 2)
        # Exactly the local slice of the global-loss gradient, no cross-rank sum.
        assert torch.allclose(res["text_grad"], text.grad[local], rtol=0, atol=1e-12)
        assert torch.allclose(res["video_grad"], video.grad[local], rtol=0, atol=1e-12)
        assert torch.allclose(res["scale_grad"], scale.grad, rtol=0, atol=1e-12)
