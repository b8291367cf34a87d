"""``longllava bench {scan,scaling,images,train,gpu}``: performance figures printed as side-by-side tables.

Every bench prints a table (or one JSON document with ``--json``) and measures, never assumes:

* ``scan``: transformers' Jamba slow-path selective scan vs :func:`longllava.scan.selective_scan` at
  4k and 16k tokens (d_inner 512, d_state 16): seconds, speed-up, max relative error, forward and
  forward+backward. transformers' backward is quadratic in the length (autograd of its per-step
  slices of a (b, d, L, n) tensor); above ``--max-ref-backward-tokens`` its time is extrapolated
  from the largest measured length (marked ``est.``), and the linear-time step-by-step PyTorch
  reference (:func:`longllava.scan.selective_scan_ref`) is measured for real beside it.
* ``scaling``: prefill seconds per token of a demo-width hybrid Jamba (1 attention layer in
  ``--attention-every`` = 8, LongLLaVA's 1:7 ratio, whatever the preset's own layout) and a
  pure-attention model of the same width and depth (``attn_layer_period=1``), side by side, with the
  peak RSS of each run; runs whose estimated time exceeds ``--budget-s`` are skipped and say so.
* ``images``: N images through the demo preset (random weights) with :class:`LongContextSession`:
  wall time, tokens/s and peak RSS per N, and the RSS growth between the two largest N.
* ``train``: one training step (frozen vision tower, projector and LLM trained) on N images and an answer,
  the LM head over every position (the stock Hugging Face loss), only where an answer token is
  predicted (``finetune.train``'s ``logits_to_keep``), and that with the frozen tower's features read
  from a warm :class:`~longllava.modeling.TowerFeatureCache` (what ``longllava finetune`` does on the CPU
  once it has seen an image), side by side: seconds per step, peak RSS (CPU) or peak GPU memory, and the
  relative difference of the loss and of the gradient norm from the stock step.
* ``gpu``: CUDA only: 9B-shape random weights, 100k-token prefill, decode tokens/s, peak GPU memory
  and the planner's largest image count for the card.

Runs are isolated in fresh processes (``spawn``) so that each peak RSS belongs to one run; pass
``--in-process`` to skip that (tests, quick looks). Other processes on the machine share its cores:
the tables print the CPU count and load average next to the figures.
"""

from __future__ import annotations

import argparse
import inspect
import math
import multiprocessing
import os
import platform
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

