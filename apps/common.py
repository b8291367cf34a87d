"""Helpers shared by the CT and satellite apps: configuration, user-facing errors, exports.

Privacy rule for every app: nothing derived from an upload's file name or DICOM header reaches the
page, the logs or an export unless it passed a whitelist (see ``ct_app.summary_fields``). Upload
paths carry the user's original file name, so they are never logged.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from longllava.errors import UserInputError

LOG = logging.getLogger("longllava.apps")

AUTH_USER_ENV = "LONGLLAVA_APP_USER"
AUTH_PASSWORD_ENV = "LONGLLAVA_APP_PASSWORD"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class AppInputError(UserInputError):
    """Bad input given to an app (no file, file too large, question missing, nothing loaded yet)."""


RENDER_FIELDS: tuple[str, ...] = ("num_slices", "spacing_mm", "window", "slice_size", "tile_size", "max_tiles",
                                  "tile_labels")
DEFAULT_MAX_TILES = 64


@dataclass
class AppConfig:
    """Limits and rendering options for the apps; the CLI, the model folder and the tests fill it.

    Rendering (None = not set): ``num_slices`` / ``spacing_mm`` / ``window`` / ``slice_size`` go to
    ``ct_to_slices`` (unset: the study's own slice count clipped to 100-984, multi-window RGB, the
    vision tower's input size); ``tile_size`` / ``max_tiles`` go to ``tile_image`` (unset: the vision
    input size and 64 tiles; ``tile_labels``, each tile's place as text, only for a model trained
    with it). A model folder's ``longllava_defaults.json`` (written by training) fills
    what the command line left unset, so the apps render inputs the way the model saw them.
    ``preload_samples`` opens every page with the sample study and image already loaded.
    """

    max_upload_mb: float = 1024.0
    concurrency_limit: int = 2
    queue_max_size: int = 64
    num_slices: int | None = None
    spacing_mm: float | None = None
    window: str | None = None
    slice_size: int | None = None
    tile_size: int | None = None
    max_tiles: int | None = None
    tile_labels: bool | None = None
    max_new_tokens: int = 256
    findings_max_new_tokens: int = 384
    preload_samples: bool = False
    cache_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "longllava-apps")
    model_name: str = "model"

    def with_render_defaults(self, render: dict[str, Any]) -> AppConfig:
        """A copy with unset rendering options taken from a model's recorded ``render`` mapping."""
        aliases = {"size": "slice_size"}  # the training recipes' name for the slice side
        values = {aliases.get(key, key): value for key, value in render.items()}
        updates = {name: values[name] for name in RENDER_FIELDS
                   if name in values and getattr(self, name) is None and values[name] is not None}
        return replace(self, **updates)

    def export_dir(self) -> Path:
        path = Path(self.cache_dir) / "exports"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def sample_dir(self) -> Path:
        path = Path(self.cache_dir) / "samples"
        path.mkdir(parents=True, exist_ok=True)
        return path


def error_markdown(error: BaseException) -> str:
    """The message a user sees for ``error``: the text of a user error, never a traceback."""
    if isinstance(error, UserInputError):
        return f"**Error:** {strip_upload_dirs(str(error))}"
    return (
        f"**Internal error** ({type(error).__name__}). The request was not completed; the app is "
        "still running. Try again, or try another file; if it persists, report it with the server log."
    )


def log_error(error: BaseException, action: str) -> None:
    """Log an error without the user's paths: user errors by class only, others with a traceback."""
    if isinstance(error, UserInputError):
        LOG.info("%s: user input rejected (%s)", action, type(error).__name__)
    else:
        LOG.error("%s failed with %s", action, type(error).__name__, exc_info=error)


_ABSOLUTE_PATH_RE = re.compile(r"(?<![\w.~])(?:/[^/\s:'\"()]+)+/([^/\s:'\"()]+)")


def strip_upload_dirs(text: str) -> str:
    """Shorten absolute paths (Gradio's upload cache, server folders) to the file name."""
    return _ABSOLUTE_PATH_RE.sub(r"\1", text)


