"""BertAdam and its schedules against hand-computed values and a plain re-statement of the original's update rule."""

import io
import math

import pytest
import torch

from modules import optimization
from modules.optimization import BertAdam, warmup_constant, warmup_cosine, warmup_linear


@pytest.mark.parametrize(
    "x, cosine, constant, linear",
    [
        (0.0, 0.0, 0.0, 0.0),
        (0.05, 0.5, 0.5, 0.5),
        (0.1, 0.5 * (1 + math.cos(0.1 * math.pi)), 1.0, 1.0),  # cosine not re-based: 0.97553
        (0.5, 0.5, 1.0, 0.5 / 0.9),
        (1.0, 0.0, 1.0, 0.0),
    ],
)
def test_schedules_at_warmup_0_1(x, cosine, constant, linear):
    assert warmup_cosine(x, 0.1) == pytest.approx(cosine, abs=1e-12)
    assert warmup_constant(x, 0.1) == pytest.approx(constant, abs=1e-12)
    assert warmup_linear(x, 0.1) == pytest.approx(linear, abs=1e-12)
    if x == 0.1:
        assert warmup_cosine(x, 0.1) == pytest.approx(0.9755282581, abs=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-1.0),
        dict(lr=1.0, schedule="cosine"),
        dict(lr=1.0, warmup=1.0),
        dict(lr=1.0, warmup=-0.5),
        dict(lr=1.0, b1=1.0),
        dict(lr=1.0, b2=-0.1),
        dict(lr=1.0, e=-1e-6),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        BertAdam([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def reference_steps(p0, grads, lr, warmup, t_total, schedule, b1, b2, e, wd, max_norm):
    """The original's update rule written out with plain tensors, one step at a time."""
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for step, g in enumerate(grads):
        g = g.clone()
        norm = g.norm()
        if max_norm > 0 and norm > max_norm:
            g = g * (max_norm / (norm + 1e-6))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = m / (v.sqrt() + e)
        if wd > 0:
            u = u + wd * p
        lr_t = lr * schedule(step / t_total, warmup) if t_total != -1 else lr
        p = p - lr_t * u
    return p


def run_bertadam(p0, grads, **kwargs):
    p = torch.nn.Parameter(p0.clone())
    opt = BertAdam([p], **kwargs)
    lrs = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        lrs.append(opt.get_lr())
    return p.detach(), opt, lrs


def test_first_step_is_zero_and_state_layout():
    p0 = torch.randn(5, generator=torch.Generator().manual_seed(0))
    g = torch.full((5,), 0.1)
    p, opt, _ = run_bertadam(p0, [g], lr=1e-2, warmup=0.1, t_total=10, schedule="warmup_cosine", weight_decay=0.2)
    assert torch.equal(p, p0)  # lr_t = lr * sched(0 / t_total) = 0
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["step"] == 1
    assert torch.allclose(state["next_m"], 0.1 * g)
    assert torch.allclose(state["next_v"], 0.001 * g * g)


def test_get_lr_before_and_after_state():
    p = torch.nn.Parameter(torch.ones(3))
    opt = BertAdam([p], lr=1.0, warmup=0.1, t_total=10, schedule="warmup_linear")
    p.grad = torch.ones(3)
    assert opt.get_lr() == [0]
    opt.step()
    assert opt.get_lr() == [pytest.approx(1.0)]  # step 1 of 10 = x 0.1 = end of warm-up
    opt.step()
    assert opt.get_lr() == [pytest.approx((0.2 - 1) / (0.1 - 1))]


def test_per_tensor_clip_applies_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = BertAdam([p], lr=1.0, max_grad_norm=1.0)
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8]), atol=1e-6)
    state = opt.state[p]
    assert torch.allclose(state["next_m"], 0.1 * torch.tensor([0.6, 0.8]), atol=1e-7)
    # max_grad_norm <= 0 disables the per-tensor clip.
    q = torch.nn.Parameter(torch.zeros(2))
    opt = BertAdam([q], lr=1.0, max_grad_norm=0)
    q.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert torch.equal(q.grad, torch.tensor([3.0, 4.0]))