# ----------------------------------------------------------------------------------------------------
# CLI registration (cheap: no torch import)
# ----------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="performance benchmarks (scan, scaling, images, train, gpu)")
    benches = parser.add_subparsers(dest="bench", metavar="BENCH")
    benches.required = True

    scan = _add_bench(benches, "scan", "transformers' Jamba scan vs the project scan", run_scan_command)
    scan.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (4096 16384)")
    scan.add_argument("--d-inner", type=int, default=None, help="channels (512)")
    scan.add_argument("--d-state", type=int, default=16)
    scan.add_argument("--max-ref-backward-tokens", type=int, default=1024,
                      help="measure transformers' quadratic backward up to this length, extrapolate above")
    scan.add_argument("--quick", action="store_true", help="CI size: default lengths 256 1024, d_inner 64")

    scaling = _add_bench(benches, "scaling", "prefill time/token: hybrid vs pure attention", run_scaling_command)
    scaling.add_argument("--lengths", type=int, nargs="+", default=None, help="prompt lengths (8192 32768 131072)")
    scaling.add_argument("--budget-s", type=float, default=300.0, help="skip runs estimated to take longer")
    scaling.add_argument("--preset", default="demo", help="model shape (a LongLlavaConfig preset)")
    scaling.add_argument("--attention-every", type=int, default=8,
                         help="the hybrid's layout: one attention layer in N (8: LongLLaVA's 1:7)")
    scaling.add_argument("--quick", action="store_true", help="toy size: 2 layers, default lengths 256 512")

    images = _add_bench(benches, "images", "N images through the demo preset", run_images_command)
    images.add_argument("--counts", type=int, nargs="+", default=None, help="image counts (10 100 1000)")
    images.add_argument("--preset", default=None, help="model preset (demo)")
    images.add_argument("--image-batch-size", type=int, default=32)
    images.add_argument("--chunk-tokens", type=int, default=8192)
    images.add_argument("--max-new-tokens", type=int, default=16)
    images.add_argument("--quick", action="store_true", help="toy size: tiny preset, default counts 2 4")

    train = _add_bench(benches, "train", "a training step: LM head on every position vs answer positions only",
                       run_train_command)
    train.add_argument("--images", type=int, nargs="+", default=None, help="images per sequence (16 200)")
    train.add_argument("--preset", default=None, help="model preset (demo)")
    train.add_argument("--answer-tokens", type=int, default=64, help="supervised tokens at the end")
    train.add_argument("--vocab", type=int, default=65536,
                       help="output vocabulary (65,536: Jamba's, as in LongLLaVA-9B; the demo model has 4,096)")
    train.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    train.add_argument("--quick", action="store_true", help="toy size: tiny preset, default images 4")

    gpu = _add_bench(benches, "gpu", "9B shape on CUDA: 100k-token prefill, decode, memory", run_gpu_command)
    gpu.add_argument("--preset", default="9b")
    gpu.add_argument("--prefill-tokens", type=int, default=100_000)
    gpu.add_argument("--decode-tokens", type=int, default=64)
    gpu.add_argument("--chunk-tokens", type=int, default=8192)


def _add_bench(benches, name: str, help_text: str, func: Callable) -> argparse.ArgumentParser:
    parser = benches.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--in-process", action="store_true", help="run in this process (RSS less precise)")
    parser.set_defaults(func=func)
    return parser


# ----------------------------------------------------------------------------------------------------
# shared helpers: machine description, isolated runs, peak RSS, tables
# ----------------------------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _RssSampler:
    """Peak RSS during a block, sampled every 20 ms (for --in-process runs)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _child(queue, function_name: str, kwargs: dict[str, Any]) -> None:
    try:
        result = globals()[function_name](**kwargs)
        result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        queue.put(("ok", result))
    except BaseException as error:  # reported to the parent, which raises it
        queue.put(("error", f"{type(error).__name__}: {error}"))


def run_isolated(function: Callable[..., dict], in_process: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run ``function(**kwargs)`` (a module-level function returning a dict) and add its peak RSS.

    Default: in a fresh spawned process, whose lifetime peak RSS is the run's. ``in_process``: here,
    with a sampling thread (the peak then includes what this process already held).
    """
    if in_process:
        with _RssSampler() as sampler:
            result = function(**kwargs)
        result["peak_rss_mb"] = round(sampler.peak / 2**20, 1)
        return result
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, function.__name__, kwargs))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark run {function.__name__}({kwargs}) failed: {payload}")
    return payload


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 0.01:
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.1e}"
    return str(value)


def _emit(args: argparse.Namespace, payload: dict[str, Any], table: str, notes: list[str]) -> None:
    if args.json:
        from longllava.cli import print_json

        print_json(payload)
        return
    machine = payload["machine"]
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['memory_gb']} GB, load {machine['load_average_1m']}"
          f", torch {machine['torch']} ({machine['torch_threads']} threads)")
    print(table)
    for note in notes:
        print(f"note: {note}")


