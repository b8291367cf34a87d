"""Growing a trained language model (longllava.modeling.append_language_layers): new layers appended under a
layout that keeps the old ones, starting as a no-op, trainable, and saved / loaded like any layer."""

from __future__ import annotations

import copy

import pytest
import torch

from longllava.errors import ModelInputError
from longllava.loading import load_model
from longllava.modeling import append_language_layers


@pytest.fixture
def grown_pair(tiny_model):
    """(the tiny model, a copy grown from 4 layers, attention at 1 and 3, to 6: mamba 4, attention 5)."""
    before = copy.deepcopy(tiny_model).eval()
    grown = copy.deepcopy(tiny_model).eval()
    added = append_language_layers(grown, 6, 2, 1, seed=5)
    assert added == ["mamba", "attention"]
    return before, grown


def test_grown_model_starts_as_the_old_one(grown_pair):
    before, grown = grown_pair
    text = grown.config.text_config
    assert text.num_hidden_layers == 6 and len(grown.model.language_model.layers) == 6
    assert text.layers_block_type == ["mamba", "attention"] * 3
    ids = torch.randint(5, 200, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(before(input_ids=ids).logits, grown(input_ids=ids).logits)


def test_new_layers_are_seeded_and_learn(grown_pair, tiny_model):
    _, grown = grown_pair
    again = copy.deepcopy(tiny_model)
    append_language_layers(again, 6, 2, 1, seed=5)
    new_layers = grown.model.language_model.layers[4:]
    for (name, mine), (_, theirs) in zip(new_layers.named_parameters(), again.model.language_model.layers[4:]
                                         .named_parameters(), strict=True):
        assert torch.equal(mine, theirs), name
    ids = torch.randint(5, 200, (1, 21), generator=torch.Generator().manual_seed(1))
    grown.train()
    grown(input_ids=ids, labels=ids).loss.backward()
    output_projections = [new_layers[0].mamba.out_proj.weight, new_layers[1].self_attn.o_proj.weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in output_projections)


def test_grown_model_saves_and_loads(grown_pair, tiny_processor, tmp_path):
    _, grown = grown_pair
    with torch.no_grad():
        grown.model.language_model.layers[5].self_attn.o_proj.weight.fill_(0.01)
    grown.save_pretrained(tmp_path / "grown")
    tiny_processor.save_pretrained(tmp_path / "grown")
    loaded, _ = load_model(tmp_path / "grown")
    assert loaded.config.text_config.layers_block_type == grown.config.text_config.layers_block_type
    ids = torch.randint(5, 200, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(input_ids=ids).logits, grown(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("layers, period, offset", [(4, 2, 1), (6, 3, 1), (6, 2, 0), (6, 2, 2)])
def test_a_layout_that_changes_existing_layers_is_refused(tiny_model, layers, period, offset):
    model = copy.deepcopy(tiny_model)
    with pytest.raises(ModelInputError, match="keep every existing layer"):
        append_language_layers(model, layers, period, offset)
    assert model.config.text_config.num_hidden_layers == 4 and len(model.model.language_model.layers) == 4
