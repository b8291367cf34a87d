"""Long-context inference: batched image encoding, chunked prefill, cached decoding, streaming text.

:class:`LongContextSession` answers a prompt over hundreds of images with memory that stays nearly
flat in the number of images:

1. images are preprocessed and encoded ``image_batch_size`` at a time (pixel tensors of one batch
   only; the projected features of every image are kept: ``tokens_per_image x hidden`` each);
2. the prompt is prefilled through the Jamba language model ``chunk_tokens`` tokens at a time; each
   chunk's ``inputs_embeds`` are built on the fly (token embeddings with the image features written
   into the ``<image>`` positions), and one transformers ``DynamicCache`` carries the Mamba conv/SSM
   states and the attention KV cache from chunk to chunk;
3. tokens are decoded one at a time with that cache, and streamed as text.

The result equals a one-shot forward (see tests/longllava/test_session.py). Chunked prefill relies on
:func:`longllava.scan.install_fast_scan`, which the session installs: transformers 5.23's Jamba mixer
otherwise restarts the SSM scan from zero at every chunk after the first.

Progress: ``progress(done, total, description)`` is called after every image batch, prefill chunk and
decoded token (the signature the apps use); ``show_progress=True`` adds tqdm bars on stderr.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image

from longllava import protocol
from longllava.errors import ModelInputError
from longllava.scan import install_fast_scan

ProgressCallback = Callable[[int, int, str], None]
ImageInput = Image.Image | torch.Tensor


@dataclass
class SessionStats:
    """Timings and counts of the last :meth:`LongContextSession.generate` / :meth:`prefill` call."""

    n_images: int = 0
    prompt_tokens: int = 0
    image_batches: int = 0
    prefill_chunks: int = 0
    new_tokens: int = 0
    image_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        data["decode_tokens_per_second"] = self.decode_tokens_per_second
        return data


@dataclass
class PrefillResult:
    """What a prefill leaves behind: the cache to decode from and the logits it computed."""

    cache: Any
    logits: torch.Tensor  # (1, n, vocab): the last position, or every position with all_logits=True
    n_tokens: int


class _Progress:
    """Fans progress out to a callback and (optionally) one tqdm bar per stage."""

    def __init__(self, callback: ProgressCallback | None, show: bool):
        self.callback = callback
        self.show = show
        self._bar = None

    def start(self, total: int, description: str) -> None:
        self.close()
        if self.show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, unit="step", leave=False)
        if self.callback:
            self.callback(0, total, description)

    def update(self, done: int, total: int, description: str) -> None:
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        if self.callback:
            self.callback(done, total, description)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LongContextSession:
    """Batched image encoding + chunked prefill + cached decoding for a LongLLaVA model (see module doc).

    model: a :class:`longllava.modeling.LongLlavaForConditionalGeneration` (anything with
    ``encode_images``, ``get_input_embeddings``, ``model.language_model`` and ``lm_head``);
    processor: its :class:`longllava.processor.LongLlavaProcessor`.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        image_batch_size: int = 16,
        chunk_tokens: int = 8192,
        progress: ProgressCallback | None = None,
        show_progress: bool = False,
        fast_scan: bool = True,
    ):
        if image_batch_size < 1 or chunk_tokens < 1:
            raise ModelInputError(
                f"image_batch_size ({image_batch_size}) and chunk_tokens ({chunk_tokens}) must be positive"
            )
        self.model = model
        self.processor = processor
        self.image_batch_size = int(image_batch_size)
        self.chunk_tokens = int(chunk_tokens)
        self.progress = progress
        self.show_progress = show_progress
        self.image_token_id = int(model.config.image_token_id)
        self.tokens_per_image = int(processor.tokens_per_image)
        self.stats = SessionStats()
        install_fast_scan()  # required for chunked prefill; fast_scan only picks the kernel
        self.scan_backend = "auto" if fast_scan else "ref"

    # ------------------------------------------------------------------------------------------------
    # parts
    # ------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def language_model(self) -> Any:
        return self.model.model.language_model

    @torch.inference_mode()
    def encode_images(self, images: Iterable[ImageInput] | torch.Tensor, total: int | None = None) -> torch.Tensor:
        """Images (PIL, (3,S,S) tensors, or a (n,3,S,S) tensor; any iterable, consumed lazily) ->
        features (n, tokens_per_image, text_hidden), ``image_batch_size`` images at a time."""
        if total is None:
            total = len(images) if hasattr(images, "__len__") else 0
        reporter = _Progress(self.progress, self.show_progress)
        reporter.start(total, "encoding images")
        started = time.perf_counter()
        features, batch, done = [], [], 0
        for image in images:
            batch.append(image)
            if len(batch) == self.image_batch_size:
                features.append(self._encode_batch(batch))
                done += len(batch)
                batch = []
                reporter.update(done, max(total, done), "encoding images")
        if batch:
            features.append(self._encode_batch(batch))
            done += len(batch)
            reporter.update(done, max(total, done), "encoding images")
        reporter.close()
        self.stats.n_images = done
        self.stats.image_batches = len(features)
        self.stats.image_seconds = time.perf_counter() - started
        if not features:
            hidden = self.model.config.text_config.hidden_size
            return torch.zeros(0, self.tokens_per_image, hidden, device=self.device, dtype=self._dtype)
        return torch.cat(features)

    def _encode_batch(self, batch: list[ImageInput]) -> torch.Tensor:
        if isinstance(batch[0], torch.Tensor):
            pixel_values = self.processor.preprocess_images(torch.stack(batch))
        else:
            pixel_values = self.processor.preprocess_images(batch)
        pixel_values = pixel_values.to(device=self.device, dtype=self._dtype)
        return self.model.encode_images(pixel_values)  # (batch, tokens_per_image, hidden)

    @property
    def _dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def tokenize(self, messages_or_prompt: str | Sequence[dict]) -> torch.Tensor:
        """Chat messages (rendered with the chat template + generation prompt), or an already rendered
        prompt string, -> input ids (1, n) with each ``<image>`` expanded to its tokens."""
        if isinstance(messages_or_prompt, str):
            text = messages_or_prompt
        else:
            text = self.processor.apply_chat_template(list(messages_or_prompt), add_generation_prompt=True)
        ids = self.processor.tokenizer(
            self.processor.expand_image_tokens(text), add_special_tokens=False, return_tensors="pt"
        )["input_ids"]
        return ids.to(self.device)

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor,
        all_logits: bool = False,
        cache: Any = None,
    ) -> PrefillResult:
        """Run the prompt through the language model in chunks of ``chunk_tokens``.

        input_ids: (1, n) with ``tokens_per_image`` image tokens per row of ``image_features``
        (n_images, tokens_per_image, hidden). Returns the cache and the logits of the last position
        (every position with ``all_logits``: (1, n, vocab), meant for tests on small prompts).
        """
        input_ids, image_tokens = self._check_prompt(input_ids, image_features)
        image_tokens = self._with_grid_places(input_ids, image_tokens)
        from transformers.cache_utils import DynamicCache

        cache = cache if cache is not None else DynamicCache(config=self.language_model.config)
        n_tokens = input_ids.shape[1]
        n_chunks = -(-n_tokens // self.chunk_tokens)
        reporter = _Progress(self.progress, self.show_progress)
        reporter.start(n_chunks, f"prefill {n_tokens} tokens")
        started = time.perf_counter()
        logits, image_row = [], 0
        for chunk_index, start in enumerate(range(0, n_tokens, self.chunk_tokens)):
            chunk_ids = input_ids[:, start : start + self.chunk_tokens]  # (1, c)
            embeds, image_row = self._chunk_embeddings(chunk_ids, image_tokens, image_row)
            hidden = self._run_language_model(embeds, cache)  # (1, c, hidden)
            is_last = start + self.chunk_tokens >= n_tokens
            if all_logits or is_last:
                logits.append(self.model.lm_head(hidden if all_logits else hidden[:, -1:]).float())
            reporter.update(chunk_index + 1, n_chunks, f"prefill {n_tokens} tokens")
        reporter.close()
        self.stats.prompt_tokens = n_tokens
        self.stats.prefill_chunks = n_chunks
        self.stats.prefill_seconds = time.perf_counter() - started
        return PrefillResult(cache=cache, logits=torch.cat(logits, dim=1), n_tokens=n_tokens)

    def _check_prompt(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ModelInputError(f"input_ids must be one non-empty sequence (1, n), got {tuple(input_ids.shape)}")
        n_image_tokens = int((input_ids == self.image_token_id).sum())
        n_images = image_features.shape[0]
        if n_image_tokens != n_images * self.tokens_per_image:
            raise ModelInputError(
                f"the prompt has {n_image_tokens} image tokens ({n_image_tokens / self.tokens_per_image:g} images x "
                f"{self.tokens_per_image}) but {n_images} images were given: use one <image> per image"
            )
        hidden = image_features.shape[-1]
        return input_ids.to(self.device), image_features.reshape(-1, hidden).to(self.device, self._dtype)

    def _with_grid_places(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """image_tokens (n_images * tokens_per_image, hidden) with the model's grid places added (if it has them:
        longllava.modeling.LongLlavaModel.add_grid_places), from the whole prompt before it is chunked."""
        if getattr(self.model.model, "grid_place_embeddings", None) is None:
            return image_tokens
        hidden = image_tokens.shape[-1]
        per_image = image_tokens.reshape(-1, self.tokens_per_image, hidden)  # (n_images, tokens_per_image, hidden)
        return self.model.model.add_grid_places(per_image, input_ids).reshape(-1, hidden)

    def _chunk_embeddings(
        self, chunk_ids: torch.Tensor, image_tokens: torch.Tensor, image_row: int
    ) -> tuple[torch.Tensor, int]:
        """Token embeddings (1, c, hidden) with the next image-token rows written in; new row offset."""
        embeds = self.model.get_input_embeddings()(chunk_ids)
        mask = chunk_ids == self.image_token_id  # (1, c)
        n_here = int(mask.sum())
        if n_here:
            rows = image_tokens[image_row : image_row + n_here]
            embeds = embeds.masked_scatter(mask[..., None].expand_as(embeds), rows)
        return embeds, image_row + n_here

    def _run_language_model(self, embeds: torch.Tensor, cache: Any) -> torch.Tensor:
        output = self.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        return output.last_hidden_state

    # ------------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------------

    def generate(
        self,
        messages_or_prompt: str | Sequence[dict],
        images: Iterable[ImageInput] | torch.Tensor | None = None,
        max_new_tokens: int = 128,
        stream: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = None,
        image_features: torch.Tensor | None = None,
    ) -> str | Iterator[str]:
        """Answer ``messages_or_prompt`` about ``images``.

        messages: ``[{role, content}]`` with ``<image>`` placeholders or image parts (the chat template
        and generation prompt are added); a string is used verbatim as the rendered prompt. Returns the
        answer, or with ``stream=True`` an iterator of text pieces. ``image_features`` (n, tokens_per_image,
        hidden) from :meth:`encode_images` stand in for ``images`` (several questions about one study
        encode it once).
        """
        pieces = self._generate_pieces(messages_or_prompt, images, max_new_tokens, do_sample, temperature, seed,
                                       image_features)
        return pieces if stream else "".join(pieces)

    def _generate_pieces(
        self, messages_or_prompt, images, max_new_tokens, do_sample, temperature, seed, image_features=None
    ) -> Iterator[str]:
        if max_new_tokens < 0:
            raise ModelInputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if images is not None and image_features is not None:
            raise ModelInputError("give images or image_features, not both")
        input_ids = self.tokenize(messages_or_prompt)
        expected_images = int((input_ids == self.image_token_id).sum()) // self.tokens_per_image
        images = [] if images is None else images
        given = len(image_features) if image_features is not None else len(images) if hasattr(images, "__len__") else None
        if given is not None and given != expected_images:
            raise ModelInputError(
                f"the prompt has {expected_images} <image> placeholders but {given} images were given"
            )
        self.stats = SessionStats()
        if image_features is None:
            features = self.encode_images(images, total=expected_images)
        else:
            features = image_features.to(device=self.device, dtype=self._dtype)
            self.stats.n_images = len(features)
        prefilled = self.prefill(input_ids, features)
        yield from self._decode(prefilled, max_new_tokens, do_sample, temperature, seed)

    def decode_ids(
        self, prefilled: PrefillResult, max_new_tokens: int, do_sample: bool = False,
        temperature: float = 1.0, seed: int | None = None,
    ) -> list[int]:
        """Token ids decoded from a prefill (greedy unless ``do_sample``); stops at end-of-text."""
        return list(self._decode_token_ids(prefilled, max_new_tokens, do_sample, temperature, seed))

    def _decode_token_ids(self, prefilled, max_new_tokens, do_sample, temperature, seed) -> Iterator[int]:
        """Yield each new token id as soon as it is chosen; the next forward runs only if needed."""
        generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        eos_ids = self._eos_ids()
        logits = prefilled.logits[:, -1]  # (1, vocab)
        reporter = _Progress(self.progress, self.show_progress)
        reporter.start(max_new_tokens, "generating")
        self.stats.new_tokens, self.stats.decode_seconds = 0, 0.0
        try:
            while self.stats.new_tokens < max_new_tokens:
                next_id = _pick_token(logits, do_sample, temperature, generator)
                if next_id in eos_ids:
                    break
                self.stats.new_tokens += 1
                reporter.update(self.stats.new_tokens, max_new_tokens, "generating")
                yield next_id
                if self.stats.new_tokens == max_new_tokens:
                    break
                started = time.perf_counter()
                with torch.inference_mode():
                    token = torch.tensor([[next_id]], device=self.device)
                    hidden = self._run_language_model(self.model.get_input_embeddings()(token), prefilled.cache)
                    logits = self.model.lm_head(hidden[:, -1]).float()
                self.stats.decode_seconds += time.perf_counter() - started
        finally:
            reporter.close()

    def _decode(self, prefilled, max_new_tokens, do_sample, temperature, seed) -> Iterator[str]:
        tokenizer = self.processor.tokenizer
        ids: list[int] = []
        shown = ""
        for token_id in self._decode_token_ids(prefilled, max_new_tokens, do_sample, temperature, seed):
            ids.append(token_id)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(shown):
            yield text[len(shown) :]

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.convert_tokens_to_ids(protocol.EOS)
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _pick_token(logits: torch.Tensor, do_sample: bool, temperature: float, generator: torch.Generator | None) -> int:
    if not do_sample:
        return int(logits.argmax(-1))
    if temperature <= 0:
        raise ModelInputError(f"temperature must be > 0 when sampling, got {temperature}")
    probabilities = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))