def _timed(function: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


# ----------------------------------------------------------------------------------------------------
# bench scan
# ----------------------------------------------------------------------------------------------------


def _scan_inputs(length: int, d_inner: int, d_state: int, seed: int = 0) -> dict[str, Any]:
    """Seeded inputs shaped and scaled like Jamba's mixer feeds them (softplus time step, gate, D)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "u": randn(1, d_inner, length),
        "delta": randn(1, d_inner, length) * 0.5 - 2.0,
        "A": -torch.exp(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, d_state)),
        "B": randn(1, d_state, length),
        "C": randn(1, d_state, length),
        "D": torch.ones(d_inner),
        "z": randn(1, d_inner, length),
        "delta_bias": randn(d_inner) * 0.1,
    }


def _transformers_scan() -> Callable:
    """transformers' PyTorch slow path itself (unwrapped from any kernel-hub / mamba-ssm dispatch)."""
    from longllava.scan import original_jamba_scan

    return inspect.unwrap(original_jamba_scan())


def _scan_call(function: Callable, inputs: dict[str, Any], grad: bool):
    import torch

    leaves = {k: v.clone().requires_grad_(grad) for k, v in inputs.items()}
    with torch.set_grad_enabled(grad):
        out = function(
            leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"], z=leaves["z"],
            delta_bias=leaves["delta_bias"], delta_softplus=True,
        )
        if grad:
            out.float().square().mean().backward()
    grads = {k: v.grad for k, v in leaves.items()} if grad else {}
    return out.detach(), grads


def _max_relative_error(actual, expected) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12))


def scan_run(length: int, d_inner: int, d_state: int, max_ref_backward_tokens: int) -> dict[str, Any]:
    """Times and errors of one length: forward and forward+backward, three implementations."""
    from longllava.scan import selective_scan, selective_scan_ref

    warm = _scan_inputs(300, d_inner, d_state)
    _scan_call(selective_scan, warm, grad=True)  # numba kernels: load or compile before timing
    inputs = _scan_inputs(length, d_inner, d_state)
    transformers_scan = _transformers_scan()
    ref_fwd_s, (ref_out, _) = _timed(lambda: _scan_call(transformers_scan, inputs, grad=False))
    ours_fwd_s = min(_timed(lambda: _scan_call(selective_scan, inputs, grad=False))[0] for _ in range(3))
    ours_out, _ = _scan_call(selective_scan, inputs, grad=False)
    ours_bwd_s, (ours_out_g, ours_grads) = min(
        (_timed(lambda: _scan_call(selective_scan, inputs, grad=True)) for _ in range(2)), key=lambda r: r[0]
    )
    stepwise_bwd_s, (step_out, step_grads) = _timed(lambda: _scan_call(selective_scan_ref, inputs, grad=True))
    measured_len = min(length, max_ref_backward_tokens)
    small = _scan_inputs(measured_len, d_inner, d_state)
    ref_bwd_measured_s, _ = _timed(lambda: _scan_call(transformers_scan, small, grad=True))
    grad_errors = {k: _max_relative_error(ours_grads[k], step_grads[k]) for k in ours_grads}
    return {
        "length": length,
        "forward": {
            "transformers_s": ref_fwd_s,
            "project_s": ours_fwd_s,
            "speedup": ref_fwd_s / ours_fwd_s,
            "max_rel_error_vs_transformers": _max_relative_error(ours_out, ref_out),
        },
        "forward_backward": {
            "transformers_s": ref_bwd_measured_s * (length / measured_len) ** 2,
            "transformers_measured": measured_len == length,
            "transformers_measured_at": {"length": measured_len, "seconds": ref_bwd_measured_s},
            "stepwise_reference_s": stepwise_bwd_s,
            "project_s": ours_bwd_s,
            "speedup_vs_transformers": ref_bwd_measured_s * (length / measured_len) ** 2 / ours_bwd_s,
            "speedup_vs_stepwise_reference": stepwise_bwd_s / ours_bwd_s,
            "max_rel_error_output": _max_relative_error(ours_out_g, step_out),
            "max_rel_error_grads": max(grad_errors.values()),
            "max_rel_error_per_grad": grad_errors,
        },
    }


