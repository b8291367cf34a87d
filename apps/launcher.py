"""Build and serve the apps: both tabs on one page, or one app alone, with one shared model.

Serving rules: loopback (127.0.0.1) by default; any other address needs a login from the
environment (``LONGLLAVA_APP_USER`` / ``LONGLLAVA_APP_PASSWORD``); uploads are capped
(``max_file_size``); the Gradio queue runs at most ``concurrency_limit`` model calls at once and
holds at most ``queue_max_size`` waiting requests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from apps.common import AppConfig, AppInputError, resolve_auth
from apps.engine import SharedModel

LOG = logging.getLogger("longllava.apps")

APP_KINDS: tuple[str, ...] = ("ct", "rs")
TAB_TITLES = {"ct": "CT study", "rs": "Satellite image"}

PAGE_CSS = """
#ct-status, #rs-status, #ct-chat-status, #rs-chat-status { min-height: 1.5em; }
footer { display: none !important; }
"""


def build_app(shared: SharedModel | tuple[Any, Any], config: AppConfig | None = None,
              kinds: Sequence[str] = APP_KINDS):
    """A ``gr.Blocks`` page with a tab per app kind (``"ct"``, ``"rs"``), sharing one model.

    ``shared`` is a :class:`SharedModel` or a ``(model, processor)`` pair.
    """
    import gradio as gr

    from apps.ct_app import build_ct_tab
    from apps.rs_app import build_rs_tab

    shared = _as_shared(shared)
    config = config or AppConfig(model_name=shared.name)
    unknown = [kind for kind in kinds if kind not in APP_KINDS]
    if unknown or not kinds:
        raise AppInputError(f"unknown app {unknown or kinds!r}: choose from {', '.join(APP_KINDS)}")
    builders = {"ct": build_ct_tab, "rs": build_rs_tab}
    with gr.Blocks(title="LongLLaVA", delete_cache=(3600, 24 * 3600)) as app:
        gr.Markdown(f"## LongLLaVA: long visual inputs\nModel: `{shared.name}`. "
                    "Research use only, not for diagnosis.")
        if shared.notice:
            gr.Markdown(f"**About this model** (from its model card): {shared.notice}", elem_id="model-notice")
        sample_events = []
        if len(kinds) == 1:
            sample_events.append(builders[kinds[0]](shared, config))
        else:
            with gr.Tabs():
                for kind in kinds:
                    with gr.Tab(TAB_TITLES[kind], elem_id=f"tab-{kind}"):
                        sample_events.append(builders[kind](shared, config))
        if config.preload_samples:  # every new page opens with the samples loaded, ready to ask about
            for event in sample_events:
                app.load(**event, api_name=False)
    app.queue(default_concurrency_limit=config.concurrency_limit, max_size=config.queue_max_size)
    return app


def _as_shared(shared: SharedModel | tuple[Any, Any]) -> SharedModel:
    if isinstance(shared, SharedModel):
        return shared
    model, processor = shared
    return SharedModel(model=model, processor=processor)


def apply_model_defaults(config: AppConfig, model_path: str) -> AppConfig:
    """Fill unset rendering options from the model folder's ``longllava_defaults.json`` (if any)."""
    from finetune.evaluate import model_render_defaults

    render = model_render_defaults(model_path)
    if render:
        LOG.info("rendering options recorded with the model: %s", render)
    return config.with_render_defaults(render)


def launch_app(app: Any, config: AppConfig, host: str = "127.0.0.1", port: int = 7860,
               block: bool = True) -> Any:
    """Serve ``app``; refuses a non-loopback address unless a login is configured."""
    auth = resolve_auth(host)
    LOG.info("serving on http://%s:%d (login %s)", host, port, "required" if auth else "off")
    return app.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        max_file_size=f"{config.max_upload_mb:g}mb",
        show_error=False,
        share=False,
        prevent_thread_lock=not block,
        quiet=True,
        css=PAGE_CSS,
        allowed_paths=[str(config.export_dir())],
        footer_links=[],
    )
