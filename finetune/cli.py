"""``longllava finetune``, ``longllava merge-lora``, ``longllava evaluate`` and ``longllava probe-images``."""

from __future__ import annotations

import argparse
import os
import sys

EVAL_TASKS = ("ct-rate", "fit-rsfg", "closed-vqa", "niah")


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_finetune(subparsers)
    _register_merge(subparsers)
    _register_evaluate(subparsers)
    _register_probe(subparsers)


def _register_finetune(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="train a LongLLaVA model with a recipe (LoRA or full; stages align/sft/multi/vision)",
        description="Train with a recipe from finetune/recipes (pubmedvision_lora, pubmedvision_full, "
        "skysense_lora, ct_rate_lora; demo_vision, demo_warmup, demo, demo_polish: the demo model's four "
        "stages) "
        "or a YAML path; override any recipe key with key=value. "
        "Writes checkpoints, loss.csv and loss.png to output_dir. Under `deepspeed`, `torchrun` or "
        "`accelerate launch` each process runs this command (see README, multi-node).",
    )
    parser.add_argument("recipe", help="recipe name or path to a .yaml recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. max_steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--json", action="store_true", help="print the run summary as JSON")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run_finetune)


def _register_merge(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge-lora",
        help="merge a LoRA adapter into its base model and save a plain model folder",
        description="Load the base model recorded in ADAPTER/adapter_config.json (or --base), apply the "
        "adapter, fold it into the weights and save model + processor to --out.",
    )
    parser.add_argument("adapter", help="the adapter folder of a LoRA run (OUTPUT/adapter)")
    parser.add_argument("--out", required=True, help="folder for the merged model")
    parser.add_argument("--base", default=None, help="base model folder (default: from the adapter config)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run_merge)


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on CT-RATE, FIT-RSFG, closed VQA or needle-in-a-haystack",
        description="Run the model over a dataset (batched; resumable: predictions.jsonl is appended and "
        "finished items are skipped on a rerun), then write metrics.json, report.md and a chart PNG to --out.",
    )
    parser.add_argument("task", choices=EVAL_TASKS)
    parser.add_argument("--model", required=True, help="model folder, LoRA adapter folder, or 'demo'")
    parser.add_argument("--data", required=True, help="dataset file or folder for the task")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (finetune.evaluate.DEFAULT_MAX_NEW_TOKENS)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items")
    parser.add_argument("--split", default=None, help="dataset split where the task has several")
    parser.add_argument("--render", default=None, metavar="YAML",
                        help="CT / raster options, e.g. '{num_slices: 64, max_tiles: 36}' (default: the model's "
                        "longllava_defaults.json, else the domain defaults)")
    parser.add_argument("--long-context-tokens", type=int, default=8192,
                        help="prompts longer than this run one at a time with chunked prefill (default 8192)")
    parser.add_argument("--json", action="store_true", help="print metrics as JSON")
    parser.set_defaults(func=run_evaluate)


def run_finetune(args: argparse.Namespace) -> int:
    from finetune.train import _is_main_process, load_recipe, run_training

    recipe = load_recipe(args.recipe, args.overrides)
    summary = run_training(recipe, resume=args.resume)
    if _is_main_process():  # one summary per run
        if args.json:
            from longllava.cli import print_json

            print_json(summary)
        else:
            print(f"trained {recipe.name} ({recipe.mode}, {recipe.stage}) for {summary['global_step']} steps; "
                  f"loss {summary['first_loss']} -> {summary['last_loss']}; saved to {summary['saved_to']}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        end_rank_process()
    return 0


def end_rank_process(code: int = 0) -> None:
    """End one rank of a finished multi-process run without interpreter finalization.

    torch's gloo worker threads outlive `destroy_process_group` (the Python side still references the group),
    and one of them may be freeing a finished collective's tensors when the interpreter finalizes; taking the
    GIL then ends the thread through a C++ frame and aborts the rank ("terminate called without an active
    exception", SIGABRT after everything was saved). A core dump of such a rank shows a gloo `runLoop` thread in
    `~AsyncBarrierWork` -> `~AsyncAllgatherWork` -> `decref_pyobject` -> `take_gil` -> `pthread_exit` while the
    main thread is in `Py_FinalizeEx`. Two-rank DeepSpeed CPU runs aborted so in 1 of 6 before this function
    and 0 of 14 with it. Everything the run writes is saved and closed by now, so flush what is buffered and
    leave with `os._exit`."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_merge(args: argparse.Namespace) -> int:
    from finetune.merge import merge_lora

    out = merge_lora(args.adapter, args.out, base=args.base)
    if args.json:
        from longllava.cli import print_json

        print_json({"merged_to": str(out)})
    else:
        print(f"merged {args.adapter} into {out}")
    return 0


def _register_probe(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "probe-images",
        help="check that a model's answers depend on its images (own vs swapped images)",
        description="For training-format records, compare the answer loss with each record's own images and "
        "with another record's (same image count): a model that reads the pictures does worse with the wrong "
        "ones. Prints the mean gap with a bootstrap 95%% interval and a verdict; --out writes the per-record "
        "losses as image_reliance.json.",
    )
    parser.add_argument("--model", required=True, help="model folder or 'demo'")
    parser.add_argument("--data", required=True, help="training-format records (.json / .jsonl)")
    parser.add_argument("--limit", type=int, default=40, help="records to probe (default 40; 0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for image_reliance.json")
    parser.add_argument("--json", action="store_true", help="print the result (without per-record rows) as JSON")
    parser.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from finetune.probe import image_reliance, write_result

    result = image_reliance(args.model, args.data, limit=args.limit or None, seed=args.seed,
                            show_progress=not args.json)
    if args.out:
        write_result(result, args.out)
    if args.json:
        from longllava.cli import print_json

        print_json({k: v for k, v in asdict(result).items() if k != "per_record"})
    else:
        print(result.summary_line())
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import yaml

    from finetune import FinetuneError
    from finetune.evaluate import evaluate

    render = yaml.safe_load(args.render) if args.render else None
    if render is not None and not isinstance(render, dict):
        raise FinetuneError(f"--render {args.render!r}: give a YAML mapping, e.g. '{{num_slices: 64}}'")
    result = evaluate(args.task, args.model, args.data, args.out, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, limit=args.limit, split=args.split, render=render,
                      long_context_tokens=args.long_context_tokens)
    if args.json:
        from longllava.cli import print_json

        print_json(result.metrics)
    else:
        print(result.summary_line())
    return 0
