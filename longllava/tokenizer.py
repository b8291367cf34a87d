"""A small byte-level BPE tokenizer for tests and the bundled demo model, trained locally.

:func:`build_tokenizer` trains a BPE with the ``tokenizers`` library on the given texts plus a built-in
English / medical / remote-sensing corpus (no downloads), and returns a ``PreTrainedTokenizerFast``
with the protocol's tokens as special tokens and :data:`longllava.protocol.CHAT_TEMPLATE` as chat
template. The special tokens come first, so their ids are fixed for every tokenizer built here:

====  =====================  ====  =========
id    token                  id    token
====  =====================  ====  =========
0     ``<|pad|>``            6     ``<image>``
1     ``<|startoftext|>``    7     ``<img>``
2     ``<|endoftext|>``      8     ``</img>``
3     ``<|User|>``           9     ``<vid>``
4     ``<|Assistant|>``      10    ``</vid>``
5     ``<|System|>``         11    ``<t>``
====  =====================  ====  =========

The same ids as Jamba's own tokenizer for pad/bos/eos (0/1/2). Training is deterministic: the
same texts and ``vocab_size`` give the same vocabulary.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from longllava import config as model_config
from longllava import protocol

PAD = "<|pad|>"
ALL_SPECIAL_TOKENS: tuple[str, ...] = (PAD, *protocol.CHAT_TOKENS, *protocol.SPECIAL_TOKENS)

_GENERAL = """
The quick brown fox jumps over the lazy dog. What is shown in the image? Describe the picture in detail.
Answer the question with a single word or phrase. Yes. No. There is one object. There are two objects.
How many are there? Where is it located? Which side is larger? Is there any abnormality? Please answer.
The image shows a scene with several objects. It is located in the upper left part of the image.
The left side, the right side, the top, the bottom, the center of the picture. First, second, third.
Compare the first image with the second image. The series has many frames in order. The video shows
a sequence of frames over time. This is a summary of the findings and an overall impression.
Options: A, B, C, D. The correct answer is A. The answer is yes. The answer is no. I am not sure.
small, medium, large, bright, dark, round, oval, irregular, linear, multiple, single, normal, abnormal.
zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 12 20 25 50 100 144 336 1000
"""

_MEDICAL = """
Computed tomography of the chest shows no pleural effusion. The lungs are clear without consolidation.
Findings: a lung nodule in the right upper lobe, atelectasis in the left lower lobe, emphysema,
cardiomegaly, pericardial effusion, coronary artery wall calcification, arterial wall calcification,
hiatal hernia, lymphadenopathy, lung opacity, pulmonary fibrotic sequela, mosaic attenuation pattern,
peribronchial thickening, bronchiectasis, interlobular septal thickening, medical material.
Impression: no acute cardiopulmonary abnormality. The heart size is normal. The mediastinum is midline.
Axial CT slices from the thorax and abdomen; lung window, mediastinal window, bone window; Hounsfield
units; contrast enhanced; non-contrast; MRI; X-ray; ultrasound; radiograph; pathology; histology.
The liver, kidney, spleen, pancreas, trachea, bronchus, aorta, vertebra, rib, sternum and diaphragm.
A hypodense lesion with a diameter of 12 mm. A calcified granuloma. A mass with spiculated margins.
The patient has a history of cough and fever. Radiology report, clinical information, technique.
"""

_REMOTE_SENSING = """
A satellite image of an airport with airplanes parked near the terminal and a runway.
A harbor with ships and boats in the water; a bridge over the river; storage tanks near the port.
Vehicles on the road, a parking lot with many cars, a roundabout, a baseball field, a tennis court,
a basketball court, a ground track field, a soccer field, a swimming pool, a stadium, a dam, a windmill.
Remote sensing aerial scene: farmland, forest, residential area, industrial area, desert, mountain, lake.
The large image is split into sub-images; the thumbnail first, then the tiles row by row.
The ship is at the top right of the image. The plane is to the left of the building.
Rotated bounding box with center, width, height and angle; object detection; scene classification;
GeoTIFF raster, latitude, longitude, north, south, east, west, pixel, tile, grid, resolution, meters.
"""


def default_corpus(seed: int = 0, n_sentences: int = 600) -> list[str]:
    """Built-in training text: the three paragraphs above plus seeded sentences mixing their words."""
    paragraphs = [_GENERAL, _MEDICAL, _REMOTE_SENSING]
    sentences = [s.strip() for p in paragraphs for s in p.replace("\n", " ").split(".") if s.strip()]
    words = sorted({w.strip(",;:") for s in sentences for w in s.split()} - {""})
    rng = random.Random(seed)
    mixed = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "." for _ in range(n_sentences)]
    return paragraphs + [s + "." for s in sentences] + mixed


def build_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 4096, include_default_corpus: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (+ the built-in corpus) and wrap it for transformers.

    ``vocab_size`` is an upper bound: a small corpus yields fewer merges. The result has the protocol
    and chat tokens as special tokens (ids in the module docstring), ``<|pad|>``/``<|startoftext|>``/
    ``<|endoftext|>`` as pad/bos/eos, and the Jamba chat template.
    """
    if vocab_size < 256 + len(ALL_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(ALL_SPECIAL_TOKENS)}, got {vocab_size}")
    corpus = list(texts) if texts is not None else []
    if include_default_corpus or not corpus:
        corpus = default_corpus() + corpus
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(ALL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(itertools.chain(corpus), trainer=trainer, length=len(corpus))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=protocol.BOS,
        eos_token=protocol.EOS,
        pad_token=PAD,
        additional_special_tokens=list(ALL_SPECIAL_TOKENS[3:]),
        chat_template=protocol.CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )
    check_special_token_ids(wrapped)
    return wrapped


def check_special_token_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise if the fixed ids (pad 0, bos 1, eos 2, ``<image>`` 6) do not hold for ``tokenizer``."""
    expected = {
        PAD: model_config.PAD_TOKEN_ID,
        protocol.BOS: model_config.BOS_TOKEN_ID,
        protocol.EOS: model_config.EOS_TOKEN_ID,
        protocol.IMAGE_TOKEN: model_config.IMAGE_TOKEN_ID,
    }
    for token, token_id in expected.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != token_id:
            raise ValueError(f"tokenizer maps {token!r} to id {got}, expected {token_id}")