@pytest.mark.parametrize(
    "schedule_name, schedule, t_total",
    [
        ("warmup_cosine", warmup_cosine, 6),
        ("warmup_constant", warmup_constant, 6),
        ("warmup_linear", warmup_linear, 6),
        ("warmup_linear", warmup_linear, -1),
    ],
)
def test_several_steps_match_reference(schedule_name, schedule, t_total):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) * s for s in (0.3, 2.0, 0.05, 1.5, 0.7)]
    kwargs = dict(lr=0.05, warmup=0.2, t_total=t_total, b1=0.9, b2=0.98, e=1e-6, weight_decay=0.2, max_grad_norm=1.0)
    ours, _, _ = run_bertadam(p0, grads, schedule=schedule_name, **kwargs)
    expected = reference_steps(
        p0,
        grads,
        schedule=schedule,
        wd=0.2,
        max_norm=1.0,
        **{k: v for k, v in kwargs.items() if k not in ("weight_decay", "max_grad_norm")},
    )
    assert not torch.equal(ours, p0)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12)


def test_fp16_parameters_keep_fp16_state():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = BertAdam([p], lr=0.1, weight_decay=0.2)
    for _ in range(2):
        p.grad = torch.full((4,), 0.5, dtype=torch.float16)
        opt.step()
    state = opt.state[p]
    assert state["next_m"].dtype == torch.float16 and state["next_v"].dtype == torch.float16
    assert p.dtype == torch.float16


def test_param_without_grad_is_skipped_and_groups_keep_their_lr():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = BertAdam([{"params": [a], "lr": 1e-3}, {"params": [b]}], lr=1e-1, weight_decay=0.0)
    a.grad = torch.ones(2)
    opt.step()
    opt.step()
    assert b not in opt.state or len(opt.state[b]) == 0
    assert torch.equal(b.detach(), torch.ones(2))
    assert opt.get_lr() == [1e-3]
    # Constant schedule (t_total -1), so both steps move: u_k = m_k / (sqrt(v_k) + e) for two unit gradients.
    u1 = 0.1 / (math.sqrt(0.001) + 1e-6)
    u2 = 0.19 / (math.sqrt(0.001999) + 1e-6)
    assert torch.allclose(a.detach(), torch.full((2,), 1 - 1e-3 * (u1 + u2)), atol=1e-7)


class PerTensorBertAdam(BertAdam):
    """The original's step: one Python iteration and one clip_grad_norm_ per tensor (the reference for foreach)."""

    @torch.no_grad()
    def step(self, closure=None):
        from torch.nn.utils import clip_grad_norm_

        from modules.optimization import _scheduled_lr

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p)
                    state["next_v"] = torch.zeros_like(p)
                next_m, next_v = state["next_m"], state["next_v"]
                if group["max_grad_norm"] > 0:
                    clip_grad_norm_(p, group["max_grad_norm"])
                grad = p.grad
                next_m.mul_(group["b1"]).add_(grad, alpha=1 - group["b1"])
                next_v.mul_(group["b2"]).addcmul_(grad, grad, value=1 - group["b2"])
                update = next_m / (next_v.sqrt() + group["e"])
                if group["weight_decay"] > 0.0:
                    update += group["weight_decay"] * p
                p.add_(-(_scheduled_lr(group, state["step"]) * update))
                state["step"] += 1


