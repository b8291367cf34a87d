"""DeepSpeed ZeRO-3 on two CPU processes through `longllava finetune` under the `deepspeed` launcher."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.train import read_loss_csv
from longllava.loading import load_model


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_zero3_two_cpu_ranks_train_and_checkpoint_loads(tmp_path, colour_set, recipe_file):
    launcher = Path(sys.executable).with_name("deepspeed")
    entry = Path(sys.executable).with_name("longllava")
    if not launcher.is_file() or not entry.is_file():
        pytest.fail(f"deepspeed launcher or longllava entry point missing next to {sys.executable}; run make setup")
    out = tmp_path / "run"  # recipe_file's output_dir
    command = [
        str(launcher), "--no_local_rank", "--num_gpus", "2", "--master_port", str(_free_port()), str(entry),
        "finetune", str(recipe_file), f"train_data={colour_set}", "deepspeed=zero3", "max_steps=3", "save_steps=3",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    assert "dist_world_size=2" in log
    rows = read_loss_csv(out / "loss.csv")
    assert [r["step"] for r in rows] == [1, 2, 3], log
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (out / "checkpoint-3").is_dir()
    # the consolidated model (gathered from both ranks' partitions) loads with every weight present
    model, processor = load_model(out / "model")
    base, _ = load_model(out / "base")
    trained = dict(model.named_parameters())
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert any("language_model" in n for n in changed), "ZeRO-3 run saved the untrained weights"
    ids = processor(text="<|startoftext|><|User|>\nhello\n", return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()
    shutil.rmtree(out / "checkpoint-3", ignore_errors=True)


def test_training_closes_its_process_group_before_returning(tmp_path):
    """A gloo group left open until interpreter exit has aborted a rank after a finished run; run_training
    closes it itself (finetune.train._close_process_group)."""
    from finetune.train import _close_process_group

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    assert torch.distributed.is_initialized()
    _close_process_group()
    assert not torch.distributed.is_initialized()
    _close_process_group()  # without a group it does nothing


def test_a_finished_rank_ends_without_interpreter_finalization():
    """`end_rank_process` flushes what was printed and leaves before finalization (where a gloo worker thread
    freeing tensors has aborted a rank), so exit-time hooks do not run and the exit status is the one given."""
    script = (
        "import atexit\n"
        "from finetune.cli import end_rank_process\n"
        "atexit.register(lambda: print('finalized'))\n"
        "print('saved', end='')\n"
        "end_rank_process(3)\n"
        "print('after')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 3, result.stderr
    assert result.stdout == "saved"
