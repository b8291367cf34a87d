"""``loss_average: turn``: each answer turn's mean cross entropy, averaged over the batch's turns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune import FinetuneError
from finetune.data import IGNORE_INDEX
from finetune.train import (
    _trainer_class,
    answer_turn_ids,
    load_recipe,
    read_loss_csv,
    run_training,
    supervised_positions,
    token_averaged_loss,
    turn_averaged_loss,
)
from longllava.loading import load_model

X = IGNORE_INDEX


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=X, reduction="none")


def test_turn_ids_number_each_rows_answer_runs():
    labels = torch.tensor([[X, 4, 5, X, X, 6, X, 7], [X, X, X, 8, 8, 8, X, X]])
    assert answer_turn_ids(labels).tolist() == [[0, 1, 1, 0, 0, 2, 0, 3], [0, 0, 0, 1, 1, 1, 0, 0]]


def test_loss_is_the_mean_of_turn_means_with_gradients():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, generator=generator, requires_grad=True)
    # row 0: a 1-token turn then a 4-token turn; row 1: one 2-token turn (shifted: positions t predict t + 1)
    labels = torch.tensor([[X, X, 3, X, 1, 2, 3, 4, X], [X, X, X, X, X, X, 9, 10, X]])
    token = _token_losses(logits, labels)
    expected = (token[0, 1] + token[0, 3:7].mean() + token[1, 5:7].mean()) / 3
    loss = turn_averaged_loss(logits, labels)
    torch.testing.assert_close(loss, expected)
    assert abs(loss.item() - token[labels[:, 1:] != X].mean().item()) > 1e-3  # not the token mean
    loss.backward()
    grad = logits.grad.abs().sum(dim=-1)  # (batch, seq): only positions that predict an answer token
    assert grad[0, [1, 3, 4, 5, 6]].gt(0).all() and grad[1, [5, 6]].gt(0).all()
    assert grad[0, [0, 2, 7, 8]].eq(0).all() and grad[1, :5].eq(0).all()
    # a 1-token turn weighs what a 4-token turn weighs: the gradient mass at its one position is 4x each of theirs
    token_grad = torch.autograd.grad(turn_averaged_loss(logits, labels), logits)[0]
    assert token_grad[0, 1].norm() > 2 * token_grad[0, 3].norm()


def test_one_turn_is_the_token_mean_and_nothing_supervised_raises():
    logits = torch.randn(1, 6, 7, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[X, X, 1, 2, 3, X]])
    torch.testing.assert_close(turn_averaged_loss(logits, labels),
                               F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=X))
    with pytest.raises(FinetuneError, match="no supervised answer token"):
        turn_averaged_loss(logits, torch.full((1, 6), X))


def _labelled_batch(seed: int, length: int, answers: list[tuple[int, int, int]]) -> dict:
    """Two rows of random token ids; ``answers`` (row, start, stop) are supervised (labels = the ids)."""
    input_ids = torch.randint(3, 200, (2, length), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(input_ids, X)
    for row, start, stop in answers:
        labels[row, start:stop] = input_ids[row, start:stop]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def test_trainer_computes_the_recipes_loss(tiny_base, tmp_path):
    from transformers import TrainingArguments

    model, _ = load_model(tiny_base)
    model.eval()
    batch = _labelled_batch(2, 12, [(0, 3, 4), (0, 6, 11), (1, 2, 5)])
    input_ids, labels = batch["input_ids"], batch["labels"]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits
        by_turn = _trainer_class()(model=model, args=args, loss_average="turn").compute_loss(model, dict(batch))
        by_token = _trainer_class()(model=model, args=args).compute_loss(model, dict(batch))
    torch.testing.assert_close(by_turn, turn_averaged_loss(logits, labels))
    torch.testing.assert_close(by_token, _token_losses(logits, labels)[labels[:, 1:] != X].mean())


def test_kept_logits_give_the_full_logits_loss():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, 11, generator=generator)
    labels = torch.tensor([[X, X, 3, X, 1, 2, 3, 4, X], [X, X, X, X, X, X, 9, 10, X]])
    keep = supervised_positions(labels)
    assert keep.tolist()[0] == [False, True, False, True, True, True, True, False, False]
    assert keep[:, -1].eq(False).all()
    kept = logits[keep]  # (n_kept, vocab), what the model returns for logits_to_keep=keep
    torch.testing.assert_close(turn_averaged_loss(kept, labels), turn_averaged_loss(logits, labels))
    token = _token_losses(logits, labels)[labels[:, 1:] != X]
    torch.testing.assert_close(token_averaged_loss(kept, labels), token.mean())
    torch.testing.assert_close(token_averaged_loss(kept, labels, torch.tensor(20)), token.sum() / 20)
    with pytest.raises(FinetuneError, match="no supervised answer token"):
        token_averaged_loss(kept[:0], torch.full((1, 6), X))


@pytest.mark.parametrize("loss_average", ["token", "turn"])
def test_trainer_runs_the_lm_head_only_where_labels_are_and_keeps_the_gradients(tiny_base, tmp_path, loss_average):
    from transformers import TrainingArguments

    model, _ = load_model(tiny_base)
    model.eval()
    batch = _labelled_batch(4, 16, [(0, 4, 7), (0, 10, 13), (1, 8, 15)])
    input_ids, labels = batch["input_ids"], batch["labels"]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = _trainer_class()(model=model, args=args, loss_average=loss_average)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert outputs.logits.shape == (13, model.config.text_config.vocab_size)  # 3 + 3 + 7 supervised tokens
    text_params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    kept_grads = torch.autograd.grad(loss, text_params)
    full_logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits  # (2, 16, vocab)
    reference = (turn_averaged_loss(full_logits, labels) if loss_average == "turn"
                 else _token_losses(full_logits, labels)[labels[:, 1:] != X].mean())
    torch.testing.assert_close(loss, reference)
    full_grads = torch.autograd.grad(reference, text_params)
    for kept_grad, full_grad in zip(kept_grads, full_grads):
        torch.testing.assert_close(kept_grad, full_grad)


def test_recipe_key_validates_and_a_turn_run_trains(tmp_path, colour_set, make_recipe):
    assert load_recipe("demo").loss_average == "token"
    assert load_recipe("demo", ["loss_average=turn"]).loss_average == "turn"
    with pytest.raises(FinetuneError, match="loss_average 'sample'; use token or turn"):
        load_recipe("demo", ["loss_average=sample"])
    with pytest.raises(FinetuneError, match="stage 'vision' has none"):
        load_recipe("demo_vision", ["loss_average=turn"])
    recipe = make_recipe(colour_set, tmp_path / "run", mode="full", loss_average="turn", max_steps=6,
                         save_steps=6)
    summary = run_training(recipe)
    losses = [row["loss"] for row in read_loss_csv(tmp_path / "run" / "loss.csv")]
    assert summary["global_step"] == 6 and sum(losses[3:]) < sum(losses[:3]) - 0.1, losses
