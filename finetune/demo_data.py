"""The bundled demo model's data: seeded synthetic CT, satellite and needle-in-a-haystack sets.

``python -m finetune.demo_data --out build/synthetic`` writes everything the ``demo`` recipe trains on
and the held-out sets its model card is scored on:

* the synthetic build (:func:`domain_data.synthetic.build.build_synthetic_sets`) with the demo's
  :data:`DEMO_BUILD` options: findings sized so a 160 px vision tower trained from scratch can see
  them (nodules of 7-11 mm radius, more emphysema patches), satellite objects drawn 1.5x larger;
  ``ct_train.json`` / ``rs_train.json`` for training, ``ct_test.jsonl`` / ``rs_test_fitrsfg.jsonl``
  held out (other seeds: the build gives train and test their own seed streams);
* ``niah_train.json``: needle-in-a-haystack training records (4-16 images, the needle at a uniform
  depth) drawn from a haystack pool and needle seeds far away from any evaluation seed
  (:data:`NIAH_TRAIN_SEED_BASE`; ``longllava evaluate niah --data synthetic:...`` derives its seeds
  from small integers).
* ``ct_train_shuffled.json`` / ``rs_train_shuffled.json`` (the whole-study stage,
  :func:`write_shuffled_records`): every study's / scene's conversation three times, its questions in a
  seeded shuffled order each time. Evaluation asks every question alone, straight after the images; a
  fixed order would teach the model that the first answer after the images is always the same question's.
  The shuffle keeps presence and count questions before those that name a present finding or object
  (side, slices, row, column, tile) and the report last (:func:`question_order_group`), so no answer
  can be copied from an earlier turn. ``--follow-up-copies N`` adds N versions of each CT study with only
  those follow-up questions (:func:`follow_up_conversations`); the shipped recipe uses none (measured in
  the demo model's training history, ``longllava/checkpoints/demo/TRAINING_HISTORY.md``, item 6).
* ``single_train.json`` (stage 2, :func:`write_single_image_records`): one image per record
  (a CT slice, a satellite tile, a NIAH needle or haystack image) with an answer only its pixels give,
  and ``vision_train.json``, the same images with the answers as label names (stage 1, the vision
  tower's pretraining, :func:`vision_records`); ``--vision-needles N`` adds N single needle images
  (``niah_vision/``, :func:`vision_needle_records`) to stage 1's file (the shipped recipe uses 5,000:
  training history, items 7 and 24) and writes them with their answers in words to
  ``vision_needles_train.json``, which a stage 2 may list beside ``single_train.json`` for a needle-rich
  warm-up (items 25-27); ``--no-scene-tokens`` leaves the tiles and NIAH images
  without per-token targets (:func:`add_scene_token_labels`); ``--centre-tokens`` adds each tile's object
  centres per cell (:func:`tile_centre_labels`; off in the shipped recipe, item 32);
  ``vision_tiles_replay.json`` (for a stage 1b that teaches the tower to count) holds every tile record,
  the build's and those of ``--vision-tile-scenes N`` extra scenes (:func:`vision_tile_records`; stage 1's
  ``vision_train.json`` never holds them), with ``--tile-replay N`` of stage 1's other records drawn in
  (:func:`tile_replay_records`), and ``vision_tiles_train.json`` the extra tiles in words for a stage 2;
  ``--tile-copies N`` writes N copies of the training tiles that hold objects to
  ``tiles_with_objects_train.json`` for a tile-rich stage 2 (:func:`tiles_with_objects_records`); all three
  off by default, the shipped five-stage chain passes 1,250, 7,000 and 3 (the Makefile's ``demo-model``;
  training history, items 33-46);
  ``--slab-presence`` first asks each CT image
  the five presence questions of the whole-study stage (:func:`slab_presence_turns`; off in the shipped
  recipes: item 13).
  It renders the CT
  studies and scenes into the training image cache (:data:`DEMO_CACHE_DIR`).
* ``polish_train.json`` (the presence polish, :func:`write_polish_records`) and beside it
  ``reports_train.json`` (:func:`write_report_records`: every second CT training study's report asked alone,
  item 46) and ``counts_train.json`` (:func:`write_count_records`: each scene's three count questions alone,
  item 47); with ``--tile-count-copies N`` also ``tile_counts_train.json`` (:func:`write_tile_count_records`:
  the tiles that hold objects asked the scene's count questions; not in the shipped polish, item 48).

Same arguments -> the same files (every draw is seeded).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

DEMO_BUILD: dict[str, Any] = {
    "seed": 0,
    "n_ct_train": 600,
    "n_ct_test": 40,
    "n_rs_train": 600,
    "n_rs_test": 40,
    "ct_finding_params": {
        "Lung nodule": {"radius_range_mm": (7.0, 11.0), "count_range": (1, 3)},
        "Emphysema": {"patches": 24},
    },
    "rs_object_scale": 1.5,
}
NIAH_TRAIN_SEED_BASE = 1_000_000_000
NIAH_TRAIN_RECORDS = 1000
NIAH_POOL_SIZE = 800
NIAH_IMAGES_RANGE = (4, 48)
NIAH_SIZE = 112
# extra needle images (one each, no haystack) for the vision stage: 5,000 in the shipped recipe.
# With per-token targets (SCENE_TOKEN_TARGETS) and 1,300 stage-1 steps they raised stage 1's shape reading
# from 0.28 to 0.61 of fresh needles (training history, items 7 and 24)
NIAH_VISION_NEEDLES = 5000
# stage 1's extra needles with their answers in words ("red square"), for a stage 2 that lists them beside
# single_train.json (training history, items 25-27)
NEEDLE_ANSWERS_FILE = "vision_needles_train.json"
NIAH_VISION_INDEX_BASE = 10_000_000  # haystack indices of those needles: far from the pool and the records'
# extra satellite tiles (each scene 2 x 2 tiles of 336 px, drawn like the build's: 0-5 objects of each kind
# clustered in one tile) for a stage 1b (labelled, in VISION_TILES_REPLAY_FILE) and a stage 2 (in words, in
# VISION_TILES_FILE), never for stage 1 (weighted there they cost the needle's shape: training history, item 36);
# none in the shipped recipes (items 32-37)
VISION_TILE_SCENES = 0
VISION_TILE_SIDE = 672
VISION_TILE_SEED_BASE = 3_000_000_000  # scene seeds far from the build's item seeds and the NIAH pools'
VISION_TILES_FILE = "vision_tiles_train.json"
VISION_TILE_SCENES_FILE = "rs_vision_scenes.jsonl"
# stage 2 sees the training scenes' tiles that hold objects this many extra times: otherwise ~260 of its 4,800
# images are such tiles and its language model answers "0, 0, 0" for every tile (training history, items 32-34)
TILES_WITH_OBJECTS_COPIES = 0
TILES_WITH_OBJECTS_FILE = "tiles_with_objects_train.json"
# a stage 1b (items 33-37; not in the shipped recipes): every tile record (the build's and the extra scenes')
# with this many of stage 1's other records (CT slabs, needle and haystack images) drawn in as a replay, so
# that steps that teach the tower to count keep what it reads in CT slabs and needles (tiles alone lost the CT
# answers, item 33)
TILE_REPLAY_RECORDS = 0
VISION_TILES_REPLAY_FILE = "vision_tiles_replay.json"
IMAGE_TAG = "<image>"
SHUFFLED_SOURCES = ("ct_train.json", "rs_train.json")
SHUFFLED_COPIES = 3
# follow-up-only versions per CT study: none in the shipped recipe (with one, every presence answer
# became "Yes" exactly for the cardiomegaly studies: training history, item 6)
FOLLOW_UP_COPIES = 0
FOLLOW_UP_SOURCES = ("ct_train.json",)
SLAB_PRESENCE = False  # stage 2: also ask the five presence questions about every CT image (measured, off)
# how the demo recipes render CT studies (16 slabs of 160 px: MinIP / average / MIP of consecutive planes,
# training history, item 8) and scenes (336-px tiles, at most 16)
DEMO_RENDER: dict[str, int | str] = {"num_slices": 16, "size": 160, "window": "slab", "tile_size": 336,
                                     "max_tiles": 16}
DEMO_CACHE_DIR = "build/demo_image_cache"
# stage 1's per-token targets for CT slabs (finetune.vision): the demo preset's pooled token grid (5 x 5 cells
# of 32 px), and the canvas pixels of a finding a cell must hold to count as showing it
DEMO_TOKEN_GRID = 5
TOKEN_MIN_PIXELS = 4
# ... and the same for satellite tiles (cells showing each object kind) and NIAH images (the needle's cells):
# on in the shipped recipe (training history, item 24)
SCENE_TOKEN_TARGETS = True
# ... and each tile's object centres: ``tile <objects> centres >= k`` on the cells holding at least k centres of
# that kind (k = 1, 2), so that a tile's tokens add up to its count (training history, item 32)
TILE_CENTRE_TARGETS = False
TILE_CENTRE_LEVELS = 2
SLICE_QUESTION = "Which findings does this CT slice show? Answer the findings with their side, or none."
TILE_QUESTION = "How many ships, storage tanks and buildings does this tile show? Answer with three numbers."
NEEDLE_QUESTION = "Does this image show a bold coloured shape? Answer its colour and shape, or none."


class DemoDataError(ValueError):
    """Demo training data that is missing or cannot be turned into a stage's records."""