def run_scan_command(args: argparse.Namespace) -> int:
    lengths = args.lengths or ([256, 1024] if args.quick else [4096, 16384])
    d_inner = args.d_inner or (64 if args.quick else 512)
    runs = [
        run_isolated(scan_run, args.in_process, length=length, d_inner=d_inner, d_state=args.d_state,
                     max_ref_backward_tokens=args.max_ref_backward_tokens)
        for length in lengths
    ]
    payload = {"bench": "scan", "machine": machine_description(), "d_inner": d_inner, "d_state": args.d_state,
               "batch": 1, "runs": runs}
    rows = []
    for run in runs:
        fwd, both = run["forward"], run["forward_backward"]
        rows.append([run["length"], "forward", fwd["transformers_s"], None, fwd["project_s"], f"{fwd['speedup']:.1f}x",
                     None, fwd["max_rel_error_vs_transformers"]])
        estimate = "" if both["transformers_measured"] else " est."
        rows.append([run["length"], "fwd+bwd", f"{_cell(both['transformers_s'])}{estimate}",
                     both["stepwise_reference_s"], both["project_s"], f"{both['speedup_vs_transformers']:.0f}x{estimate}",
                     f"{both['speedup_vs_stepwise_reference']:.1f}x", max(both["max_rel_error_output"],
                                                                           both["max_rel_error_grads"])])
    headers = ["tokens", "pass", "transformers s", "stepwise ref s", "project s", "vs transformers",
               "vs stepwise", "max rel err"]
    notes = [
        f"d_inner {d_inner}, d_state {args.d_state}, batch 1, float32; times are seconds per call (best of 2-3 "
        "for the project scan); errors are max |diff| / max |reference| (fwd+bwd: outputs and all gradients vs "
        "the stepwise reference).",
        "transformers' backward is quadratic in length; 'est.' = extrapolated as L^2 from "
        f"{args.max_ref_backward_tokens} tokens, where it was measured.",
    ]
    _emit(args, payload, format_table(headers, rows), notes)
    return 0


# ----------------------------------------------------------------------------------------------------
# bench scaling
# ----------------------------------------------------------------------------------------------------


def _text_config(preset: str, pure_attention: bool, quick: bool, attention_every: int = 8):
    from longllava.config import LongLlavaConfig
    from longllava.errors import ModelInputError

    text = LongLlavaConfig.from_preset(preset).text_config
    if not 1 <= attention_every <= 2 * text.num_hidden_layers - 1:
        raise ModelInputError(f"--attention-every {attention_every}: choose 1..{2 * text.num_hidden_layers - 1} "
                              f"(one attention layer in N of the {text.num_hidden_layers} layers)")
    text.attn_layer_period, text.attn_layer_offset = attention_every, attention_every // 2
    if quick:
        text.num_hidden_layers = 2
        text.attn_layer_period, text.attn_layer_offset = 2, 1
    if pure_attention:
        text.attn_layer_period, text.attn_layer_offset = 1, 0
    text.max_position_embeddings = max(text.max_position_embeddings, 1 << 20)
    return text


def _attention_chunk(text_config, length: int) -> int:
    """Chunk length whose attention-score matrix (heads x chunk x length, fp32) stays under 1 GiB."""
    budget = (1 << 30) // (4 * text_config.num_attention_heads * length)
    return int(max(256, min(8192, 1 << max(8, int(math.log2(max(budget, 1)))))))


def scaling_run(preset: str, pure_attention: bool, length: int, quick: bool,
                attention_every: int = 8) -> dict[str, Any]:
    """Prefill ``length`` random embeddings through a random Jamba body in chunks; seconds per token."""
    import torch
    from transformers import JambaModel
    from transformers.cache_utils import DynamicCache

    from longllava.scan import install_fast_scan

    install_fast_scan()
    torch.manual_seed(0)
    text = _text_config(preset, pure_attention, quick, attention_every)
    model = JambaModel(text).eval()
    chunk = _attention_chunk(text, length)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():  # warm-up: numba kernels loaded, allocator primed
        model(inputs_embeds=torch.zeros(1, 64, text.hidden_size), past_key_values=DynamicCache(config=text))
    cache = DynamicCache(config=text)
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, length, chunk):
            size = min(chunk, length - start)
            embeds = torch.randn(1, size, text.hidden_size, generator=generator) * 0.02
            model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    seconds = time.perf_counter() - started
    return {
        "model": "pure attention" if pure_attention else "hybrid",
        "layers": text.num_hidden_layers,
        "attention_layers": sum(t == "attention" for t in text.layers_block_type),
        "length": length,
        "chunk": chunk,
        "seconds": seconds,
        "ms_per_token": 1000 * seconds / length,
    }


