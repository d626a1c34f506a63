"""DynamicLossScaler: Megatron's hysteresis rule, GradScaler's decisions at hysteresis 1, state round trip."""
import pytest
import torch

from hpclm.amp import DynamicLossScaler, LossScaleError


def _param_with_grad(value):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), value)
    return p


def _drive(scaler, overflows):
    """Feed a sequence of overflow flags (True = non-finite gradients); the scale after each step."""
    scales = []
    for overflow in overflows:
        scaler.update(not overflow)
        scales.append(scaler.scale)
    return scales


def test_matches_grad_scaler_with_hysteresis_one():
    torch.manual_seed(0)
    pattern = [bool(b) for b in (torch.rand(200) < 0.15).tolist()] + [False] * 12 + [True, True, False]
    ours = DynamicLossScaler(init_scale=2.0**10, growth_interval=5, hysteresis=1, min_scale=2.0**-30)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.0)
    ref_scales = []
    for overflow in pattern:
        opt.zero_grad()
        ref.scale((w * (float("inf") if overflow else 1.0)).sum()).backward()
        ref.step(opt)
        ref.update()
        ref_scales.append(ref.get_scale())
    assert _drive(ours, pattern) == ref_scales
    assert ours.skipped_steps == sum(pattern)


def test_hysteresis_delays_backoff_until_growth_resets_it():
    s = DynamicLossScaler(init_scale=1024, growth_interval=3, hysteresis=2)
    assert _drive(s, [True]) == [1024]            # first overflow: tolerated
    assert _drive(s, [True, True]) == [512, 256]  # hysteresis used up: every overflow halves
    assert _drive(s, [False, False, False]) == [256, 256, 512]  # growth restores the hysteresis budget
    assert _drive(s, [True, True]) == [512, 256]


def test_never_below_min_scale_and_stops_when_stuck():
    s = DynamicLossScaler(init_scale=4, hysteresis=1, min_scale=1, max_consecutive_skips=3)
    assert _drive(s, [True, True, True]) == [2, 1, 1]
    s.update(False)
    with pytest.raises(LossScaleError, match="3 consecutive steps at the minimum loss scale 1"):
        s.update(False)


def test_unscale_and_check_divides_and_detects_non_finite():
    s = DynamicLossScaler(init_scale=8)
    good = [_param_with_grad(16.0), _param_with_grad(-8.0)]
    assert s.unscale_and_check(good) is True
    assert good[0].grad.tolist() == [2.0] * 3 and good[1].grad.tolist() == [-1.0] * 3
    for bad in (float("inf"), float("nan")):
        assert s.unscale_and_check([_param_with_grad(1.0), _param_with_grad(bad)]) is False


def test_state_round_trip_continues_identically():
    a = DynamicLossScaler(init_scale=64, growth_interval=2, hysteresis=2)
    pattern = [True, False, True, True, False, False, False]
    _drive(a, pattern[:4])
    b = DynamicLossScaler()
    b.load_state_dict(a.state_dict())
    b.growth_interval, b.hysteresis = a.growth_interval, a.hysteresis
    assert _drive(b, pattern[4:]) == _drive(a, pattern[4:])
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize("kwargs", [{"init_scale": 0}, {"growth_interval": 0}, {"backoff_factor": 1.5}])
def test_bad_settings_are_value_errors(kwargs):
    with pytest.raises(ValueError, match="loss scaler needs"):
        DynamicLossScaler(**kwargs)


def test_cpu_half_precision_support_is_read_from_the_cpu_flags(tmp_path):
    from hpclm.train.amp import cpu_computes
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_computes("bf16", str(info)) and not cpu_computes("fp16", str(info))
    info.write_text("processor : 0\nflags : fpu sse2 avx2 amx_bf16 amx_fp16\n")
    assert cpu_computes("bf16", str(info)) and cpu_computes("fp16", str(info))
    info.write_text("processor : 0\nflags : fpu sse2 avx2\n")
    assert not cpu_computes("bf16", str(info)) and not cpu_computes("fp16", str(info))
    info.write_text("no flags line here\n")
    assert cpu_computes("bf16", str(info))  # unknown: no warning
