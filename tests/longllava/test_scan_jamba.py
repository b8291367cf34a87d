"""install_fast_scan(): transformers' Jamba Mamba mixer with the fast scan equals its own slow path."""

from __future__ import annotations

import pytest
import torch
from transformers import JambaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.jamba import modeling_jamba

from longllava import scan


@pytest.fixture
def restore_hook():
    was_installed = scan.fast_scan_installed()
    scan.uninstall_fast_scan()
    yield
    scan.uninstall_fast_scan()
    if was_installed:
        scan.install_fast_scan()


def tiny_jamba_config() -> JambaConfig:
    return JambaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1, num_experts=1,
        mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4,
    )


def random_mixer(seed: int = 0) -> modeling_jamba.JambaMambaMixer:
    """A mixer with O(1) weights (the default init makes the SSM contribution too small to test)."""
    torch.manual_seed(seed)
    mixer = modeling_jamba.JambaMambaMixer(tiny_jamba_config(), layer_idx=0).eval()
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.normal_(0.0, 0.3)
    return mixer


def chunked(mixer, hidden, sizes):
    """Run `hidden` through `mixer` chunk by chunk with one cache; returns outputs and the cache."""
    cache = DynamicCache(config=mixer.config)
    outputs, start = [], 0
    for size in sizes:
        outputs.append(mixer(hidden[:, start : start + size], cache_params=cache))
        start += size
    return torch.cat(outputs, dim=1), cache


def test_install_is_idempotent_and_reversible(restore_hook):
    original_scan = modeling_jamba.mamba_selective_scan
    original_forward = modeling_jamba.JambaMambaMixer.forward
    assert scan.install_fast_scan() is True
    assert scan.install_fast_scan() is False
    assert scan.fast_scan_installed()
    assert modeling_jamba.mamba_selective_scan is not original_scan
    assert scan.original_jamba_scan() is original_scan
    assert scan.uninstall_fast_scan() is True
    assert scan.uninstall_fast_scan() is False
    assert modeling_jamba.mamba_selective_scan is original_scan
    assert modeling_jamba.JambaMambaMixer.forward is original_forward


def test_patched_mixer_equals_slow_path_one_shot_and_gradients(restore_hook):
    mixer = random_mixer()
    hidden = torch.randn(2, 40, 16, generator=torch.Generator().manual_seed(1))
    expected = mixer(hidden)
    expected.square().sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in mixer.named_parameters()}
    mixer.zero_grad()

    scan.install_fast_scan()
    actual = mixer(hidden)
    actual.square().sum().backward()
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-4)
    for name, parameter in mixer.named_parameters():
        assert torch.allclose(parameter.grad, expected_grads[name], atol=1e-4, rtol=1e-3), name


@torch.no_grad()
def test_chunked_prefill_and_decode_equal_one_shot(restore_hook):
    mixer = random_mixer()
    hidden = torch.randn(1, 45, 16, generator=torch.Generator().manual_seed(2))
    one_shot = mixer(hidden)  # transformers' slow path, no cache

    # transformers 5.23 alone restarts the scan from zero for the second chunk: it diverges
    unpatched, _ = chunked(mixer, hidden, [20, 25])
    assert (unpatched - one_shot).abs().max() > 1e-2

    scan.install_fast_scan()
    patched, cache = chunked(mixer, hidden, [20, 3, 1, 21])  # includes a 1-token chunk (decode path)
    assert torch.allclose(patched, one_shot, atol=1e-5, rtol=1e-4)

    # decode after the chunked prefill equals the slow path's decode after a one-shot prefill
    reference_cache = DynamicCache(config=mixer.config)
    scan.uninstall_fast_scan()
    mixer(hidden, cache_params=reference_cache)
    step = torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(3))
    expected_step = mixer(step, cache_params=reference_cache)
    scan.install_fast_scan()
    assert torch.allclose(mixer(step, cache_params=cache), expected_step, atol=1e-5, rtol=1e-4)


def test_version_check_refuses_untested_transformers(restore_hook, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    with pytest.raises(RuntimeError, match="tested with transformers"):
        scan.install_fast_scan()
    assert not scan.fast_scan_installed()
    assert scan.install_fast_scan(force=True) is True