def run_scaling_command(args: argparse.Namespace) -> int:
    lengths = args.lengths or ([256, 512] if args.quick else [8192, 32768, 131072])
    runs: list[dict[str, Any]] = []
    for pure_attention in (False, True):
        previous: dict[str, Any] | None = None
        for length in lengths:
            name = "pure attention" if pure_attention else "hybrid"
            estimate = previous["seconds"] * (length / previous["length"]) ** 2 if previous else 0.0
            if estimate > args.budget_s:
                runs.append({"model": name, "length": length, "skipped": f"estimated {estimate:.0f} s > budget "
                             f"{args.budget_s:.0f} s (quadratic extrapolation from {previous['length']} tokens)"})
                continue
            previous = run_isolated(scaling_run, args.in_process, preset=args.preset, pure_attention=pure_attention,
                                    length=length, quick=args.quick, attention_every=args.attention_every)
            runs.append(previous)
    payload = {"bench": "scaling", "machine": machine_description(), "preset": args.preset,
               "attention_every": args.attention_every, "runs": runs}
    by_key = {(r["model"], r["length"]): r for r in runs}
    rows = []
    for length in lengths:
        hybrid, attention = by_key[("hybrid", length)], by_key[("pure attention", length)]
        rows.append([length, _ms(hybrid), hybrid.get("peak_rss_mb"), _ms(attention), attention.get("peak_rss_mb"),
                     _ratio(attention, hybrid)])
    headers = ["tokens", "hybrid ms/token", "hybrid peak RSS MB", "attention ms/token", "attention peak RSS MB",
               "attention/hybrid"]
    notes = [f"{args.preset} text shape, random weights, float32, chunked prefill (chunk so that one chunk's "
             "attention scores stay < 1 GiB); time/token growth with length is the figure to read."]
    notes += [f"{r['model']} {r['length']}: skipped, {r['skipped']}" for r in runs if "skipped" in r]
    first = {m: next((r for r in runs if r["model"] == m and "seconds" in r), None) for m in ("hybrid", "pure attention")}
    for model, base in first.items():
        last = next((r for r in reversed(runs) if r["model"] == model and "seconds" in r), None)
        if base and last and last is not base:
            notes.append(f"{model}: time/token x{last['ms_per_token'] / base['ms_per_token']:.2f} from "
                         f"{base['length']} to {last['length']} tokens")
    _emit(args, payload, format_table(headers, rows), notes)
    return 0


def _ms(run: dict[str, Any]) -> float | str:
    return run["ms_per_token"] if "ms_per_token" in run else "skipped"


def _ratio(attention: dict[str, Any], hybrid: dict[str, Any]) -> str | None:
    if "ms_per_token" in attention and "ms_per_token" in hybrid:
        return f"{attention['ms_per_token'] / hybrid['ms_per_token']:.2f}x"
    return None


# ----------------------------------------------------------------------------------------------------
# bench images
# ----------------------------------------------------------------------------------------------------


