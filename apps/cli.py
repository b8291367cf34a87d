"""``longllava app [ct|rs] --model DIR|demo``: serve the CT app, the satellite app, or both in tabs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "app",
        help="serve the Gradio apps (CT studies, satellite images, or both in tabs)",
        description="Serve the CT app, the satellite app, or both (default) on one page with one shared "
        "model. Binds to 127.0.0.1 unless --host says otherwise; any other address needs "
        "LONGLLAVA_APP_USER and LONGLLAVA_APP_PASSWORD in the environment.",
    )
    parser.add_argument("kind", nargs="?", choices=["ct", "rs"], default=None,
                        help="one app only: ct (CT studies) or rs (satellite images); default both tabs")
    parser.add_argument("--model", required=True, metavar="DIR|demo", help="model folder, or 'demo' for the bundled one")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload accepted (MB)")
    parser.add_argument("--concurrency", type=int, default=2, help="model calls running at once (queue limit)")
    parser.add_argument("--queue-size", type=int, default=64, help="requests allowed to wait in the queue")
    parser.add_argument("--num-slices", type=int, default=None,
                        help="CT slices given to the model, resampled along z (default: what the model folder's "
                        "longllava_defaults.json records, else the study's own count clipped to 100-984)")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="tile budget for satellite images (default: the model folder's, else 64)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    parser.add_argument("--cache-dir", default=None, help="where samples and exports are written "
                        "(default: a folder in the system temp dir)")
    parser.add_argument("--preload-samples", action="store_true",
                        help="open every page with the sample CT study and satellite image already loaded")
    parser.set_defaults(func=run_app)


def config_from_args(args: argparse.Namespace):
    from apps.common import AppConfig, AppInputError

    for name in ("concurrency", "queue_size", "max_tiles", "max_new_tokens", "num_slices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AppInputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.max_upload_mb <= 0:
        raise AppInputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    config = AppConfig(
        max_upload_mb=args.max_upload_mb,
        concurrency_limit=args.concurrency,
        queue_max_size=args.queue_size,
        num_slices=args.num_slices,
        max_tiles=args.max_tiles,
        max_new_tokens=args.max_new_tokens,
        preload_samples=args.preload_samples,
    )
    if args.cache_dir:
        config.cache_dir = Path(args.cache_dir)
    return config


def run_app(args: argparse.Namespace) -> int:
    import logging

    from apps.common import resolve_auth
    from apps.engine import load_shared_model
    from apps.launcher import APP_KINDS, apply_model_defaults, build_app, launch_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = config_from_args(args)
    resolve_auth(args.host)  # fail before the model loads
    shared = load_shared_model(args.model, device=args.device)
    config = apply_model_defaults(config, args.model)
    config.model_name = shared.name
    if config.preload_samples:  # render the samples now, not on the first page load
        from apps.samples import sample_ct_study, sample_raster

        sample_ct_study(config.sample_dir())
        sample_raster(config.sample_dir())
    kinds = (args.kind,) if args.kind else APP_KINDS
    app = build_app(shared, config, kinds=kinds)
    print(f"LongLLaVA app ({', '.join(kinds)}) with model {shared.name} on http://{args.host}:{args.port}",
          flush=True)
    launch_app(app, config, host=args.host, port=args.port, block=True)
    return 0
