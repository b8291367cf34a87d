"""End-to-end CPU smoke test of `longllava finetune`, `longllava merge-lora` and `longllava evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ENTRY = Path(sys.executable).with_name("longllava")


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(ENTRY), *args], capture_output=True, text=True, timeout=timeout)


def _last_json(stdout: str) -> dict:
    """The JSON document printed by --json (the Trainer prints its own log lines before it)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def test_cli_finetune_merge_evaluate_on_synthetic_series_and_grids(tmp_path, synthetic_sets, colour_set, recipe_file):
    out = tmp_path / "run"
    train = f"{synthetic_sets / 'ct_train.json'},{synthetic_sets / 'rs_train.json'}"
    # stage "multi": the series/grid records plus half as many replayed single-image records
    result = _run("finetune", str(recipe_file), "mode=lora", f"train_data={train}", "stage=multi",
                  f"replay_data={colour_set}", "replay_ratio=0.5", "max_length=1024", "pack=false",
                  "render={num_slices: 3, size: 56, tile_size: 56, max_tiles: 4}", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _last_json(result.stdout)
    assert summary["global_step"] == 2 and summary["mode"] == "lora" and summary["stage"] == "multi"
    assert summary["train_samples"] == 4 + 2
    assert (out / "loss.csv").is_file() and (out / "loss.png").is_file()
    assert len(list((tmp_path / "image_cache").glob("*/meta.json"))) == 4  # 2 CT studies + 2 scenes, once

    merged = tmp_path / "merged"
    result = _run("merge-lora", str(out / "adapter"), "--out", str(merged))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (merged / "model.safetensors").is_file()

    evaluation = tmp_path / "eval"
    result = _run("evaluate", "niah", "--model", str(merged), "--data", "synthetic:n_images=2;depths=0,1;size=56",
                  "--out", str(evaluation), "--max-new-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _last_json(result.stdout)
    assert metrics["n"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
    assert (evaluation / "metrics.json").is_file() and (evaluation / "niah_heatmap.png").is_file()


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    result = _run("finetune", "no_such_recipe")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown recipe 'no_such_recipe'; use one of ct_rate_lora, demo, demo_places, demo_polish, demo_vision, "
        "demo_vision_tiles, demo_warmup, pubmedvision_full, pubmedvision_lora, skysense_lora or a .yaml path"]
    result = _run("evaluate", "ct-rate", "--model", str(tmp_path), "--data", str(tmp_path / "nope.jsonl"),
                  "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "nope.jsonl not found" in result.stderr