def _synthetic_images(count: int, seed: int = 0, size: tuple[int, int] = (192, 240)):
    """Seeded random RGB images, made one at a time (a generator: never all in memory)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def images_run(preset: str, count: int, image_batch_size: int, chunk_tokens: int, max_new_tokens: int) -> dict:
    import torch

    from longllava import protocol
    from longllava.loading import build_model
    from longllava.session import LongContextSession
    from longllava.tokenizer import build_tokenizer

    started = time.perf_counter()
    model, processor = build_model(preset, build_tokenizer(vocab_size=4096), seed=0)
    setup_s = time.perf_counter() - started
    session = LongContextSession(model, processor, image_batch_size=image_batch_size, chunk_tokens=chunk_tokens)
    messages = [{"role": "user", "content": protocol.series_prompt(count) + "\nWhat changes across the series?"}]
    warm_up = [{"role": "user", "content": protocol.series_prompt(1) + "\nWarm up."}]
    session.generate(warm_up, _synthetic_images(1, seed=1), max_new_tokens=2)  # numba kernels loaded
    started = time.perf_counter()
    with torch.inference_mode():
        answer = session.generate(messages, _synthetic_images(count), max_new_tokens=max_new_tokens)
    wall_s = time.perf_counter() - started
    stats = session.stats
    return {
        "preset": preset,
        "images": count,
        "prompt_tokens": stats.prompt_tokens,
        "tokens_per_image": processor.tokens_per_image,
        "wall_s": wall_s,
        "model_setup_s": setup_s,
        "image_encode_s": stats.image_seconds,
        "prefill_s": stats.prefill_seconds,
        "decode_s": stats.decode_seconds,
        "new_tokens": stats.new_tokens,
        "prompt_tokens_per_s": stats.prompt_tokens / wall_s,
        "prefill_tokens_per_s": stats.prefill_tokens_per_second,
        "decode_tokens_per_s": stats.decode_tokens_per_second,
        "answer_chars": len(answer),
    }


def run_images_command(args: argparse.Namespace) -> int:
    preset = args.preset or ("tiny" if args.quick else "demo")
    counts = args.counts or ([2, 4] if args.quick else [10, 100, 1000])
    runs = [
        run_isolated(images_run, args.in_process, preset=preset, count=count, image_batch_size=args.image_batch_size,
                     chunk_tokens=args.chunk_tokens, max_new_tokens=args.max_new_tokens)
        for count in counts
    ]
    payload = {"bench": "images", "machine": machine_description(), "preset": preset, "runs": runs}
    if len(runs) >= 2:
        payload["rss_growth"] = {"from": runs[-2]["images"], "to": runs[-1]["images"],
                                 "ratio": runs[-1]["peak_rss_mb"] / runs[-2]["peak_rss_mb"]}
    rows = [[r["images"], r["prompt_tokens"], r["wall_s"], r["image_encode_s"], r["prefill_s"], r["decode_s"],
             r["prompt_tokens_per_s"], r["peak_rss_mb"]] for r in runs]
    headers = ["images", "prompt tokens", "wall s", "encode s", "prefill s", "decode s", "tokens/s", "peak RSS MB"]
    notes = [f"{preset} preset, random weights, float32; image batch {args.image_batch_size}, prefill chunk "
             f"{args.chunk_tokens} tokens, {args.max_new_tokens} new tokens; tokens/s = prompt tokens / wall time; "
             "peak RSS of the whole process (Python, torch, model included)."]
    if "rss_growth" in payload:
        growth = payload["rss_growth"]
        notes.append(f"peak RSS growth {growth['from']} -> {growth['to']} images: x{growth['ratio']:.2f}")
    _emit(args, payload, format_table(headers, rows), notes)
    return 0


# ----------------------------------------------------------------------------------------------------
# bench train
# ----------------------------------------------------------------------------------------------------


def _train_batch(processor, config, images: int, answer_tokens: int, device) -> dict[str, Any]:
    """One sequence: ``images`` image placeholders (expanded), a short prompt, ``answer_tokens`` supervised."""
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = config.text_config.vocab_size
    image_ids = torch.full((images * processor.tokens_per_image,), config.image_token_id)
    prompt = torch.randint(3, vocab - 1, (32,), generator=generator)
    answer = torch.randint(3, vocab - 1, (answer_tokens,), generator=generator)
    prompt[prompt == config.image_token_id], answer[answer == config.image_token_id] = 3, 3  # text only
    input_ids = torch.cat([prompt[:16], image_ids, prompt[16:], answer])[None]  # (1, seq)
    labels = torch.full_like(input_ids, -100)
    labels[0, -answer_tokens:] = answer
    size = config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=generator)
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixels.to(device), "labels": labels.to(device)}


def _train_step(model, batch: dict[str, Any], logits: str):
    """Loss and trainable-parameter gradients of one step; ``logits`` 'all' (stock HF loss) or 'answer'."""
    import torch

    from finetune.train import answer_loss

    loss = model(**batch).loss if logits == "all" else answer_loss(model, batch)[0]
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, trainable)


def train_step_run(preset: str, images: int, answer_tokens: int, logits: str, steps: int,
                   vocab: int = 65536, tower_cache: bool = False) -> dict[str, Any]:
    """Seconds per training step and peak memory with the LM head on ``logits`` positions (see module doc);
    with ``tower_cache`` the warm-up step fills a :class:`TowerFeatureCache` the timed steps read."""
    import torch

    from longllava.loading import build_model
    from longllava.modeling import TowerFeatureCache
    from longllava.scan import install_fast_scan
    from longllava.tokenizer import build_tokenizer

    install_fast_scan()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = build_model(preset, build_tokenizer(vocab_size=4096), seed=0)
    model.resize_token_embeddings(vocab)  # the tokenizer's ids stay; the LM head grows to ``vocab`` rows
    model = model.to(device).train()
    model.model.vision_tower.requires_grad_(False)  # the stages after the vision stage keep the tower frozen
    model.model.tower_feature_cache = TowerFeatureCache() if tower_cache else None
    batch = _train_batch(processor, model.config, images, answer_tokens, device)
    loss, grads = _train_step(model, batch, logits)  # warm-up: numba kernels loaded, allocator primed
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        loss, grads = _train_step(model, batch, logits)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    checksum = torch.stack([grad.double().square().sum() for grad in grads]).sum().sqrt()
    return {
        "logits": logits,
        "tower_cache": tower_cache,
        "images": images,
        "tokens": int(batch["input_ids"].shape[1]),
        "answer_tokens": answer_tokens,
        "vocab": model.config.text_config.vocab_size,
        "seconds_per_step": seconds,
        "loss": float(loss),
        "grad_norm": float(checksum),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
    }


def run_train_command(args: argparse.Namespace) -> int:
    preset = args.preset or ("tiny" if args.quick else "demo")
    counts = args.images or ([4] if args.quick else [16, 200])
    variants = [("all", False), ("answer", False), ("answer", True)]
    runs = [
        run_isolated(train_step_run, args.in_process, preset=preset, images=count, answer_tokens=args.answer_tokens,
                     logits=logits, steps=args.steps, vocab=args.vocab, tower_cache=tower_cache)
        for count in counts for logits, tower_cache in variants
    ]
    payload = {"bench": "train", "machine": machine_description(), "preset": preset, "runs": runs}
    memory_key = "peak_gpu_memory_gb" if runs[0]["peak_gpu_memory_gb"] is not None else "peak_rss_mb"
    rows = []
    for full, kept, cached in zip(runs[::3], runs[1::3], runs[2::3]):
        rows.append([full["images"], full["tokens"], full["seconds_per_step"], kept["seconds_per_step"],
                     cached["seconds_per_step"], f"{kept['seconds_per_step'] / full['seconds_per_step']:.2f}x",
                     f"{cached['seconds_per_step'] / full['seconds_per_step']:.2f}x", full[memory_key],
                     kept[memory_key], cached[memory_key],
                     max(abs(run["loss"] - full["loss"]) / abs(full["loss"]) for run in (kept, cached)),
                     max(abs(run["grad_norm"] - full["grad_norm"]) / full["grad_norm"] for run in (kept, cached))])
    memory = "peak GPU GB" if memory_key == "peak_gpu_memory_gb" else "peak RSS MB"
    headers = ["images", "tokens", "all s/step", "answer s/step", "+cache s/step", "answer/all", "+cache/all",
               f"all {memory}", f"answer {memory}", f"+cache {memory}", "loss rel. diff", "grad-norm rel. diff"]
    notes = [f"{preset} preset, vocabulary {args.vocab:,}, random weights, float32, batch 1, {args.answer_tokens} "
             f"supervised tokens, vision tower frozen, {args.steps} timed steps after a warm-up; 'all': the stock "
             "loss over logits at every position; 'answer': logits only where an answer token is predicted; "
             "'+cache': that, with the frozen tower's pooled features read from the cache the warm-up step filled "
             "(every image already seen: the best case; `longllava finetune` runs both on the CPU). Peak memory "
             "of the whole process (model, activations, gradients, cache). The two diff columns: the larger of "
             "'answer' and '+cache' against 'all'."]
    _emit(args, payload, format_table(headers, rows), notes)
    return 0


# ----------------------------------------------------------------------------------------------------
# bench gpu
# ----------------------------------------------------------------------------------------------------


def gpu_run(preset: str, prefill_tokens: int, decode_tokens: int, chunk_tokens: int) -> dict[str, Any]:
    """9B-shape language model (random bf16 weights) on CUDA: chunked prefill, decode, peak memory."""
    import torch
    from transformers import JambaForCausalLM
    from transformers.cache_utils import DynamicCache

    from longllava.config import LongLlavaConfig
    from longllava.planner import plan_memory
    from longllava.scan import install_fast_scan, mamba_ssm_available

    install_fast_scan()
    device = torch.device("cuda")
    text = LongLlavaConfig.from_preset(preset).text_config
    with torch.device(device):
        model = JambaForCausalLM(text).to(torch.bfloat16).eval()
    torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator(device=device).manual_seed(0)
    cache = DynamicCache(config=text)
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, prefill_tokens, chunk_tokens):
            size = min(chunk_tokens, prefill_tokens - start)
            embeds = torch.randn(1, size, text.hidden_size, generator=generator, device=device, dtype=torch.bfloat16)
            out = model(inputs_embeds=embeds * 0.02, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - started
        token = out.logits[:, -1:].argmax(-1)
        started = time.perf_counter()
        for _ in range(decode_tokens):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        decode_s = time.perf_counter() - started
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    plan = plan_memory(preset, gpu_gb=gpu_gb, dtype="bf16", images=1000, chunk_size=chunk_tokens)
    return {
        "device": torch.cuda.get_device_name(0),
        "mamba_ssm": mamba_ssm_available(),
        "prefill_tokens": prefill_tokens,
        "prefill_s": prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
        "gpu_memory_gb": gpu_gb,
        "planner_max_images": plan.max_images,
        "planner_1000_images_fit": plan.fits,
    }


def run_gpu_command(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        message = "bench gpu needs a CUDA device; none is visible here (torch.cuda.is_available() is False)"
        if args.json:
            from longllava.cli import print_json

            print_json({"bench": "gpu", "skipped": message, "machine": machine_description()})
        else:
            print(message)
        return 0
    run = run_isolated(gpu_run, args.in_process, preset=args.preset, prefill_tokens=args.prefill_tokens,
                       decode_tokens=args.decode_tokens, chunk_tokens=args.chunk_tokens)
    payload = {"bench": "gpu", "machine": machine_description(), "run": run}
    headers = ["device", "prefill tokens", "prefill s", "decode tok/s", "peak GB", "max images (planner)"]
    rows = [[run["device"], run["prefill_tokens"], run["prefill_s"], run["decode_tokens_per_s"],
             run["peak_gpu_memory_gb"], run["planner_max_images"]]]
    notes = [f"{args.preset} language model, random bf16 weights, chunk {args.chunk_tokens}; mamba-ssm: "
             f"{run['mamba_ssm']}. Paper (A100, int8): 100k prefill <= 16.5 s, decode >= 62 tokens/s."]
    _emit(args, payload, format_table(headers, rows), notes)
    return 0
