"""The numba selective scan against the step-by-step reference: outputs, last state and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longllava import scan
from longllava.scan import selective_scan, selective_scan_ref


def make_inputs(batch, d_inner, d_state, length, groups=None, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    bc_shape = (batch, d_state, length) if groups is None else (batch, groups, d_state, length)
    return {
        "u": randn(batch, d_inner, length).to(dtype),
        "delta": (randn(batch, d_inner, length) * 0.5 - 1.0).to(dtype),
        "A": -torch.rand(d_inner, d_state, generator=generator) * 4,
        "B": randn(*bc_shape).to(dtype),
        "C": randn(*bc_shape).to(dtype),
        "D": randn(d_inner),
        "z": randn(batch, d_inner, length).to(dtype),
        "delta_bias": randn(d_inner) * 0.1,
        "initial_state": randn(batch, d_inner, d_state),
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().abs().max().clamp_min(1e-6)
    return float((actual.detach().float() - expected.detach().float()).abs().max() / scale)


def run_both(inputs, use, softplus=True):
    """Forward+backward of the fast scan and the reference on copies of `inputs` (keys in `use`)."""
    results = []
    for fn in (selective_scan, selective_scan_ref):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if k in use}
        args = {k: leaves.get(k) for k in ("D", "z", "delta_bias", "initial_state")}
        out, last = fn(
            leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], **args,
            delta_softplus=softplus, return_last_state=True,
        )
        generator = torch.Generator().manual_seed(7)
        weight_out = torch.randn(out.shape, generator=generator)
        weight_state = torch.randn(last.shape, generator=generator)
        ((out.float() * weight_out).sum() + (last * weight_state).sum()).backward()
        results.append((out, last, {k: v.grad for k, v in leaves.items()}))
    return results


ALL = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.mark.parametrize(
    "batch,d_inner,d_state,length,groups,use,softplus",
    [
        (2, 8, 4, scan.CHECKPOINT_STEPS + 44, None, ALL, True),  # two checkpoint chunks, every option
        (1, 6, 3, 17, 2, ALL, True),  # B/C groups
        (2, 4, 16, 600, 1, ("u", "delta", "A", "B", "C"), False),  # no D, z, bias, h0, softplus
        (1, 5, 2, 1, None, ("u", "delta", "A", "B", "C", "z", "initial_state"), True),  # one step
        (3, 4, 4, scan.CHECKPOINT_STEPS, None, ("u", "delta", "A", "B", "C", "D", "delta_bias"), True),  # one chunk
    ],
)
def test_scan_matches_reference(batch, d_inner, d_state, length, groups, use, softplus):
    inputs = make_inputs(batch, d_inner, d_state, length, groups)
    if not softplus:  # delta is used as the time step directly: keep it positive so the state decays
        inputs["delta"] = inputs["delta"].abs() * 0.2
    (out, last, grads), (ref_out, ref_last, ref_grads) = run_both(inputs, use, softplus)
    assert out.shape == ref_out.shape == (batch, d_inner, length)
    assert relative_error(out, ref_out) < 1e-4
    assert relative_error(last, ref_last) < 1e-4
    for name in use:
        assert grads[name].shape == inputs[name].shape, name
        assert relative_error(grads[name], ref_grads[name]) < 1e-4, name


def test_scan_in_two_pieces_equals_one_shot():
    inputs = make_inputs(2, 8, 4, 500)
    kwargs = {k: inputs[k] for k in ("D", "delta_bias")}
    full, full_last = selective_scan(
        *(inputs[k] for k in "u delta A B C".split()), **kwargs, z=inputs["z"], delta_softplus=True,
        return_last_state=True,
    )
    split = 123

    def piece(sl, state):
        return selective_scan(
            inputs["u"][..., sl], inputs["delta"][..., sl], inputs["A"], inputs["B"][..., sl],
            inputs["C"][..., sl], **kwargs, z=inputs["z"][..., sl], delta_softplus=True,
            initial_state=state, return_last_state=True,
        )

    first, state = piece(slice(0, split), None)
    second, last = piece(slice(split, None), state)
    assert relative_error(torch.cat([first, second], -1), full) < 1e-5
    assert relative_error(last, full_last) < 1e-5


def test_fast_exp_is_accurate():
    x = np.linspace(-80.0, 10.0, 200_001).astype(np.float32)
    out = np.empty_like(x)
    scan._exp_kernel(x, out)
    expected = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - expected) / expected) < 1e-6
    very_negative = np.array([-200.0, -1e30, -np.inf], np.float32)
    tiny = np.empty_like(very_negative)
    scan._exp_kernel(very_negative, tiny)
    assert np.all(tiny < 1e-37)


def test_bf16_inputs_give_bf16_output_close_to_reference():
    inputs = make_inputs(1, 8, 4, 64, dtype=torch.bfloat16)
    args = [inputs[k] for k in "u delta A B C".split()]
    out = selective_scan(*args, D=inputs["D"], z=inputs["z"], delta_softplus=True)
    ref = selective_scan_ref(*args, D=inputs["D"], z=inputs["z"], delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2


def test_no_grad_forward_keeps_no_graph():
    inputs = make_inputs(1, 4, 4, 32)
    with torch.no_grad():
        out = selective_scan(*(inputs[k].requires_grad_(True) for k in "u delta A B C".split()))
    assert out.grad_fn is None


def test_initial_state_by_linearity_matches_reference():
    """The path used on top of mamba-ssm (zero-state kernel + exact h0 term), checked with the reference."""
    inputs = make_inputs(2, 6, 4, 50, groups=2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out, last = scan._scan_with_initial_state_by_linearity(
        selective_scan_ref, leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
        leaves["z"], leaves["delta_bias"], True, leaves["initial_state"], time_chunk=16,
    )
    ref_out, ref_last = selective_scan_ref(
        *(inputs[k] for k in "u delta A B C".split()), D=inputs["D"], z=inputs["z"],
        delta_bias=inputs["delta_bias"], delta_softplus=True, initial_state=inputs["initial_state"],
        return_last_state=True,
    )
    assert relative_error(out, ref_out) < 1e-5
    assert relative_error(last, ref_last) < 1e-5
    (out.sum() + last.sum()).backward()
    assert leaves["initial_state"].grad is not None and leaves["initial_state"].grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change,message",
    [
        ({"u": torch.zeros(2, 8)}, "u must be"),
        ({"delta": torch.zeros(1, 8, 9)}, "delta shape"),
        ({"A": torch.zeros(7, 4)}, "A must be"),
        ({"B": torch.zeros(1, 4, 9)}, "B must be"),
        ({"initial_state": torch.zeros(1, 8, 3)}, "initial_state must have shape"),
    ],
)
def test_bad_shapes_are_named(change, message):
    inputs = {**make_inputs(1, 8, 4, 10), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(
            *(inputs[k] for k in "u delta A B C".split()), initial_state=inputs["initial_state"]
        )


def test_unknown_backend_is_rejected():
    inputs = make_inputs(1, 4, 4, 8)
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan(*(inputs[k] for k in "u delta A B C".split()), backend="triton")
