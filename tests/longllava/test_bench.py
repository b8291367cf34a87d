"""Each ``longllava bench`` subcommand runs at toy size and prints its table / JSON (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from longllava import bench
from longllava.cli import main
from longllava.errors import ModelInputError

REPO = Path(__file__).resolve().parents[2]


def run_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--json", "--in-process"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_scan_quick(capsys):
    payload = run_json(capsys, "scan", "--quick", "--lengths", "128", "--max-ref-backward-tokens", "64")
    (run,) = payload["runs"]
    assert payload["d_inner"] == 64 and run["length"] == 128
    assert run["forward"]["max_rel_error_vs_transformers"] < 1e-4
    assert run["forward_backward"]["max_rel_error_grads"] < 1e-4
    assert run["forward_backward"]["transformers_measured"] is False  # 128 > 64: extrapolated
    assert run["peak_rss_mb"] > 0


def test_bench_scaling_quick_table(capsys):
    assert main(["bench", "scaling", "--quick", "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "hybrid ms/token" in out and "attention/hybrid" in out
    assert "   256" in out and "   512" in out


def test_bench_scaling_skips_over_budget(capsys):
    payload = run_json(capsys, "scaling", "--quick", "--budget-s", "0")
    skipped = [r for r in payload["runs"] if "skipped" in r]
    assert [r["length"] for r in skipped] == [512, 512]  # the second length of each model is over budget


def test_bench_scaling_hybrid_layout_is_its_own_not_the_presets():
    # the README's table is LongLLaVA's 1:7 ratio at demo width, whatever the demo preset's layout
    assert bench._text_config("demo", False, False).layers_block_type.count("attention") == 1
    assert bench._text_config("demo", False, False, attention_every=4).layers_block_type.count("attention") == 2
    assert bench._text_config("demo", True, False).layers_block_type.count("attention") == 8
    with pytest.raises(ModelInputError, match="--attention-every 0"):
        bench._text_config("demo", False, False, attention_every=0)


def test_bench_images_quick(capsys):
    payload = run_json(capsys, "images", "--quick", "--max-new-tokens", "2")
    assert [r["images"] for r in payload["runs"]] == [2, 4]
    assert payload["runs"][1]["prompt_tokens"] > payload["runs"][0]["prompt_tokens"]
    assert payload["rss_growth"]["ratio"] > 0


def test_bench_train_quick_same_loss_and_gradients_fewer_logits_cached_tower(capsys):
    payload = run_json(capsys, "train", "--quick", "--steps", "1", "--vocab", "512", "--answer-tokens", "8")
    full, kept, cached = payload["runs"]
    assert [(r["logits"], r["tower_cache"]) for r in payload["runs"]] == [
        ("all", False), ("answer", False), ("answer", True)]
    assert full["images"] == kept["images"] == cached["images"] == 4
    assert full["vocab"] == 512 and full["tokens"] == 4 * 16 + 32 + 8
    for run in (kept, cached):
        assert abs(run["loss"] - full["loss"]) <= 1e-5 * full["loss"]
        assert abs(run["grad_norm"] - full["grad_norm"]) <= 1e-5 * full["grad_norm"]
    assert kept["seconds_per_step"] > 0 and full["peak_rss_mb"] > 0


def test_bench_gpu_says_why_on_cpu(capsys):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the gpu bench is exercised with -m gpu")
    assert main(["bench", "gpu"]) == 0
    assert "needs a CUDA device" in capsys.readouterr().out


def test_isolated_run_reports_child_peak_rss():
    result = bench.run_isolated(bench.scaling_run, preset="demo", pure_attention=False, length=128, quick=True)
    assert result["length"] == 128 and result["peak_rss_mb"] > 50


def test_benchmark_script_is_the_same_command():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and "--prefill-tokens" in done.stdout
