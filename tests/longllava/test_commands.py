"""`longllava ask` end to end on a tiny model folder, and one-line errors (exit code 2) for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from longllava.cli import main


@pytest.fixture(scope="module")
def png_files(tmp_path_factory, images_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, image in enumerate(images_factory(3, seed=5)):
        paths.append(folder / f"image{i}.png")
        image.save(paths[-1])
    return [str(p) for p in paths]


def test_ask_answers_with_images_and_frames_as_json(tiny_model_dir, png_files, capsys):
    code = main(
        ["ask", "--model", str(tiny_model_dir), "--images", png_files[0], "--video-frames", *png_files[1:],
         "--max-new-tokens", "4", "--json", "What is shown?"]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 1 and result["video_frames"] == 2 and result["image_tokens"] == 3 * 16
    assert isinstance(result["answer"], str)


def test_ask_question_may_come_last_after_images(tiny_model_dir, png_files, capsys):
    assert main(["ask", "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--images", *png_files, "Q?"]) == 0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_model", "does not exist"),
        ("unknown_type", "model_type 'bert'"),
        ("missing_weights", "weights are missing"),
        ("more_placeholders", "2 <image> placeholders but 1 images"),
        ("missing_image", "image .* does not exist"),
    ],
)
def test_ask_bad_input_is_one_line_exit_2(tiny_model_dir, png_files, tmp_path, capsys, case, message):
    import re

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    question = "What is shown?"
    images = [png_files[0]]
    if case == "missing_model":
        model = tmp_path / "nowhere"
    elif case == "unknown_type":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif case == "missing_weights":
        (model / "model.safetensors").unlink()
    elif case == "more_placeholders":
        question = "<image> What is shown?"
    elif case == "missing_image":
        images = [str(tmp_path / "missing.png")]
    code = main(["ask", "--model", str(model), "--images", *images, "--", question])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(message, err)


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "longllava.cli", "ask", "--model", str(tmp_path / "none"), "hi"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_question_messages_follow_the_protocol():
    from longllava import protocol
    from longllava.commands import build_question_messages

    [message] = build_question_messages("Q?", n_images=2, n_frames=3)
    assert message == {"role": "user", "content": protocol.images_prompt(2) + protocol.series_prompt(3) + "\nQ?"}
    assert build_question_messages("Q?", 0, 0) == [{"role": "user", "content": "Q?"}]