def split_per_question(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (question, answer) turn pair.

    Where the source's first question carries the image tag (``<image>``: series / grid layouts), every
    split question gets it in front; where it has none (``images`` layout: the protocol places one tag
    per image), none do. ids become ``ID_qNN`` (NN: the turn pair's position in the source conversation)."""
    turns = record.get("conversations") or []
    if len(turns) % 2 or any(t.get("from") != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns)):
        raise DemoDataError(f"record {record.get('id')!r}: conversations must alternate human/gpt turns, "
                            "starting with human; fix or rebuild the data (python -m finetune.demo_data)")
    tag = f"{IMAGE_TAG}\n" if turns and IMAGE_TAG in turns[0]["value"] else ""
    pieces = []
    for pair in range(len(turns) // 2):
        question = turns[2 * pair]["value"].replace(IMAGE_TAG, "").strip()
        piece = {key: value for key, value in record.items() if key != "conversations"}
        piece["id"] = f"{record.get('id', 'record')}_q{pair:02d}"
        piece["conversations"] = [{"from": "human", "value": f"{tag}{question}"},
                                  dict(turns[2 * pair + 1])]
        pieces.append(piece)
    return pieces


def _write_records(path: Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write a training file (a JSON list, one space of indent, a final newline) and return its path."""
    path.write_text(json.dumps(list(records), indent=1) + "\n")
    return path


def _built_file(out_dir: str | Path, name: str) -> Path:
    source = Path(out_dir) / name
    if not source.is_file():
        raise DemoDataError(f"{source}: training records not found; build them first "
                            f"(python -m finetune.demo_data --out {out_dir})")
    return source


# ----------------------------------------------------------------------------------------------
# Whole-study stage: each conversation several times, its questions in a seeded shuffled order


# Order groups of a study's / scene's questions (domain_data.synthetic.qa's templates): 0 = asked of every
# study or scene (presence, counts); 1 = asked only when the finding or object is there, so the question
# itself answers its presence question (side, slices, row, column, tile); 2 = the report, which states
# every answer. Within a conversation a group never precedes a lower one.
_CONDITIONAL_QUESTION = re.compile(r"^(on )?which (side|slices|row|column|tile)\b", re.IGNORECASE)


def question_order_group(question: str, answer: str) -> int:
    """0, 1 or 2 (see above): where a question may sit in a shuffled conversation."""
    from domain_data.medical.constants import REPORT_FINDINGS_PREFIX

    if answer.startswith(REPORT_FINDINGS_PREFIX):
        return 2
    return 1 if _CONDITIONAL_QUESTION.match(question.removeprefix(f"{IMAGE_TAG}\n")) else 0


def shuffled_conversations(record: dict[str, Any], index: int, copies: int = SHUFFLED_COPIES,
                           seed: int = 0) -> list[dict[str, Any]]:
    """``copies`` versions of one record, each with its (question, answer) pairs in a seeded order.

    One pass over a study's images then supervises all of its answers, and no answer sits at a fixed
    position after the images (evaluation asks each question alone). The order is shuffled within
    :func:`question_order_group` groups, group by group, so that no answer can be read off an earlier
    turn instead of the images ("On which side is the pleural effusion?" or the report before "Is there
    a pleural effusion?" taught the model to say Yes only to findings the conversation had named). The
    image tag goes in front of whichever question comes first. ids become ``ID_cNN``; ``index`` is the
    record's place in its file."""
    tag, questions = _question_pairs(record)
    groups = [question_order_group(question, answer["value"]) for question, answer in questions]
    versions = []
    for copy in range(copies):
        shuffle = np.random.default_rng([seed, 11, index, copy]).permutation(len(questions))
        order = sorted(shuffle, key=lambda pair: groups[pair])  # stable: shuffled within each group
        versions.append(_reordered_version(record, tag, [questions[pair] for pair in order], f"c{copy:02d}"))
    return versions


def _question_pairs(record: dict[str, Any]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """The record's image tag (``"<image>\\n"`` or ``""``) and its (question without the tag, answer turn) pairs."""
    pairs = [(piece["conversations"][0]["value"], piece["conversations"][1]) for piece in split_per_question(record)]
    tag = f"{IMAGE_TAG}\n" if pairs and pairs[0][0].startswith(IMAGE_TAG) else ""
    return tag, [(question.removeprefix(f"{IMAGE_TAG}\n"), answer) for question, answer in pairs]


def _reordered_version(record: dict[str, Any], tag: str, pairs: Sequence[tuple[str, dict[str, Any]]],
                       suffix: str) -> dict[str, Any]:
    """A copy of ``record`` whose conversation is ``pairs`` in this order, the image tag in front of the
    first question, its id ``ID_suffix``."""
    turns: list[dict[str, Any]] = []
    for position, (question, answer) in enumerate(pairs):
        turns += [{"from": "human", "value": (tag if position == 0 else "") + question}, dict(answer)]
    version = {key: value for key, value in record.items() if key != "conversations"}
    version["id"] = f"{record.get('id', 'record')}_{suffix}"
    version["conversations"] = turns
    return version


def follow_up_conversations(record: dict[str, Any], index: int, copies: int = FOLLOW_UP_COPIES,
                            seed: int = 0) -> list[dict[str, Any]]:
    """``copies`` versions of one record with only its follow-up questions (order groups 1 and 2: side,
    slices, row, column, tile, the report), in a seeded order across both groups.

    In :func:`shuffled_conversations` these questions never come straight after the images, yet
    evaluation asks them there: a model trained only on those orders answered a side question with a
    needle's colour. Without presence or count questions in the conversation, none of them can give a
    presence answer away. A record with no follow-up question gives none. ids become ``ID_fNN``."""
    tag, questions = _question_pairs(record)
    follow_ups = [pair for pair in questions if question_order_group(pair[0], pair[1]["value"]) > 0]
    versions = []
    for copy in range(copies if follow_ups else 0):
        order = np.random.default_rng([seed, 13, index, copy]).permutation(len(follow_ups))
        versions.append(_reordered_version(record, tag, [follow_ups[pair] for pair in order], f"f{copy:02d}"))
    return versions


def shuffled_records(records: Sequence[dict[str, Any]], copies: int = SHUFFLED_COPIES, seed: int = 0,
                     follow_up_copies: int = FOLLOW_UP_COPIES) -> list[dict[str, Any]]:
    """:func:`shuffled_conversations` and :func:`follow_up_conversations` of every record, all versions
    in a seeded shuffled order."""
    versions = [v for index, record in enumerate(records)
                for v in (shuffled_conversations(record, index, copies, seed)
                          + follow_up_conversations(record, index, follow_up_copies, seed))]
    order = np.random.default_rng([seed, 7]).permutation(len(versions))
    return [versions[i] for i in order]


def write_shuffled_records(out_dir: str | Path, seed: int = 0, copies: int = SHUFFLED_COPIES,
                           sources: Sequence[str] = SHUFFLED_SOURCES,
                           follow_up_copies: int = FOLLOW_UP_COPIES,
                           follow_up_sources: Sequence[str] = FOLLOW_UP_SOURCES) -> list[Path]:
    """Rewrite each built training file ``NAME.json`` in ``out_dir`` as ``NAME_shuffled.json`` (with
    ``follow_up_copies`` follow-up versions of each record where ``NAME.json`` is in ``follow_up_sources``)."""
    written = []
    for name in sources:
        source = _built_file(out_dir, name)
        target = source.with_name(f"{source.stem}_shuffled.json")
        records = json.loads(source.read_text())
        follow_ups = follow_up_copies if name in follow_up_sources else 0
        written.append(_write_records(target, shuffled_records(records, copies, seed, follow_ups)))
    return written


# ----------------------------------------------------------------------------------------------
# Polish stage (after the whole-study stage): presence questions alone, with a replay of that stage

PRESENCE_ANSWERS = ("Yes", "No")
POLISH_PRESENCE_COPIES = 2  # each presence-only conversation this many times in polish_train.json
POLISH_CT_REPLAY_VERSIONS = 1  # each CT study's first shuffled versions (_c00, ...) replayed
POLISH_RS_REPLAY_VERSIONS = 2  # each scene's first shuffled versions (_c00, _c01) replayed
# one follow-up-only version (_f00: side, slices, report / row, column, tile, straight after the images)
# of every record of these training files, replayed
POLISH_FOLLOW_UP_SOURCES = ("ct_train.json", "rs_train.json")
POLISH_NIAH_RECORDS = 200  # the first NIAH training records, replayed once
# count-only versions (a scene's three count turns alone) of each scene's first shuffled versions, this many
# times each: none in the shipped recipe (3 versions x 2 raised the scene count by 0.16-0.18 on held-out scenes and
# cost presence answers: training history, item 34)
POLISH_COUNT_VERSIONS = 0
POLISH_COUNT_COPIES = 0
SCENE_COUNT_PREFIXES = ("How many ", "Count the ")  # domain_data.synthetic.qa.scene_questions' count questions
# location-only versions (a scene's row, column and tile turns alone) of each scene's first shuffled versions, this
# many times each: none in the shipped recipe (training history, item 38)
POLISH_LOCATION_VERSIONS = 0
POLISH_LOCATION_COPIES = 0
# the place stage (stage 5, recipe demo_places: the grid places learn where each tile is; training history, item 39):
# the location-only versions of each scene's first shuffled conversations and a seeded draw of polish records
PLACES_FILE = "places_train.json"
PLACES_LOCATION_VERSIONS = 2
PLACES_REPLAY_RECORDS = 585
SCENE_LOCATION_PREFIXES = ("Which row ", "Which column ", "Which tile ")  # scene_questions' place questions
# the polish's report-first records (reports_train.json): the report alone, straight after the images, of every
# POLISH_REPORTS_EVERY-th CT training study (all 600: better reports, worse nodule answers; item 46)
REPORTS_FILE = "reports_train.json"
POLISH_REPORTS_EVERY = 2
# the polish's count records (counts_train.json): the count-only versions of each scene's first
# POLISH_COUNT_RECORD_VERSIONS shuffled conversations, once, trained on top of the rest (longer polish; item 47)
COUNTS_FILE = "counts_train.json"
POLISH_COUNT_RECORD_VERSIONS = 3
# the polish's tile count records (tile_counts_train.json): every record of TILES_WITH_OBJECTS_FILE asked as the
# scene count questions, POLISH_TILE_COUNT_COPIES times; none in the shipped recipe (training history, item 48)
TILE_COUNTS_FILE = "tile_counts_train.json"
POLISH_TILE_COUNT_COPIES = 0


def presence_only_version(record: dict[str, Any]) -> dict[str, Any] | None:
    """``record`` cut down to its yes/no turns (CT presence questions), in their order, the image tag in
    front of the first; id ``ID_p``. None when it has no such turn.

    In a whole-study conversation the report's ~170 answer tokens outweigh the five one-token presence
    answers about twenty to one under the token-mean loss; alone, they carry all of it."""
    return _kept_version(record, lambda question, answer: answer in PRESENCE_ANSWERS, "p")


def count_only_version(record: dict[str, Any]) -> dict[str, Any] | None:
    """A satellite scene conversation cut down to its count turns (:data:`SCENE_COUNT_PREFIXES`), in their
    order, the image tag in front of the first; id ``ID_n``. None when it has no such turn."""
    return _kept_version(record, lambda question, answer: question.startswith(SCENE_COUNT_PREFIXES), "n")


def location_only_version(record: dict[str, Any]) -> dict[str, Any] | None:
    """A satellite scene conversation cut down to its row, column and tile turns
    (:data:`SCENE_LOCATION_PREFIXES`), in their order, the image tag in front of the first; id ``ID_l``. None
    when it has no such turn (a scene without objects)."""
    return _kept_version(record, lambda question, answer: question.startswith(SCENE_LOCATION_PREFIXES), "l")


def report_only_version(record: dict[str, Any]) -> dict[str, Any] | None:
    """A CT study conversation cut down to its report turn, straight after the images; id ``ID_rf``. None
    when it has no report.

    The polish's replay asks few reports first (one follow-up version in three), and after the five-stage
    chain's stage 3 its reports missed findings its presence answers found (training history, item 46)."""
    return _kept_version(record, lambda question, answer: question_order_group(question, answer) == 2, "rf")


def write_report_records(out_dir: str | Path, every: int = POLISH_REPORTS_EVERY) -> Path:
    """:data:`REPORTS_FILE` in ``out_dir``: :func:`report_only_version` of every ``every``-th study of its
    ``ct_train.json`` (the first, then each ``every``-th), in that file's order, for the polish beside
    ``polish_train.json``."""
    if every < 1:
        raise DemoDataError(f"{out_dir}/{REPORTS_FILE}: every must be >= 1, got {every}")
    studies = json.loads(_built_file(out_dir, "ct_train.json").read_text())[::every]
    return _write_records(Path(out_dir) / REPORTS_FILE, [v for record in studies if (v := report_only_version(record))])


def write_count_records(out_dir: str | Path, versions: int = POLISH_COUNT_RECORD_VERSIONS) -> Path:
    """:data:`COUNTS_FILE` in ``out_dir``: :func:`count_only_version` of each scene's first ``versions``
    shuffled conversations of its ``rs_train_shuffled.json``, in that file's order, for the polish beside
    ``polish_train.json`` and :data:`REPORTS_FILE`.

    The whole-scene conversations ask three counts among a dozen turns, and the polish replays few of them;
    count-only records taught the scene count's readout in items 34 and 47."""
    if versions < 1:
        raise DemoDataError(f"{out_dir}/{COUNTS_FILE}: versions must be >= 1, got {versions}")
    scenes = json.loads(_built_file(out_dir, "rs_train_shuffled.json").read_text())
    return _write_records(Path(out_dir) / COUNTS_FILE, _early_versions(scenes, versions, count_only_version))


def tile_count_version(record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A single-tile record (:data:`TILE_QUESTION`, ``"ships 0, storage tanks 3, buildings 0"``) asked as a
    scene's count questions: one turn per object kind, in a drawn order, each in one of the scene's two
    wordings (``domain_data.synthetic.qa.count_question_wordings``, drawn); id ``ID_n``.

    Stage 2 reads a tile's count in its own words; the scene's count questions are answered from the one
    tile that holds the kind (every kind's objects sit in one tile), so these records train that readout
    on the tile alone (training history, item 48)."""
    from domain_data.synthetic.qa import count_question_wordings

    if record["conversations"][0]["value"] != TILE_QUESTION:
        raise DemoDataError(f"record {record['id']}: not a tile record ({TILE_QUESTION!r})")
    counts = tile_answer_counts(record["conversations"][1]["value"])
    turns: list[dict[str, Any]] = []
    for plural in (list(counts)[k] for k in rng.permutation(len(counts))):
        turns += [{"from": "human", "value": count_question_wordings(plural)[int(rng.integers(2))]},
                  {"from": "gpt", "value": str(counts[plural])}]
    return dict(record, id=f"{record['id']}_n", conversations=turns)


def write_tile_count_records(out_dir: str | Path, seed: int = 0, copies: int = 1) -> Path:
    """:data:`TILE_COUNTS_FILE` in ``out_dir``: :func:`tile_count_version` of every record of its
    :data:`TILES_WITH_OBJECTS_FILE`, in that file's order (seeded orders and wordings), ``copies`` times over
    (the second pass's ids end ``_n1``, the third's ``_n2``, ...), for the polish."""
    if copies < 1:
        raise DemoDataError(f"{out_dir}/{TILE_COUNTS_FILE}: copies must be >= 1, got {copies}")
    tiles = json.loads(_built_file(out_dir, TILES_WITH_OBJECTS_FILE).read_text())
    rng = np.random.default_rng([seed, 37])
    records = [dict(version, id=f"{version['id']}{copy or ''}")
               for copy in range(copies) for version in (tile_count_version(record, rng) for record in tiles)]
    return _write_records(Path(out_dir) / TILE_COUNTS_FILE, records)


def _kept_version(record: dict[str, Any], keep: Callable[[str, str], bool], suffix: str) -> dict[str, Any] | None:
    """``record`` cut down to the turns for which ``keep(question, answer)`` holds, in their order, the image
    tag in front of the first; id ``ID_suffix``. None when no turn is kept."""
    tag, questions = _question_pairs(record)
    kept = [(question, answer) for question, answer in questions if keep(question, answer["value"])]
    return _reordered_version(record, tag, kept, suffix) if kept else None


def _is_early_version(record: dict[str, Any], versions: int) -> bool:
    """True for a shuffled conversation ``ID_cNN`` with NN < ``versions``."""
    head, _, number = str(record.get("id", "")).rpartition("_c")
    return bool(head) and number.isdigit() and int(number) < versions


def polish_records(ct_shuffled: Sequence[dict[str, Any]], rs_shuffled: Sequence[dict[str, Any]],
                   niah: Sequence[dict[str, Any]], presence_copies: int = POLISH_PRESENCE_COPIES,
                   ct_replay_versions: int = POLISH_CT_REPLAY_VERSIONS,
                   rs_replay_versions: int = POLISH_RS_REPLAY_VERSIONS,
                   niah_records: int = POLISH_NIAH_RECORDS, ct_follow_ups: Sequence[dict[str, Any]] = (),
                   rs_follow_ups: Sequence[dict[str, Any]] = (), count_versions: int = POLISH_COUNT_VERSIONS,
                   count_copies: int = POLISH_COUNT_COPIES, location_versions: int = POLISH_LOCATION_VERSIONS,
                   location_copies: int = POLISH_LOCATION_COPIES) -> list[dict[str, Any]]:
    """The polish stage's records: every whole-study CT conversation cut to its presence turns
    (:func:`presence_only_version`), ``presence_copies`` times; then a replay of the whole-study stage so
    that nothing else is forgotten: each CT study's first ``ct_replay_versions`` and each scene's first
    ``rs_replay_versions`` shuffled conversations (``_c00``, ``_c01``, ...), the follow-up-only versions
    given (:func:`follow_up_conversations`: the questions evaluation asks straight after the images but the
    shuffled conversations never do) and the first ``niah_records`` NIAH records; last, ``count_copies``
    times the count-only versions (:func:`count_only_version`) of each scene's first ``count_versions``
    shuffled conversations and ``location_copies`` times the location-only versions
    (:func:`location_only_version`) of its first ``location_versions``. Kept in this order, the inputs' own
    (seeded) order within each part; the trainer's seeded sampler shuffles them."""
    presence = [version for record in ct_shuffled if (version := presence_only_version(record))]
    ct_replay = [r for r in ct_shuffled if _is_early_version(r, ct_replay_versions)]
    rs_replay = [r for r in rs_shuffled if _is_early_version(r, rs_replay_versions)]
    counts = _early_versions(rs_shuffled, count_versions, count_only_version)
    locations = _early_versions(rs_shuffled, location_versions, location_only_version)
    return (presence * presence_copies + ct_replay + list(ct_follow_ups) + rs_replay + list(rs_follow_ups)
            + list(niah[:niah_records]) + counts * count_copies + locations * location_copies)


def places_records(rs_shuffled: Sequence[dict[str, Any]], polish: Sequence[dict[str, Any]],
                   location_versions: int = PLACES_LOCATION_VERSIONS, replay_records: int = PLACES_REPLAY_RECORDS,
                   seed: int = 0) -> list[dict[str, Any]]:
    """The place stage's records: the location-only versions (:func:`location_only_version`) of each scene's
    first ``location_versions`` shuffled conversations, then ``replay_records`` records of the polish stage
    (``polish``, drawn seeded; all of them when it has fewer) so that its answers are kept; the trainer's
    seeded sampler shuffles them."""
    locations = _early_versions(rs_shuffled, location_versions, location_only_version)
    drawn = np.random.default_rng([seed, 39]).choice(len(polish), size=min(replay_records, len(polish)), replace=False)
    return locations + [polish[int(i)] for i in sorted(drawn)]


def write_places_records(out_dir: str | Path, seed: int = 0, location_versions: int = PLACES_LOCATION_VERSIONS,
                         replay_records: int = PLACES_REPLAY_RECORDS) -> Path:
    """``places_train.json`` in ``out_dir`` (:func:`places_records`) from its ``rs_train_shuffled.json`` and
    ``polish_train.json``."""
    rs, polish = (json.loads(_built_file(out_dir, name).read_text())
                  for name in ("rs_train_shuffled.json", "polish_train.json"))
    return _write_records(Path(out_dir) / PLACES_FILE, places_records(rs, polish, location_versions, replay_records, seed))


def _early_versions(shuffled: Sequence[dict[str, Any]], versions: int,
                    cut: Callable[[dict[str, Any]], dict[str, Any] | None]) -> list[dict[str, Any]]:
    """``cut`` of each of the first ``versions`` shuffled conversations of every record, where it keeps a turn."""
    return [version for record in shuffled if _is_early_version(record, versions) and (version := cut(record))]


def write_polish_records(out_dir: str | Path, seed: int = 0, presence_copies: int = POLISH_PRESENCE_COPIES,
                         ct_replay_versions: int = POLISH_CT_REPLAY_VERSIONS,
                         rs_replay_versions: int = POLISH_RS_REPLAY_VERSIONS,
                         niah_records: int = POLISH_NIAH_RECORDS,
                         follow_up_sources: Sequence[str] = POLISH_FOLLOW_UP_SOURCES,
                         count_versions: int = POLISH_COUNT_VERSIONS, count_copies: int = POLISH_COUNT_COPIES,
                         location_versions: int = POLISH_LOCATION_VERSIONS,
                         location_copies: int = POLISH_LOCATION_COPIES) -> Path:
    """``polish_train.json`` in ``out_dir`` from its ``ct_train_shuffled.json``, ``rs_train_shuffled.json``
    and ``niah_train.json``, with one follow-up version (seeded by ``seed``, as in
    :func:`write_shuffled_records`) of every record of each of ``follow_up_sources`` (:func:`polish_records`)."""
    unknown = sorted(set(follow_up_sources) - set(SHUFFLED_SOURCES))
    if unknown:
        raise DemoDataError(f"follow-up sources {unknown} for {out_dir}/polish_train.json: use "
                            f"{' and/or '.join(SHUFFLED_SOURCES)}")
    ct, rs, niah = (json.loads(_built_file(out_dir, name).read_text()) for name in
                    ("ct_train_shuffled.json", "rs_train_shuffled.json", "niah_train.json"))
    follow_ups = {name: [version for index, record in enumerate(json.loads(_built_file(out_dir, name).read_text()))
                         for version in follow_up_conversations(record, index, 1, seed)]
                  for name in follow_up_sources}
    records = polish_records(ct, rs, niah, presence_copies, ct_replay_versions, rs_replay_versions, niah_records,
                             follow_ups.get("ct_train.json", ()), follow_ups.get("rs_train.json", ()),
                             count_versions, count_copies, location_versions, location_copies)
    return _write_records(Path(out_dir) / "polish_train.json", records)


# ----------------------------------------------------------------------------------------------
# Vision warm-up stage: one image per record, each with an answer that only its pixels give


def _on_planes(finding: dict[str, Any], first: int, last: int) -> tuple[bool, str | None]:
    """Whether ``finding`` reaches any of planes ``first``..``last`` (0-based, inclusive) and its side
    there: a lung nodule by the spans of the nodules themselves (a slice between two nodules shows none;
    the side is theirs)."""
    nodules = (finding.get("details") or {}).get("nodules")
    if nodules:
        sides = {n["side"] for n in nodules if n["slices"][0] <= last and first <= n["slices"][1]}
        return bool(sides), (sides.pop() if len(sides) == 1 else "both") if sides else None
    span = finding.get("slices")
    return bool(span and span[0] <= last and first <= span[1]), finding.get("side")


def slice_findings_answer(findings: dict[str, dict[str, Any]], z_index: float, z_last: int | None = None) -> str:
    """The findings on the rendered plane at fractional ``z_index`` (rounded to the nearest stored
    slice; ground-truth spans are 0-based, inclusive), or on any plane ``z_index``..``z_last`` of a slab
    image, in :data:`RENDERABLE_FINDINGS` order with their side: ``"lung nodule (left), cardiomegaly"``,
    or ``"none"``."""
    from domain_data.synthetic.ct_phantom import RENDERABLE_FINDINGS

    first = round(z_index)
    last = first if z_last is None else int(z_last)
    shown = []
    for name in RENDERABLE_FINDINGS:
        finding = findings.get(name) or {}
        on_slice, side = _on_planes(finding, first, last) if finding.get("present") else (False, None)
        if on_slice:
            shown.append(name.lower() + (f" ({side})" if side else ""))
    return ", ".join(shown) or "none"


def rendered_slice_answers(truth: dict[str, Any], render: dict[str, Any], count: int) -> list[str]:
    """:func:`slice_findings_answer` of each of the ``count`` images a study (its ``ground_truth``) is
    rendered into with ``render``: sampled planes (evenly spaced fractional z indices, as
    :func:`domain_data.medical.ct_to_slices` samples them) or, with ``window: slab``, slabs of planes."""
    from domain_data.medical.slices import SLAB_WINDOW, slab_bounds

    n_planes = truth["shape_zyx"][0]
    if render.get("window") == SLAB_WINDOW:  # each image projects a slab of planes
        planes = [(float(first), int(last)) for first, last in slab_bounds(n_planes, count)]
    else:
        planes = [(float(z), None) for z in np.linspace(0, n_planes - 1, count)]
    return [slice_findings_answer(truth["findings"], z, z_last) for z, z_last in planes]


def tile_object_counts(objects: Sequence[dict[str, Any]], row: int, col: int) -> list[int]:
    """How many objects of each kind (``OBJECT_KINDS`` order) the tile at 1-based (``row``, ``col``) holds."""
    from domain_data.synthetic.satellite import OBJECT_KINDS

    inside = [o["kind"] for o in objects if list(o["tile"]) == [row, col]]
    return [inside.count(kind) for kind in OBJECT_KINDS]


def tile_counts_answer(objects: Sequence[dict[str, Any]], row: int, col: int) -> str:
    """Object counts of the tile at 1-based (``row``, ``col``): ``"ships 0, storage tanks 2, buildings 0"``."""
    from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS

    counts = tile_object_counts(objects, row, col)
    return ", ".join(f"{PLURALS[kind]} {count}" for kind, count in zip(OBJECT_KINDS, counts, strict=True))


def balanced_needles(n: int) -> list[tuple[str, str]]:
    """``n`` (colour, shape) pairs cycling through every colour, then every shape: balanced for n a
    multiple of colours x shapes."""
    from domain_data.synthetic.niah import NEEDLE_COLOURS, NEEDLE_SHAPES

    colours, shapes = list(NEEDLE_COLOURS), list(NEEDLE_SHAPES)
    return [(colours[k % len(colours)], shapes[(k // len(colours)) % len(shapes)]) for k in range(n)]


def _single(record_id: str, image: Path, question: str, answer: str) -> dict[str, Any]:
    return {"id": record_id, "images": [str(image)], "layout": "images",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def _rendered(out: Path, name: str, truths_name: str, render: dict[str, Any], cache_dir: Path
              ) -> list[tuple[str, dict, Any]]:
    """(id, ground truth from ``truths_name``, rendered visuals) of every study / scene in ``name``."""
    from finetune import data

    lines = _built_file(out, truths_name).read_text().splitlines()
    truths = {item["id"]: item["ground_truth"] for item in map(json.loads, lines)}
    records = data.load_records(_built_file(out, name), None, render)
    return [(r.id, truths[r.id], data.record_visuals(r, cache_dir))
            for r in tqdm(records, desc=f"render {name}", unit="source")]


def slab_presence_turns(answer: str, rng: np.random.Generator) -> list[dict[str, str]]:
    """A presence question about each renderable finding, as (human, gpt) turns for the CT image whose
    findings are ``answer`` (:func:`slice_findings_answer`): in ``rng``'s order, each in one of the
    whole-study questions' wordings (:func:`domain_data.synthetic.qa.presence_question`), answered from
    that image's own findings ("Yes" when the finding reaches any of its planes)."""
    from domain_data.synthetic.ct_phantom import RENDERABLE_FINDINGS
    from domain_data.synthetic.qa import PRESENCE_WORDINGS, presence_question, yes_no

    shown = set(_slice_labels(answer))  # "ct lung nodule", "ct lung nodule left", ...
    turns = []
    for k in rng.permutation(len(RENDERABLE_FINDINGS)):
        name = RENDERABLE_FINDINGS[k]
        turns += [{"from": "human", "value": presence_question(name, int(rng.integers(PRESENCE_WORDINGS)))},
                  {"from": "gpt", "value": yes_no(f"ct {name.lower()}" in shown)}]
    return turns


def _slice_records(out: Path, render: dict[str, Any], cache: Path, presence_turns: bool = False,
                   seed: int = 0) -> list[dict[str, Any]]:
    pieces = []
    rendered = _rendered(out, "ct_train.json", "ct_train_studies.jsonl", render, cache)
    for study, (record_id, truth, visuals) in enumerate(rendered):
        answers = rendered_slice_answers(truth, render, len(visuals.paths))
        for s, (path, answer) in enumerate(zip(visuals.paths, answers, strict=True)):
            piece = _single(f"{record_id}_s{s:02d}", path, SLICE_QUESTION, answer)
            if presence_turns:  # the presence questions first, so the listing cannot give them away
                turns = slab_presence_turns(answer, np.random.default_rng([seed, 23, study, s]))
                piece["conversations"] = turns + piece["conversations"]
            pieces.append(piece)
    return pieces


def _tile_records(out: Path, render: dict[str, Any], cache: Path) -> list[dict[str, Any]]:
    pieces = []
    for record_id, truth, visuals in _rendered(out, "rs_train.json", "rs_train_scenes.jsonl", render, cache):
        rows, cols = truth["grid"]["rows"], truth["grid"]["cols"]
        if len(visuals.paths) != 1 + rows * cols:
            raise DemoDataError(f"{record_id}: rendered {len(visuals.paths)} images, expected a thumbnail and "
                                f"{rows}x{cols} tiles; raise render max_tiles to at least {rows * cols}")
        for row in range(1, rows + 1):
            for col in range(1, cols + 1):
                path = visuals.paths[1 + (row - 1) * cols + (col - 1)]  # thumbnail first, then row-major tiles
                answer = tile_counts_answer(truth["objects"], row, col)
                pieces.append(_single(f"{record_id}_t{row}{col}", path, TILE_QUESTION, answer))
    return pieces


def _needle_records(out: Path) -> list[dict[str, Any]]:
    pieces = []
    for record in json.loads(_built_file(out, "niah_train.json").read_text()):
        needle_at = next(i for i, rel in enumerate(record["images"]) if "needle_" in Path(rel).name)
        if needle_at != 0:
            pieces.append(_single(f"{record['id']}_i00", out / record["images"][0], NEEDLE_QUESTION, "none"))
        answer = record["conversations"][1]["value"]
        pieces.append(_single(f"{record['id']}_i{needle_at:02d}", out / record["images"][needle_at],
                              NEEDLE_QUESTION, answer))
    return pieces


def single_image_records(out_dir: str | Path, cache_dir: str | Path, render: dict[str, Any] | None = None,
                         seed: int = 0, slab_presence: bool = SLAB_PRESENCE) -> list[dict[str, Any]]:
    """One-image records for the vision warm-up, in a seeded shuffled order: every rendered CT slice
    with the findings it crosses (:func:`slice_findings_answer`), every satellite tile (not the
    thumbnail) with its object counts (:func:`tile_counts_answer`), and from each NIAH record its first
    image when that is a haystack ("none") and its needle image. With ``slab_presence`` each CT image's
    record first asks the five presence questions (:func:`slab_presence_turns`). CT studies and scenes
    are rendered with ``render`` (default :data:`DEMO_RENDER`) into ``cache_dir``: give the training run's
    image cache so the whole-study stage reuses the renders. Image paths are absolute."""
    out, cache = Path(out_dir).resolve(), Path(cache_dir).resolve()
    render = dict(DEMO_RENDER if render is None else render)
    pieces = _slice_records(out, render, cache, slab_presence, seed)
    pieces += _tile_records(out, render, cache) + _needle_records(out)
    order = np.random.default_rng([seed, 13]).permutation(len(pieces))
    return [pieces[i] for i in order]


def tiles_with_objects_records(single_records: Sequence[dict[str, Any]], copies: int = TILES_WITH_OBJECTS_COPIES,
                               seed: int = 0) -> list[dict[str, Any]]:
    """``copies`` copies (ids ``<id>_x0`` ...) of every tile record of ``single_records`` whose answer
    counts at least one object, in a seeded shuffled order."""
    with_objects = [record for record in single_records if record["conversations"][0]["value"] == TILE_QUESTION
                    and _tile_labels(record["conversations"][1]["value"])]
    copied = [dict(record, id=f"{record['id']}_x{k}") for k in range(copies) for record in with_objects]
    order = np.random.default_rng([seed, 23]).permutation(len(copied))
    return [copied[i] for i in order]


def tile_replay_records(vision: Sequence[dict[str, Any]], tile_ids: set[str], replay: int = TILE_REPLAY_RECORDS,
                        seed: int = 0) -> list[dict[str, Any]]:
    """Stage 1b's records: every record of ``vision`` whose id is in ``tile_ids`` and ``replay`` of the
    others drawn without replacement, in a seeded shuffled order (all of them if ``replay`` exceeds the
    others)."""
    rng = np.random.default_rng([seed, 29])
    tiles = [record for record in vision if record["id"] in tile_ids]
    others = [record for record in vision if record["id"] not in tile_ids]
    drawn = [others[i] for i in sorted(rng.choice(len(others), size=min(replay, len(others)), replace=False))]
    mixed = tiles + drawn
    return [mixed[i] for i in rng.permutation(len(mixed))]


def _slice_labels(answer: str) -> list[str]:
    labels = []
    for item in filter(None, answer.split(", ")) if answer != "none" else ():
        name, _, side = item.partition(" (")
        labels.append(f"ct {name}")
        side = side.rstrip(")")
        labels += [f"ct {name} {s}" for s in (("left", "right") if side == "both" else (side,) if side else ())]
    return labels


def tile_answer_counts(answer: str) -> dict[str, int]:
    """A tile answer as :func:`tile_counts_answer` writes it (``"ships 0, storage tanks 2, buildings 0"``)
    -> ``{plural: count}`` in its order."""
    return {plural: int(count) for plural, _, count in (item.rpartition(" ") for item in answer.split(", "))}


def _tile_labels(answer: str) -> list[str]:
    return [f"tile {plural} >= {k}" for plural, count in tile_answer_counts(answer).items()
            for k in range(1, count + 1)]


def _needle_labels(answer: str) -> list[str]:
    if answer == "none":
        return []
    colour, shape = answer.split(" ")
    return ["niah needle", f"niah colour {colour}", f"niah shape {shape}"]


VISION_LABELLERS = {SLICE_QUESTION: _slice_labels, TILE_QUESTION: _tile_labels, NEEDLE_QUESTION: _needle_labels}


def vision_records(single_records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The vision stage's records (:mod:`finetune.vision`) from :func:`single_image_records`: each
    answer as label names. A CT slice: ``ct <finding>`` and ``ct <finding> left|right`` (both sides:
    both); a tile: ``tile <objects> >= k`` for k = 1..count (counts as ordinal labels); a NIAH image:
    ``niah needle``, ``niah colour <c>``, ``niah shape <s>`` (a haystack image: none)."""
    out = []
    for record in single_records:
        question, answer = (turn["value"] for turn in record["conversations"][-2:])  # the listing comes last
        labeller = VISION_LABELLERS.get(question)
        if labeller is None:
            raise DemoDataError(f"{record['id']}: no vision labels for the question {question!r}")
        out.append({"id": record["id"], "images": record["images"], "labels": labeller(answer)})
    return out


def study_bag_records(vision: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One multiple-instance record per CT study from :func:`vision_records`: all of the study's slab
    images (in slab order) with the union of their labels -- the study's findings and sides -- so the
    vision stage's head, pooled over the whole study, learns what stage 3's presence questions need
    (a finding on 1-2 of 16 slabs must not be outvoted by false positives on the others)."""
    studies: dict[str, list[dict[str, Any]]] = {}
    for record in vision:
        study, _, slab = record["id"].rpartition("_s")
        if record["id"].startswith("ct_") and slab.isdigit():
            studies.setdefault(study, []).append(record)
    bags = []
    for study, slabs in sorted(studies.items()):
        slabs.sort(key=lambda r: int(r["id"].rpartition("_s")[2]))
        labels = sorted({name for r in slabs for name in r["labels"]})
        bags.append({"id": study, "images": [r["images"][0] for r in slabs], "labels": labels})
    return bags


def vision_needle_records(out_dir: str | Path, n_needles: int = NIAH_VISION_NEEDLES, seed: int = 0,
                          size: int = NIAH_SIZE) -> list[dict[str, Any]]:
    """``n_needles`` single needle images (written to ``niah_vision/needle_KKKKK.png``) as
    :func:`single_image_records`-style records ("red square"): drawn on haystack images of the NIAH
    training pool's seed at indices from :data:`NIAH_VISION_INDEX_BASE` on, so none repeats a pool
    image, a training needle or an evaluation image. Colours and shapes are balanced (cycled) in a
    seeded order."""
    from PIL import Image

    from domain_data.synthetic.niah import needle_image

    out = Path(out_dir).resolve()
    (out / "niah_vision").mkdir(parents=True, exist_ok=True)
    pool_seed = NIAH_TRAIN_SEED_BASE + seed
    pairs = balanced_needles(n_needles)
    order = np.random.default_rng([pool_seed, 17]).permutation(n_needles)
    records = []
    for k in tqdm(range(n_needles), desc="vision needles", unit="image", disable=n_needles < 100):
        colour, shape = pairs[order[k]]
        path = out / f"niah_vision/needle_{k:05d}.png"  # rewritten every time: the answer depends on the seed
        Image.fromarray(needle_image(pool_seed, colour, shape, size, NIAH_VISION_INDEX_BASE + k)).save(path)
        records.append(_single(f"niah_vision_{k:05d}", path, NEEDLE_QUESTION, f"{colour} {shape}"))
    return records


def vision_tile_records(out_dir: str | Path, n_scenes: int = VISION_TILE_SCENES, seed: int = 0,
                        side: int = VISION_TILE_SIDE) -> list[dict[str, Any]]:
    """The tiles of ``n_scenes`` extra ``side`` x ``side`` scenes (written to ``rs_vision/rsv_KKKKK_tRC.png``,
    ground truths to :data:`VISION_TILE_SCENES_FILE`) as :func:`single_image_records`-style tile records
    ("ships 2, storage tanks 0, buildings 0"), ids ``rsv_KKKKK_tRC`` (:func:`add_scene_token_labels` gives
    them their token targets). Each scene is drawn as the build draws its scenes (``make_scene``, the demo
    build's object scale, uint8), seeded from :data:`VISION_TILE_SEED_BASE` + ``seed`` * ``n_scenes`` + k,
    and its tiles are its pixels cut on the tile grid: what the renderer gives for an unpadded uint8 scene."""
    from PIL import Image

    from domain_data.synthetic.satellite import make_scene

    out = Path(out_dir).resolve()
    (out / "rs_vision").mkdir(parents=True, exist_ok=True)
    tile_size = int(DEMO_RENDER["tile_size"])
    if side % tile_size:
        raise DemoDataError(f"vision tile scenes of {side} px do not split into whole {tile_size}-px tiles")
    records, truths = [], []
    for k in tqdm(range(n_scenes), desc="vision tiles", unit="scene", disable=n_scenes < 100):
        scene_id = f"rsv_{k:05d}"
        scene = make_scene(VISION_TILE_SEED_BASE + seed * n_scenes + k, side, side, tile_size=tile_size,
                           object_scale=float(DEMO_BUILD["rs_object_scale"]))
        truth, grid = scene.ground_truth(), scene.grid()
        truths.append(json.dumps({"id": scene_id, "ground_truth": truth}))
        for row in range(1, grid.rows + 1):
            for col in range(1, grid.cols + 1):
                x0, y0, x1, y1 = grid.window(row, col)
                pixels = scene.image[y0:y1, x0:x1]
                path = out / f"rs_vision/{scene_id}_t{row}{col}.png"
                Image.fromarray(pixels).save(path)
                records.append(_single(f"{scene_id}_t{row}{col}", path, TILE_QUESTION,
                                       tile_counts_answer(truth["objects"], row, col)))
    (out / VISION_TILE_SCENES_FILE).write_text("".join(line + "\n" for line in truths))
    return records


def ct_token_label_names() -> list[str]:
    """The vision labels a CT slab's token targets cover: ``ct <finding>`` for every rendered finding and
    ``ct <finding> left|right`` for those with a side (the names :func:`vision_records` gives)."""
    from domain_data.synthetic.ct_phantom import LATERAL_FINDINGS, RENDERABLE_FINDINGS

    names = []
    for name in RENDERABLE_FINDINGS:
        sides = ("", " left", " right") if name in LATERAL_FINDINGS else ("",)
        names += [f"ct {name.lower()}{side}" for side in sides]
    return names


def slab_token_labels(truth: dict[str, Any], label_map: np.ndarray, render: dict[str, Any], count: int,
                      grid: int = DEMO_TOKEN_GRID, min_pixels: int = TOKEN_MIN_PIXELS) -> list[dict[str, list[int]]]:
    """For each of the ``count`` slab images of a study (``truth``: its ``ground_truth``; ``label_map``:
    its phantom's ``(z, y, x)`` label map), every label of :func:`ct_token_label_names` -> the row-major
    cells of the ``grid`` x ``grid`` token grid where the finding covers at least ``min_pixels`` canvas
    pixels (an empty list: nowhere on that image)."""
    from domain_data.medical.slices import SLAB_WINDOW, slab_token_cover
    from domain_data.synthetic.ct_phantom import finding_masks

    if render.get("window") != SLAB_WINDOW:
        raise DemoDataError(f"token targets are made for slab images (render window: {SLAB_WINDOW}), "
                            f"not window {render.get('window')!r}")
    if tuple(label_map.shape) != tuple(truth["shape_zyx"]):
        raise DemoDataError(f"label map shape {label_map.shape} is not the study's {truth['shape_zyx']}; "
                            "rebuild the synthetic set")
    pixel_mm = (float(truth["spacing_zyx_mm"][1]), float(truth["spacing_zyx_mm"][2]))
    images: list[dict[str, list[int]]] = [{name: [] for name in ct_token_label_names()} for _ in range(count)]
    for name, mask in finding_masks(label_map, truth["findings"]).items():
        cover = slab_token_cover(mask, count, int(render["size"]), grid, pixel_mm)  # (count, grid * grid)
        for image, cells in zip(images, cover, strict=True):
            image[f"ct {name.lower()}"] = np.flatnonzero(cells >= min_pixels).tolist()
    return images


def add_ct_token_labels(vision: Sequence[dict[str, Any]], out_dir: str | Path, render: dict[str, Any],
                        grid: int = DEMO_TOKEN_GRID, min_pixels: int = TOKEN_MIN_PIXELS) -> int:
    """Give every CT slab record of :func:`vision_records` (id ``<study>_sNN``) its ``token_labels``
    (:func:`slab_token_labels`, from the label map the build wrote beside the study) and ``token_grid``,
    in place. Returns how many records got them."""
    from domain_data.synthetic.ct_phantom import read_label_map

    out = Path(out_dir)
    studies = {item["id"]: item for item in map(json.loads, _built_file(out, "ct_train_studies.jsonl")
                                                .read_text().splitlines())}
    slabs: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for record in vision:
        study, _, slab = record["id"].rpartition("_s")
        if study in studies and slab.isdigit():
            slabs.setdefault(study, []).append((int(slab), record))
    count = int(render["num_slices"])
    for study, records in tqdm(sorted(slabs.items()), desc="token labels", unit="study", disable=len(slabs) < 50):
        item = studies[study]
        if "label_map" not in item:
            raise DemoDataError(f"{out / 'ct_train_studies.jsonl'}: study {study} has no label_map; rebuild the "
                                "synthetic set (python -m finetune.demo_data --out DIR) to write them")
        per_image = slab_token_labels(item["ground_truth"], read_label_map(out / item["label_map"]), render,
                                      count, grid, min_pixels)
        for slab, record in records:
            record["token_grid"] = grid
            record["token_labels"] = per_image[slab]
    return sum(len(records) for records in slabs.values())


def tile_token_label_names() -> list[str]:
    """The vision labels a tile's token targets cover: ``tile <objects> >= 1`` for every object kind (a
    cell shows the kind or not; the higher counts stay image-level)."""
    from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS

    return [f"tile {PLURALS[kind]} >= 1" for kind in OBJECT_KINDS]


def _tile_origin(truth: dict[str, Any], row: int, col: int) -> tuple[int, tuple[int, int]]:
    """The tile size of a scene's ``ground_truth`` and the source (x, y) of the 1-based tile's top-left
    corner (negative inside the padding)."""
    size, layout = int(truth["tile_size"]), truth["grid"]
    if not (1 <= row <= layout["rows"] and 1 <= col <= layout["cols"]):
        raise DemoDataError(f"tile (row {row}, column {col}) is outside the scene's {layout['rows']}x"
                            f"{layout['cols']} grid")
    return size, ((col - 1) * size - layout["pad_left"], (row - 1) * size - layout["pad_top"])


def tile_token_labels(truth: dict[str, Any], row: int, col: int, canvas: int = int(DEMO_RENDER["size"]),
                      grid: int = DEMO_TOKEN_GRID, min_pixels: int = TOKEN_MIN_PIXELS) -> dict[str, list[int]]:
    """For the tile at 1-based (``row``, ``col``) of a scene (``truth``: its ``ground_truth``), every label
    of :func:`tile_token_label_names` -> the row-major cells of the ``grid`` x ``grid`` token grid where that
    kind's footprints (shadows included) cover at least ``min_pixels`` pixels of the ``canvas``-px image
    the tower sees (the tile's pixels scaled by ``(canvas / tile_size)^2``)."""
    from domain_data.synthetic.satellite import OBJECT_KINDS, objects_mask
    from domain_data.token_cells import cell_pixel_counts

    size, origin = _tile_origin(truth, row, col)
    scale = (canvas / size) ** 2
    labels = {}
    for kind, name in zip(OBJECT_KINDS, tile_token_label_names(), strict=True):
        cover = cell_pixel_counts(objects_mask(truth["objects"], kind, origin, (size, size)), grid) * scale
        labels[name] = np.flatnonzero(cover >= min_pixels).tolist()
    return labels


def tile_centre_label_names(levels: int = TILE_CENTRE_LEVELS) -> list[str]:
    """The per-cell count labels of a tile: ``tile <objects> centres >= k`` for every object kind and
    k = 1..``levels``."""
    from domain_data.synthetic.satellite import OBJECT_KINDS, PLURALS

    return [f"tile {PLURALS[kind]} centres >= {k}" for kind in OBJECT_KINDS for k in range(1, levels + 1)]


def tile_centre_labels(truth: dict[str, Any], row: int, col: int, grid: int = DEMO_TOKEN_GRID,
                       levels: int = TILE_CENTRE_LEVELS) -> dict[str, list[int]]:
    """For the tile at 1-based (``row``, ``col``) of a scene (``truth``: its ``ground_truth``), every label
    of :func:`tile_centre_label_names` -> the row-major cells of the ``grid`` x ``grid`` token grid that
    hold at least k centres of that kind (cell edges as :func:`domain_data.token_cells.cell_pixel_counts`
    draws them). Counting k = 1..``levels`` over every cell gives the tile's count (up to ``levels`` per
    cell)."""
    from domain_data.synthetic.satellite import OBJECT_KINDS

    size, (origin_x, origin_y) = _tile_origin(truth, row, col)
    edges = np.linspace(0, size, grid + 1)[1:-1]  # inner cell edges, source pixels of the tile
    per_cell = {kind: np.zeros(grid * grid, dtype=int) for kind in OBJECT_KINDS}
    for item in truth["objects"]:
        if list(item["tile"]) != [row, col]:
            continue
        cell_row = int(np.searchsorted(edges, item["cy"] - origin_y, side="right"))
        cell_col = int(np.searchsorted(edges, item["cx"] - origin_x, side="right"))
        per_cell[item["kind"]][cell_row * grid + cell_col] += 1
    levels_in_order = [(kind, k) for kind in OBJECT_KINDS for k in range(1, levels + 1)]  # as the names go
    return {name: np.flatnonzero(per_cell[kind] >= k).tolist()
            for name, (kind, k) in zip(tile_centre_label_names(levels), levels_in_order, strict=True)}


def needle_token_label_names() -> list[str]:
    """The vision labels a NIAH image's token targets cover: ``niah needle`` and every colour and shape."""
    from domain_data.synthetic.niah import NEEDLE_COLOURS, NEEDLE_SHAPES

    return (["niah needle"] + [f"niah colour {c}" for c in NEEDLE_COLOURS]
            + [f"niah shape {s}" for s in NEEDLE_SHAPES])


def needle_token_labels(image: np.ndarray, labels: Sequence[str], canvas: int = int(DEMO_RENDER["size"]),
                        grid: int = DEMO_TOKEN_GRID, min_pixels: int = TOKEN_MIN_PIXELS) -> dict[str, list[int]]:
    """Token targets of one NIAH image (``(height, width, 3)`` uint8) with its vision ``labels``
    (:func:`vision_records`: none for a haystack image): the needle is every pixel in its colour
    (``domain_data.synthetic.niah.NEEDLE_COLOURS``, drawn exactly); its three labels get the cells it covers
    by at least ``min_pixels`` pixels of the ``canvas``-px image, every other label of
    :func:`needle_token_label_names` none."""
    from domain_data.synthetic.niah import NEEDLE_COLOURS
    from domain_data.token_cells import cell_pixel_counts

    targets: dict[str, list[int]] = {name: [] for name in needle_token_label_names()}
    colours = [name.rpartition(" ")[2] for name in labels if name.startswith("niah colour ")]
    if not colours:
        return targets
    needle = np.all(np.asarray(image)[..., :3] == NEEDLE_COLOURS[colours[0]], axis=-1)
    cover = cell_pixel_counts(needle, grid) * (canvas / needle.shape[0]) * (canvas / needle.shape[1])
    cells = np.flatnonzero(cover >= min_pixels).tolist()
    if not cells:
        raise DemoDataError(f"no pixel of the needle's colour {colours[0]} in a NIAH image labelled {list(labels)}")
    for name in labels:
        if name in targets:
            targets[name] = cells
    return targets


def add_scene_token_labels(vision: Sequence[dict[str, Any]], out_dir: str | Path,
                           grid: int = DEMO_TOKEN_GRID, min_pixels: int = TOKEN_MIN_PIXELS,
                           canvas: int = int(DEMO_RENDER["size"]), centres: bool = TILE_CENTRE_TARGETS) -> int:
    """Give every satellite tile record of :func:`vision_records` (id ``<scene>_tRC``) its ``token_labels``
    (:func:`tile_token_labels`; with ``centres`` also :func:`tile_centre_labels`, each named in ``labels``
    too where a cell has it) and every NIAH image record (id ``niah_...``) its own
    (:func:`needle_token_labels`, from the image), with ``token_grid``, in place. Returns how many records
    got them."""
    from PIL import Image

    scenes = {item["id"]: item["ground_truth"] for item in map(json.loads, _built_file(
        Path(out_dir), "rs_train_scenes.jsonl").read_text().splitlines())}
    extra = Path(out_dir) / VISION_TILE_SCENES_FILE  # :func:`vision_tile_records`' scenes
    if extra.is_file():
        scenes.update((item["id"], item["ground_truth"]) for item in map(json.loads, extra.read_text().splitlines()))
    done = 0
    for record in tqdm(vision, desc="scene token labels", unit="image", disable=len(vision) < 1000):
        scene, _, tile = record["id"].rpartition("_t")
        if scene in scenes and len(tile) == 2 and tile.isdigit():
            labels = tile_token_labels(scenes[scene], int(tile[0]), int(tile[1]), canvas, grid, min_pixels)
            if centres:
                centre_cells = tile_centre_labels(scenes[scene], int(tile[0]), int(tile[1]), grid)
                labels.update(centre_cells)
                record["labels"] = list(record["labels"]) + [name for name, cells in centre_cells.items() if cells]
        elif record["id"].startswith("niah_"):
            with Image.open(record["images"][0]) as image:
                labels = needle_token_labels(np.asarray(image.convert("RGB")), record["labels"], canvas, grid,
                                             min_pixels)
        else:
            continue
        record["token_grid"], record["token_labels"] = grid, labels
        done += 1
    return done


def _vision_order(records: Sequence[dict[str, Any]], extra: Sequence[dict[str, Any]], seed: int
                  ) -> list[dict[str, Any]]:
    """``records`` and then ``extra`` in the vision stages' seeded shuffled order (``records`` as they are
    without ``extra``)."""
    if not extra:
        return list(records)
    joined = [*records, *extra]
    return [joined[i] for i in np.random.default_rng([seed, 19]).permutation(len(joined))]


def write_single_image_records(out_dir: str | Path, cache_dir: str | Path, seed: int = 0,
                               vision_needles: int = NIAH_VISION_NEEDLES, render: dict[str, Any] | None = None,
                               slab_presence: bool = SLAB_PRESENCE, token_grid: int | None = DEMO_TOKEN_GRID,
                               scene_tokens: bool = SCENE_TOKEN_TARGETS,
                               centre_tokens: bool = TILE_CENTRE_TARGETS,
                               vision_tile_scenes: int = VISION_TILE_SCENES,
                               tile_copies: int = TILES_WITH_OBJECTS_COPIES,
                               tile_replay: int = TILE_REPLAY_RECORDS) -> Path:
    """``single_train.json`` in ``out_dir`` (:func:`single_image_records`, rendered with ``render``,
    default :data:`DEMO_RENDER`; stage 2) and ``vision_train.json`` (stage 1): the same images with label
    names (:func:`vision_records`), with ``vision_needles`` extra needle images
    (:func:`vision_needle_records`) shuffled in (seeded; the same needles with their answers in words go to
    :data:`NEEDLE_ANSWERS_FILE`, empty without them; the tiles of ``vision_tile_scenes`` extra scenes,
    :func:`vision_tile_records`, go to stage 1b's file and in words to :data:`VISION_TILES_FILE`), and with
    ``token_grid`` each CT slab's per-token
    targets on that grid (:func:`add_ct_token_labels`), with ``scene_tokens`` also each tile's and NIAH
    image's (:func:`add_scene_token_labels`; with ``centre_tokens`` each tile's object centres as well).
    :data:`TILES_WITH_OBJECTS_FILE` gets ``tile_copies`` copies of the first's tiles that hold objects
    (:func:`tiles_with_objects_records`; empty with 0), :data:`VISION_TILES_REPLAY_FILE` the tile records of
    ``vision_train.json`` and the extra scenes', labelled alike, with ``tile_replay`` of its other records
    (:func:`tile_replay_records`; stage 1b).
    Returns the first."""
    records = single_image_records(out_dir, cache_dir, render, seed=seed, slab_presence=slab_presence)
    copies = tiles_with_objects_records(records, tile_copies, seed)
    _write_records(Path(out_dir) / TILES_WITH_OBJECTS_FILE, copies)
    needles = vision_needle_records(out_dir, vision_needles, seed) if vision_needles else []
    _write_records(Path(out_dir) / NEEDLE_ANSWERS_FILE, needles)
    tiles = vision_tile_records(out_dir, vision_tile_scenes, seed) if vision_tile_scenes else []
    if not tiles:
        (Path(out_dir) / VISION_TILE_SCENES_FILE).unlink(missing_ok=True)
    _write_records(Path(out_dir) / VISION_TILES_FILE, tiles)
    # a stage 1b sees every tile (the build's and the extra scenes') with a replay of stage 1's other images;
    # stage 1 itself sees no extra tiles (their weight there cost the needle's shape: training history, item 36)
    with_tiles = _vision_order(records, needles + tiles, seed)
    tile_ids = {record["id"] for record in with_tiles if record["conversations"][0]["value"] == TILE_QUESTION}
    labelled = vision_records(with_tiles)
    if token_grid:
        render = dict(DEMO_RENDER if render is None else render)
        add_ct_token_labels(labelled, out_dir, render, token_grid)
        if scene_tokens:
            add_scene_token_labels(labelled, out_dir, token_grid, canvas=int(render["size"]), centres=centre_tokens)
    by_id = {record["id"]: record for record in labelled}
    if len(by_id) != len(labelled):
        raise DemoDataError(f"{out_dir}: {len(labelled) - len(by_id)} vision records share an id; rebuild the folder")
    vision = [by_id[record["id"]] for record in _vision_order(records, needles, seed)]
    _write_records(Path(out_dir) / "vision_train.json", vision)
    replay = tile_replay_records(labelled, tile_ids, tile_replay, seed)
    _write_records(Path(out_dir) / VISION_TILES_REPLAY_FILE, replay)
    return _write_records(Path(out_dir) / "single_train.json", records)


def build_niah_train(out_dir: str | Path, n_records: int = NIAH_TRAIN_RECORDS, pool_size: int = NIAH_POOL_SIZE,
                     images_range: tuple[int, int] = NIAH_IMAGES_RANGE, size: int = NIAH_SIZE,
                     seed: int = 0) -> Path:
    """Write ``niah_train/`` images and ``niah_train.json`` (LLaVA records, layout ``images``)."""
    from PIL import Image

    from domain_data.synthetic.niah import (
        NEEDLE_COLOURS,
        NEEDLE_SHAPES,
        NIAH_QUESTION,
        haystack_image,
        needle_image,
    )

    out = Path(out_dir)
    folder = out / "niah_train"
    folder.mkdir(parents=True, exist_ok=True)
    pool_seed = NIAH_TRAIN_SEED_BASE + seed
    pool = []
    for index in range(pool_size):
        rel = f"niah_train/hay_{index:05d}.png"
        Image.fromarray(haystack_image(pool_seed, index, size)).save(out / rel)
        pool.append(rel)
    rng = np.random.default_rng([pool_seed, 1])
    records = []
    for k in range(n_records):
        n_images = int(rng.integers(images_range[0], images_range[1] + 1))
        chosen = [pool[i] for i in rng.choice(pool_size, size=n_images, replace=False)]
        colour, shape = str(rng.choice(list(NEEDLE_COLOURS))), str(rng.choice(NEEDLE_SHAPES))
        needle_at = int(rng.integers(0, n_images))
        rel = f"niah_train/needle_{k:05d}.png"
        # the needle is drawn on a haystack image of the same pool seed but an index outside the pool
        Image.fromarray(needle_image(pool_seed, colour, shape, size, pool_size + k)).save(out / rel)
        chosen[needle_at] = rel
        records.append({
            "id": f"niah_train_{k:05d}",
            "images": chosen,
            "layout": "images",
            "conversations": [{"from": "human", "value": NIAH_QUESTION}, {"from": "gpt", "value": f"{colour} {shape}"}],
        })
    return _write_records(out / "niah_train.json", records)


def build_demo_data(out_dir: str | Path, seed: int = 0, scale: float = 1.0,
                    cache_dir: str | Path = DEMO_CACHE_DIR, follow_up_copies: int = FOLLOW_UP_COPIES,
                    vision_needles: int = NIAH_VISION_NEEDLES, render: dict[str, Any] | None = None,
                    slab_presence: bool = SLAB_PRESENCE, scene_tokens: bool = SCENE_TOKEN_TARGETS,
                    centre_tokens: bool = TILE_CENTRE_TARGETS,
                    vision_tile_scenes: int = VISION_TILE_SCENES,
                    tile_copies: int = TILES_WITH_OBJECTS_COPIES,
                    tile_replay: int = TILE_REPLAY_RECORDS,
                    polish_counts: tuple[int, int] = (POLISH_COUNT_VERSIONS, POLISH_COUNT_COPIES),
                    polish_locations: tuple[int, int] = (POLISH_LOCATION_VERSIONS, POLISH_LOCATION_COPIES),
                    tile_count_copies: int = POLISH_TILE_COUNT_COPIES) -> dict[str, Any]:
    """The synthetic build with :data:`DEMO_BUILD` (set sizes times ``scale``), ``niah_train.json`` and
    both stages' training files (the warm-up's renders, with ``render``, land in ``cache_dir``); with
    ``tile_count_copies`` also :data:`TILE_COUNTS_FILE` (:func:`write_tile_count_records`)."""
    from domain_data.synthetic.build import build_synthetic_sets

    options = dict(DEMO_BUILD, seed=seed)
    for key in ("n_ct_train", "n_ct_test", "n_rs_train", "n_rs_test"):
        options[key] = max(1, round(options[key] * scale))
    manifest = build_synthetic_sets(out_dir, **options)
    build_niah_train(out_dir, n_records=max(1, round(NIAH_TRAIN_RECORDS * scale)),
                     pool_size=max(40, round(NIAH_POOL_SIZE * scale)), seed=seed)
    write_shuffled_records(out_dir, seed, follow_up_copies=follow_up_copies)
    write_polish_records(out_dir, seed, count_versions=polish_counts[0], count_copies=polish_counts[1],
                         location_versions=polish_locations[0], location_copies=polish_locations[1])
    write_places_records(out_dir, seed, replay_records=round(PLACES_REPLAY_RECORDS * scale))
    write_report_records(out_dir)
    write_count_records(out_dir)
    write_single_image_records(out_dir, cache_dir, seed, round(vision_needles * scale), render, slab_presence,
                               scene_tokens=scene_tokens, centre_tokens=centre_tokens,
                               vision_tile_scenes=round(vision_tile_scenes * scale), tile_copies=tile_copies,
                               tile_replay=round(tile_replay * scale))
    if tile_count_copies:
        write_tile_count_records(out_dir, seed, tile_count_copies)
    return manifest


def build_heldout_subset(out_dir: str | Path, n_ct: int = 1, n_rs: int = 1, seed: int = 0,
                         start: int = 0) -> dict[str, Any]:
    """Only ``n_ct`` CT studies and ``n_rs`` scenes of the held-out sets (no training data), from item
    ``start`` on.

    Every study / scene is seeded by (seed, domain, split, index) alone, so with ``start=0`` these are
    exactly the first items of the full build's ``ct_test.jsonl`` / ``rs_test_fitrsfg.jsonl``: what CI
    scores the bundled model on, to compare with the predictions recorded in its model card. With
    ``start`` past the full build's 40, they are fresh held-out items no recipe choice has seen (training
    history, item 31: ``start=40``)."""
    from domain_data.synthetic.build import build_synthetic_sets

    options = dict(DEMO_BUILD, seed=seed, n_ct_train=0, n_rs_train=0, n_ct_test=n_ct, n_rs_test=n_rs,
                   first_test_index=start)
    return build_synthetic_sets(out_dir, **options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="build/synthetic", help="output folder (default build/synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every set size (e.g. 0.02 for a smoke run)")
    parser.add_argument("--cache-dir", default=DEMO_CACHE_DIR,
                        help=f"image cache the recipes train from (default {DEMO_CACHE_DIR})")
    parser.add_argument("--follow-up-copies", type=int, default=FOLLOW_UP_COPIES,
                        help="follow-up-only versions of each CT study in ct_train_shuffled.json (default 0)")
    parser.add_argument("--vision-needles", type=int, default=NIAH_VISION_NEEDLES,
                        help=f"single needle images only stage 1 sees (default {NIAH_VISION_NEEDLES})")
    parser.add_argument("--ct-window", choices=("multi", "slab"), default=DEMO_RENDER["window"],
                        help="how single_train.json / vision_train.json render CT studies: 'slab' (MinIP / "
                        "average / MIP of consecutive slabs, the shipped recipes) or 'multi' (sampled planes; "
                        "the recipes' render must then say window: multi too)")
    parser.add_argument("--slab-presence", action=argparse.BooleanOptionalAction, default=SLAB_PRESENCE,
                        help="single_train.json asks the five presence questions about every CT image before "
                        f"its findings (default {'on' if SLAB_PRESENCE else 'off'})")
    parser.add_argument("--scene-tokens", action=argparse.BooleanOptionalAction, default=SCENE_TOKEN_TARGETS,
                        help="vision_train.json also gives every tile and NIAH image per-token targets, not only "
                        f"the CT slabs (default {'on' if SCENE_TOKEN_TARGETS else 'off'}; training history, item 24)")
    parser.add_argument("--vision-tile-scenes", type=int, default=VISION_TILE_SCENES,
                        help=f"extra {VISION_TILE_SIDE}-px scenes whose tiles a stage 1b (with token targets) and a stage 2 "
                        f"(in words) see, never stage 1 (default {VISION_TILE_SCENES}; training history, items 32-37)")
    parser.add_argument("--tile-copies", type=int, default=TILES_WITH_OBJECTS_COPIES,
                        help=f"copies of the training tiles that hold objects in {TILES_WITH_OBJECTS_FILE} for "
                        f"stage 2 (default {TILES_WITH_OBJECTS_COPIES}; training history, items 32-34)")
    parser.add_argument("--tile-replay", type=int, default=TILE_REPLAY_RECORDS,
                        help=f"stage 1's other records drawn in beside the tiles in {VISION_TILES_REPLAY_FILE} for "
                        f"a stage 1b (default {TILE_REPLAY_RECORDS}; training history, items 33-37)")
    parser.add_argument("--polish-counts", type=int, nargs=2, metavar=("VERSIONS", "COPIES"),
                        default=[POLISH_COUNT_VERSIONS, POLISH_COUNT_COPIES],
                        help="polish_train.json also holds COPIES times the count-only versions of each scene's "
                        "first VERSIONS shuffled conversations (default 0 0; training history, item 34)")
    parser.add_argument("--tile-count-copies", type=int, default=POLISH_TILE_COUNT_COPIES,
                        help=f"also write {TILE_COUNTS_FILE}: the records of {TILES_WITH_OBJECTS_FILE} asked as the "
                        "scene's count questions, this many times (default 0: not written; training history, "
                        "item 48)")
    parser.add_argument("--polish-locations", type=int, nargs=2, metavar=("VERSIONS", "COPIES"),
                        default=[POLISH_LOCATION_VERSIONS, POLISH_LOCATION_COPIES],
                        help="polish_train.json also holds COPIES times the location-only versions (row, column and "
                        "tile turns) of each scene's first VERSIONS shuffled conversations (default 0 0; training "
                        "history, item 38)")
    parser.add_argument("--centre-tokens", action=argparse.BooleanOptionalAction, default=TILE_CENTRE_TARGETS,
                        help="with --scene-tokens, every tile's cells also name the object centres they hold "
                        "(tile <objects> centres >= 1, >= 2), so the tokens add up to the tile's count (default "
                        f"{'on' if TILE_CENTRE_TARGETS else 'off'}; training history, item 32)")
    parser.add_argument("--records-only", action="store_true",
                        help="only rewrite an existing build's stage files (*_shuffled.json, polish_train.json, "
                        f"{REPORTS_FILE}, {COUNTS_FILE}, {PLACES_FILE}, single_train.json)")
    args = parser.parse_args(argv)
    render = dict(DEMO_RENDER, window=args.ct_window)
    if args.records_only:
        written = write_shuffled_records(args.out, args.seed, follow_up_copies=args.follow_up_copies) + [
            write_polish_records(args.out, args.seed, count_versions=args.polish_counts[0],
                                 count_copies=args.polish_counts[1], location_versions=args.polish_locations[0],
                                 location_copies=args.polish_locations[1]),
            write_places_records(args.out, args.seed),
            write_report_records(args.out),
            write_count_records(args.out),
            write_single_image_records(args.out, args.cache_dir, args.seed, args.vision_needles, render,
                                       args.slab_presence, scene_tokens=args.scene_tokens,
                                       centre_tokens=args.centre_tokens,
                                       vision_tile_scenes=args.vision_tile_scenes,
                                       tile_copies=args.tile_copies, tile_replay=args.tile_replay)]
        if args.tile_count_copies:
            written.append(write_tile_count_records(args.out, args.seed, args.tile_count_copies))
        for path in written:
            print(f"wrote {path} ({len(json.loads(path.read_text()))} records)")
        return 0
    manifest = build_demo_data(args.out, args.seed, args.scale, args.cache_dir, args.follow_up_copies,
                               args.vision_needles, render, args.slab_presence, args.scene_tokens,
                               args.centre_tokens, args.vision_tile_scenes, args.tile_copies, args.tile_replay,
                               tuple(args.polish_counts), tuple(args.polish_locations), args.tile_count_copies)
    print(json.dumps(manifest["counts"], sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