def _model_like_params(seed: int):
    """fp16 'CLIP' tensors and fp32 head tensors of several shapes, in the driver's four-group layout; the last shape
    is not a multiple of any vector width (the slice tests cut it at odd places)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(8, 6), (6,), (3, 4, 5), (1,), (7,), (257, 263)]
    clip = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).half()) for s in shapes]
    head = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    return [
        {"params": clip[:3] + head[:1] + head[5:], "weight_decay": 0.2, "lr": 1e-3},
        {"params": head[1:3], "weight_decay": 0.2},
        {"params": clip[3:], "weight_decay": 0.0, "lr": 1e-3},
        {"params": head[3:5], "weight_decay": 0.0},
    ]


def _train(opt, params, steps: int, seed: int) -> int:
    """``steps`` steps of large random gradients (the per-tensor clip active); returns how many tensors it clipped."""
    gen = torch.Generator().manual_seed(seed)
    clipped = 0
    for step in range(steps):
        for i, p in enumerate(params):
            # One tensor skips odd steps, so the step counts of the tensors differ and the update is bucketed by step.
            scale = 3.0 if step % 3 else 0.01
            g = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
            p.grad = None if (i == 1 and step % 2) else g
            clipped += int(p.grad is not None and float(p.grad.float().norm()) > 1.0)
        opt.step()
    return clipped


def _make(cls, schedule: str, t_total: float, max_grad_norm: float):
    groups = _model_like_params(seed=3)
    hyper = dict(lr=0.05, warmup=0.1, schedule=schedule, b1=0.9, b2=0.98, e=1e-6, t_total=t_total, weight_decay=0.2)
    return cls(groups, max_grad_norm=max_grad_norm, **hyper), [p for g in groups for p in g["params"]]


def _assert_same(params_a, opt_a, params_b, opt_b) -> None:
    assert any(p.dtype == torch.float16 for p in params_a) and any(p.dtype == torch.float32 for p in params_a)
    for a, b in zip(params_a, params_b):
        assert a.dtype == b.dtype and torch.equal(a.detach(), b.detach())
    assert len(opt_a.state) == len(opt_b.state)
    for pa, pb in zip(opt_a.state.values(), opt_b.state.values()):
        assert pa["step"] == pb["step"]
        assert torch.equal(pa["next_m"], pb["next_m"]) and torch.equal(pa["next_v"], pb["next_v"])
    assert opt_a.get_lr() == opt_b.get_lr()


def _kernel_or_skip():
    kernel = optimization._cpu_kernel()
    if kernel is None:
        pytest.skip(
            "the fused CPU update is off on this machine (no C compiler, or torch rounds otherwise): see the log"
        )
    return kernel


class TorchUpdateBertAdam(BertAdam):
    use_cpu_kernel = False


@pytest.mark.parametrize("update", ["kernel", "torch", "torch odd slices"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
@pytest.mark.parametrize(
    "schedule, t_total", [("warmup_cosine", 20), ("warmup_constant", 20), ("warmup_linear", 20), ("warmup_linear", -1)]
)
def test_step_equals_per_tensor_step_bit_for_bit(schedule, t_total, max_grad_norm, update, monkeypatch):
    if update == "kernel":  # fp32 tensors through the C kernel (two threads: the fp32 bucket has > 2^16 elements)
        _kernel_or_skip()
    if update == "torch odd slices":  # slices that end anywhere, not at vector boundaries: any split must round alike
        monkeypatch.setattr(optimization, "_chunk_elements", lambda device: 4099)
    ours, params_a = _make(BertAdam if update == "kernel" else TorchUpdateBertAdam, schedule, t_total, max_grad_norm)
    ref, params_b = _make(PerTensorBertAdam, schedule, t_total, max_grad_norm)
    clipped = _train(ours, params_a, 12, seed=4)
    assert _train(ref, params_b, 12, seed=4) == clipped
    assert clipped > 20
    if max_grad_norm == 0:  # no per-tensor clip: the gradients are left as they were drawn
        assert any(float(p.grad.float().norm()) > 1.0 for p in params_a)
    _assert_same(params_a, ours, params_b, ref)


@pytest.mark.parametrize("cls", [BertAdam, TorchUpdateBertAdam])
def test_resume_from_a_state_file_of_the_per_tensor_step(cls):
    """An optimizer state file written by the original's step loads unchanged and continues bit for bit."""
    ref, params_ref = _make(PerTensorBertAdam, "warmup_cosine", 20, 1.0)
    _train(ref, params_ref, 5, seed=5)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params_ref], "optimizer": ref.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    ours, params_ours = _make(cls, "warmup_cosine", 20, 1.0)
    with torch.no_grad():
        for p, q in zip(params_ours, saved["params"]):
            p.copy_(q)
    ours.load_state_dict(saved["optimizer"])
    assert set(ours.state_dict()["state"][0]) == {"step", "next_m", "next_v"}
    _train(ours, params_ours, 5, seed=6)
    _train(ref, params_ref, 5, seed=6)
    _assert_same(params_ours, ours, params_ref, ref)