def guarded(action: str, n_outputs: int, status_index: int) -> Callable:
    """Decorate a Gradio handler so any exception becomes a readable status message.

    The handler returns a tuple of ``n_outputs`` values; on error every output except the status
    (at ``status_index``) is left unchanged (``gr.skip()``) and the status shows the message.
    Generator handlers are supported: values yielded before the error stay on the page.
    """
    import inspect

    import gradio as gr

    def failure(error: BaseException) -> tuple:
        log_error(error, action)
        values: list[Any] = [gr.skip()] * n_outputs
        values[status_index] = error_markdown(error)
        return tuple(values)

    def decorate(handler: Callable) -> Callable:
        if inspect.isgeneratorfunction(handler):

            @functools.wraps(handler)
            def generator_wrapper(*args: Any, **kwargs: Any):
                try:
                    yield from handler(*args, **kwargs)
                except Exception as error:  # every failure must end as a message, never a trace
                    yield failure(error)

            return generator_wrapper

        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any):
            try:
                return handler(*args, **kwargs)
            except Exception as error:
                return failure(error)

        return wrapper

    return decorate


def upload_paths(files: Any) -> list[Path]:
    """Normalise a Gradio ``File`` value (path, list of paths, or file objects) to paths."""
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)) or hasattr(files, "name"):
        files = [files]
    paths: list[Path] = []
    for item in files:
        if isinstance(item, dict):
            item = item.get("path") or item.get("name")
        elif hasattr(item, "name") and not isinstance(item, (str, os.PathLike)):
            item = item.name
        if item:
            paths.append(Path(item))
    return paths


def check_upload_size(paths: Iterable[Path], max_mb: float) -> None:
    """Reject uploads larger than the configured limit (Gradio also stops them in the browser)."""
    paths = list(paths)
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > max_mb * 1024 * 1024:
        raise AppInputError(
            f"upload is {total / 1024 / 1024:.1f} MB, over this app's limit of {max_mb:g} MB: "
            "upload a smaller study/image or start the app with a larger --max-upload-mb"
        )


EXPORT_MAX_AGE_S = 24 * 3600


def write_export(config: AppConfig, stem: str, suffix: str, text: str) -> Path:
    """Write an export file under the app's cache dir with a fresh, non-identifying name.

    Export folders older than a day are removed on the way, so the cache does not grow forever.
    """
    remove_old_exports(config.export_dir(), EXPORT_MAX_AGE_S)
    folder = config.export_dir() / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}{suffix}"
    path.write_text(text, encoding="utf-8")
    return path


def remove_old_exports(root: Path, max_age_s: float) -> int:
    """Delete export folders under ``root`` last modified more than ``max_age_s`` ago."""
    import shutil

    cutoff = time.time() - max_age_s
    removed = 0
    for folder in root.iterdir():
        if folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def resolve_auth(host: str) -> tuple[str, str] | None:
    """Credentials from the environment; required when binding to a non-loopback address."""
    user = os.environ.get(AUTH_USER_ENV, "")
    password = os.environ.get(AUTH_PASSWORD_ENV, "")
    if user and password:
        return (user, password)
    if user or password:
        raise AppInputError(
            f"only one of {AUTH_USER_ENV} / {AUTH_PASSWORD_ENV} is set: set both, or neither"
        )
    if host not in LOOPBACK_HOSTS:
        raise AppInputError(
            f"refusing to serve on {host} without a login: set {AUTH_USER_ENV} and {AUTH_PASSWORD_ENV} "
            "in the environment, or bind to 127.0.0.1"
        )
    return None


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process (this one by default) in MiB."""
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


def progress_bridge(progress: Callable | None) -> Callable[[int, int, str], None] | None:
    """Adapt a ``gr.Progress`` to the engine's ``(done, total, what)`` progress callback."""
    if progress is None:
        return None

    def report(done: int, total: int, what: str) -> None:
        unit = "tokens" if what.startswith(("generat", "decod")) else "chunks" if "prefill" in what else "images"
        progress((done, max(total, 1)), desc=what, unit=unit)

    return report


def with_progress(handler: Callable) -> Callable:
    """Expose ``handler``'s ``progress`` parameter to Gradio as a ``gr.Progress`` tracker.

    Handlers declare ``progress: Any = None`` so they stay callable (and testable) without Gradio;
    Gradio injects a tracker where the signature's default is a ``gr.Progress``.
    """
    import inspect

    import gradio as gr

    signature = inspect.signature(handler)
    parameters = [p.replace(default=gr.Progress()) if p.name == "progress" else p
                  for p in signature.parameters.values()]

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any):
            yield from handler(*args, **kwargs)

    else:

        @functools.wraps(handler)
        def wrapper(*args: Any, **kwargs: Any):
            return handler(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return wrapper


def report_progress(progress: Callable | None, fraction: float, what: str) -> None:
    """Update a progress tracker if there is one."""
    if progress is not None:
        progress(fraction, desc=what)
