"""2:4 semi-structured sparsity on the GPU: dense, 2:4, pruned and pruned + 2:4, eager and compiled.

GPU (the committed table): `python benchmarks/sparse_gpu.py`
    SD1.5 topology, random weights, 512x512 images (latent 64x64), batch 2 (classifier-free
    guidance), fp16, one CUDA GPU. Variants:
    - dense;
    - 2:4: magnitude 2:4 masks on every eligible layer (deploykit.sparsity defaults), then
      to_semi_structured (cuSPARSELt) on the masked Linear and 1x1 Conv2d layers;
    - pruned: prune_to_macs to 50% of the MACs (magnitude, channels rounded to 64), searched on the
      GPU in fp32;
    - pruned + 2:4: the pruned model, masked and converted the same way;
    - eager only, a control: "2:4 dense stand-in", the 2:4 model with the same layer swaps (1x1 convs
      as linears) but dense weights, which separates the rewrite's cost from the sparse kernels' gain.
    Each is timed eager and through torch.compile (mode "default": "max-autotune-no-cudagraphs" tunes
    every GEMM and does not fit four compiles in ten minutes; --compile-mode changes it). Within a
    backend the variants are timed round-robin in one window (deploykit.bench.measure_group).
    Per variant it records the layers that went sparse and those that were skipped (with why), the
    share of the UNet's conv + linear MACs that runs on sparse kernels, and max |diff| of the sparse model's output
    against the same masked model run dense in fp16 (the correctness check).
Smoke run: `python benchmarks/sparse_gpu.py --quick`
    tiny-sd topology, 128x128 (latent 16), masks on layers of 16+ channels, channels rounded to 8.
    On CUDA it runs everything. On CPU (fp32) it runs everything except cuSPARSELt: the 2:4 variants
    use the dense stand-in (same swaps, dense weights) and torch.compile is skipped, so its timings
    are of masked dense models and say nothing about 2:4 speed.

Random weights measure speed, never quality. The run checks its own clock (--budget-s) and skips the
compiles that would not fit, so one 10-minute command always ends with results; the JSON and
Markdown are rewritten after each backend.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deploykit.bench import measure_group
from deploykit.bench.machine import command_line, device_info
from deploykit.models import count_macs, count_params
from deploykit.models.inputs import example_unet_inputs
from deploykit.models.topologies import build_unet
from deploykit.models.wrappers import tensor_view
from deploykit.prune import PruneConfig, prune_to_macs
from deploykit.sparsity import SparsityConfig, check_2to4, masks_summary, sparsify, to_semi_structured

HERE = Path(__file__).resolve().parent
STARTED = time.perf_counter()
STANDIN = "2:4 dense stand-in"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {msg}", file=sys.stderr, flush=True)


class Runner:
    """A UNet already on its device and dtype, optionally compiled; returns after the GPU finished.

    deploykit.runtime.TorchBackend would call ``.to(device, dtype)`` on the model, which torch does not
    implement for semi-structured weights, so every variant here (dense ones too) runs through this.
    """

    def __init__(self, model: nn.Module, compile_mode: str | None = None):
        self.model = tensor_view(model).eval()
        self.forward = torch.compile(self.model, mode=compile_mode) if compile_mode else self.model
        self.cuda = next(model.parameters()).is_cuda

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.forward(*inputs)
        if self.cuda:
            torch.cuda.synchronize()
        return out


def layer_macs(model: nn.Module, inputs) -> tuple[torch.Tensor, dict[str, int]]:
    """One forward; returns its output and the MACs of every Linear / Conv2d by name (forward hooks)."""
    macs: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name: macs.__setitem__(n, o.numel() * mod.in_features)))
        elif isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name, k=k: macs.__setitem__(n, o.numel() * k)))
    try:
        with torch.no_grad():
            out = tensor_view(model)(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return out, macs


def make_sparse(model: nn.Module, inputs, sparsity: SparsityConfig, backend: str, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """Mask ``model`` (in place), convert it, and check the converted model against the masked one run dense."""
    masks = sparsify(model, sparsity)
    violations = check_2to4(model, masks)
    info = {"masks": masks_summary(model, masks), "check_2to4_violations": [str(v) for v in violations]}
    reference, per_layer = layer_macs(model, inputs)
    started = time.perf_counter()
    plan = to_semi_structured(model, dtype, names=list(masks), backend=backend)
    info["conversion_seconds"] = time.perf_counter() - started
    del masks
    with torch.no_grad():
        out = tensor_view(model)(*inputs)
    diff = (out.float() - reference.float()).abs().max().item()
    sparse_macs = sum(per_layer.get(n, 0) for n in plan.convert)
    info.update({"semi_structured": plan.as_dict(), "sparse_layer_macs": sparse_macs,
                 "sparse_macs_share": sparse_macs / max(1, sum(per_layer.values())),  # of the conv + linear MACs
                 "max_abs_diff_vs_masked_dense": diff, "max_abs_masked_dense": reference.float().abs().max().item()})
    return model, info


def prune(teacher: nn.Module, search_inputs, args) -> tuple[nn.Module, dict]:
    started = time.perf_counter()
    student, result = prune_to_macs(teacher, search_inputs, PruneConfig(criterion="magnitude", macs_target=args.macs_target,
                                                                        round_to=args.round_to, ignored=None,
                                                                        search_steps=args.search_steps))
    seconds = time.perf_counter() - started
    log(f"pruned to {result.macs_ratio:.3f} of the MACs (target {args.macs_target}) in {seconds:.0f} s "
        f"({len(result.trials)} trials)")
    return student, {"macs_ratio": result.macs_ratio, "pruning_ratio": result.pruning_ratio, "seconds": seconds,
                     "trials": result.trials}


def time_backend(name: str, runners: dict, inputs, args, result: dict, bases: dict) -> None:
    started = time.perf_counter()
    latencies = measure_group({n: (lambda r=r: r(*inputs)) for n, r in runners.items()}, args.warmup, args.runs)
    dense = latencies["dense"].p50_ms if "dense" in latencies else None
    rows = {}
    for n, lat in latencies.items():
        base = bases.get(n)
        rows[n] = {**lat.__dict__, "speedup": dense / lat.p50_ms if dense else None,
                   "sparse_gain": latencies[base].p50_ms / lat.p50_ms if base in latencies else None}
    result["backends"][name] = rows
    log(f"{name} ({time.perf_counter() - started:.0f} s): " + ", ".join(
        f"{n} {r['p50_ms']:.1f} ms" + (f" ({r['speedup']:.2f}x)" if r["speedup"] else "") for n, r in rows.items()))


def linear_kernels(dtype: torch.dtype, tokens: int, iters: int = 50) -> list[dict]:
    """One 2:4 GEMM against its dense twin, on SD1.5's widest-level linear shapes (CUDA events).

    Separates what the sparse kernel itself gains from everything around it in a UNet step.
    """
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    from deploykit.sparsity import magnitude_mask

    rows = []
    for k, n in ((320, 320), (320, 2560), (1280, 320), (640, 5120), (1280, 10240)):
        x = torch.randn(tokens, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        w = w * magnitude_mask(w).to(w.dtype)
        sparse = to_sparse_semi_structured(w)
        times = {}
        for label, weight in (("dense", w), ("2:4", sparse)):
            for _ in range(5):
                F.linear(x, weight)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                F.linear(x, weight)
            end.record()
            torch.cuda.synchronize()
            times[label] = start.elapsed_time(end) / iters
        rows.append({"tokens": tokens, "in": k, "out": n, "dense_ms": times["dense"], "sparse_ms": times["2:4"],
                     "speedup": times["dense"] / times["2:4"]})
        log(f"linear {tokens}x{k} -> {n}: dense {times['dense']:.3f} ms, 2:4 {times['2:4']:.3f} ms "
            f"({times['dense'] / times['2:4']:.2f}x)")
    return rows


def to_markdown(result: dict) -> str:
    m = result["machine"]
    kernels = ("the dense stand-in (no 2:4 kernels)" if result["semi_structured_backend"] == "dense"
               else f"{result['semi_structured_backend']} 2:4 kernels")
    lines = [f"# 2:4 semi-structured sparsity: {result['topology']} topology, random weights", "",
             f"{result['resolution']}x{result['resolution']} images (UNet input {'x'.join(map(str, result['shape']))}), "
             f"batch {result['shape'][0]}, {result['precision']}; {m.get('gpu') or m['cpu']} ({m['threads']} CPU threads), "
             f"torch {m['torch']}{', CUDA ' + m['cuda'] if m.get('cuda') else ''}. Variants timed round-robin in one run per "
             f"backend, {result['runs']} rounds after {result['warmup']} warm-up rounds. 2:4: magnitude masks "
             f"(min_features {result['sparsity']['min_features']}, excluded {', '.join(result['sparsity']['exclude'])}), "
             f"{kernels} on Linear and 1x1 Conv2d layers; 3x3 convs keep their masks but "
             f"run dense. Pruned: magnitude to {result['macs_target']} of the MACs, channels rounded to {result['round_to']}. "
             f"torch.compile mode: {result['compile_mode'] or 'not run'}.", ""]
    lines += [f"- {note}" for note in result["notes"]] + [""]
    lines += ["| model | MACs ratio | params | layers on 2:4 kernels (masked) | conv + linear MACs on 2:4 kernels | "
              "max abs diff vs masked dense |",
              "|---|---|---|---|---|---|"]
    for name, v in result["models"].items():
        if "error" in v:
            lines.append(f"| {name} | {v['macs_ratio']:.3f} | {v['params'] / 1e6:.1f}M | failed: {v['error'][:200]} | - | - |")
            continue
        s = v.get("semi_structured")
        layers = f"{s['converted']} ({v['masks']['layers']})" if s else "-"
        share = f"{v['sparse_macs_share']:.1%}" if s else "-"
        diff = f"{v['max_abs_diff_vs_masked_dense']:.2e} (output max {v['max_abs_masked_dense']:.2f})" if s else "-"
        lines.append(f"| {name} | {v['macs_ratio']:.3f} | {v['params'] / 1e6:.1f}M | {layers} | {share} | {diff} |")
    lines += ["", "| backend | model | p50 ms | p90 ms | speedup vs dense | 2:4 gain over its dense twin |", "|---|---|---|---|---|---|"]
    for backend, rows in result["backends"].items():
        for name, r in rows.items():
            speed = f"**{r['speedup']:.2f}x**" if r["speedup"] else "-"
            gain = f"{r['sparse_gain']:.2f}x" if r["sparse_gain"] else "-"
            lines.append(f"| {backend} | {name} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {speed} | {gain} |")
    if result.get("compile"):
        lines += ["", "torch.compile: " + "; ".join(
            f"{n} {c['seconds']:.0f} s" if "seconds" in c else f"{n} not timed ({c['error']})" for n, c in result["compile"].items())]
    if result.get("kernels"):
        lines += ["", "One GEMM, eager, CUDA events (the 2:4 kernel alone, against its dense twin):", "",
                  "| tokens x in -> out | dense ms | 2:4 ms | speedup |", "|---|---|---|---|"]
        lines += [f"| {r['tokens']} x {r['in']} -> {r['out']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x |"
                  for r in result["kernels"]]
    skipped = {}
    for name, v in result["models"].items():
        for why, count in (v.get("semi_structured") or {}).get("skipped_by_reason", {}).items():
            skipped.setdefault(name, []).append(f"{count} {why}")
    if skipped:
        lines += ["", "Masked layers left dense in torch: " + "; ".join(f"{n}: {', '.join(w)}" for n, w in skipped.items()) + "."]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def write(result: dict, args) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("sparse_gpu_quick" if args.quick else "sparse_gpu")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on tiny-sd (CPU without cuSPARSELt, or CUDA)")
    parser.add_argument("--topology", help="default: sd15 (tiny-sd with --quick)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where available")
    parser.add_argument("--resolution", type=int, help="image side (default 512; 128 with --quick)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--macs-target", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, help="default 64 (8 with --quick)")
    parser.add_argument("--search-steps", type=int, default=10, help="bisection steps of the MACs search")
    parser.add_argument("--min-features", type=int, help="2:4 on layers at least this wide (default 256; 16 with --quick)")
    parser.add_argument("--backend", default="cusparselt", choices=["cusparselt", "cutlass"], help="torch's 2:4 kernels")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs, ...)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-control", action="store_true", help="skip the eager '2:4 dense stand-in' control")
    parser.add_argument("--budget-s", type=float, default=540, help="skip compiles that would end later than this")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--name", help="results file stem (default: sparse_gpu, or sparse_gpu_quick)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if not cuda and not args.quick:
        print("error: the full run needs CUDA (cuSPARSELt); use --quick for the CPU smoke run", file=sys.stderr)
        return 2
    topology = args.topology or ("tiny-sd" if args.quick else "sd15")
    resolution = args.resolution or (128 if args.quick else 512)
    args.round_to = args.round_to or (8 if args.quick else 64)
    min_features = args.min_features if args.min_features is not None else (16 if args.quick else 256)
    dtype = torch.float16 if cuda else torch.float32
    backend = args.backend if cuda else "dense"
    compile_mode = None if args.no_compile or not cuda else args.compile_mode
    sparsity = SparsityConfig(method="magnitude", min_features=min_features)
    notes = []
    if not cuda:
        notes.append("CPU smoke run: the 2:4 variants use the dense stand-in (no cuSPARSELt on CPU) and torch.compile is "
                     "skipped; timings are of masked dense models and say nothing about 2:4 speed")
    if cuda:
        # four models of different widths run through the same diffusers code objects: each width is a
        # recompile, and at the default limit of 8 dynamo silently falls back to eager for the rest
        torch._dynamo.config.recompile_limit = 64
        log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"cuSPARSELt {torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else 'missing'}")

    teacher = build_unet(topology).to(device)  # fp32: the pruning search runs where the models will run
    latent = resolution // 8
    search_inputs = tuple(x.to(device) for x in example_unet_inputs(teacher, 1, size=latent))  # MACs ratios are per sample
    student, prune_info = prune(teacher, search_inputs, args)
    del search_inputs
    inputs = tuple(x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
                   for x in example_unet_inputs(teacher, args.batch, size=latent))

    def fresh(model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).to(dtype=dtype).eval()

    variants = {"dense": fresh(teacher), "2:4": fresh(teacher), "pruned": fresh(student), "pruned + 2:4": fresh(student)}
    if not args.no_control and cuda:
        variants[STANDIN] = fresh(teacher)
    del teacher, student
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    bases = {"2:4": "dense", "pruned + 2:4": "pruned", STANDIN: "dense"}
    macs_dense = count_macs(variants["dense"], inputs)
    models = {}
    for name, model in list(variants.items()):
        macs = count_macs(model, inputs)  # before conversion: FlopCounterMode on semi-structured weights is not needed
        models[name] = {"macs": macs, "macs_ratio": macs / macs_dense, "params": count_params(model)}
        if name in bases:
            started = time.perf_counter()
            try:
                _, info = make_sparse(model, inputs, sparsity, "dense" if name == STANDIN else backend, dtype)
            except Exception as e:  # a variant that cannot go sparse is a result, not the end of the run
                models[name]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                log(f"{name}: failed, left out of the timings: {models[name]['error']}")
                del variants[name]
                continue
            info["sparse_share_of_count_macs"] = info["sparse_layer_macs"] / macs  # count_macs also counts SDPA on CUDA
            models[name].update(info)
            log(f"{name}: {info['masks']['layers']} layers masked, {info['semi_structured']['converted']} on 2:4 kernels "
                f"({info['sparse_macs_share']:.1%} of the conv + linear MACs), skipped {info['semi_structured']['skipped_by_reason']}, "
                f"max |diff| vs masked dense {info['max_abs_diff_vs_masked_dense']:.2e} ({time.perf_counter() - started:.0f} s)")
    result = {
        "command": command_line("benchmarks/sparse_gpu.py"),
        "topology": topology, "random_weights": True, "resolution": resolution, "shape": list(inputs[0].shape),
        "precision": "fp16" if dtype == torch.float16 else "fp32", "macs_target": args.macs_target, "round_to": args.round_to,
        "sparsity": {"method": sparsity.method, "min_features": sparsity.min_features, "exclude": list(sparsity.exclude)},
        "semi_structured_backend": backend, "compile_mode": compile_mode, "warmup": args.warmup, "runs": args.runs,
        "machine": {**device_info(cuda), "platform": platform.platform(),
                    "cusparselt": torch.backends.cusparselt.version() if cuda and torch.backends.cusparselt.is_available() else None},
        "notes": notes, "prune": prune_info, "models": models, "backends": {}, "compile": {},
    }
    if cuda:
        result["kernels"] = linear_kernels(dtype, args.batch * latent * latent)
        write(result, args)
    backend_name = f"torch-{device}"
    time_backend(backend_name, {n: Runner(m) for n, m in variants.items()}, inputs, args, result, bases)
    write(result, args)

    if compile_mode:
        runners, slowest = {}, 60.0
        for name, model in variants.items():
            if name == STANDIN:
                continue
            left = args.budget_s - (time.perf_counter() - STARTED)
            if left < 1.5 * slowest + 30:
                result["compile"][name] = {"error": f"skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left"}
                log(f"compile {name}: skipped, {left:.0f} s left")
                continue
            started = time.perf_counter()
            try:
                runner = Runner(model, compile_mode)
                runner(*inputs)
            except Exception as e:  # a variant that does not compile is a result, not the end of the run
                result["compile"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
                log(f"compile {name} failed: {result['compile'][name]['error']}")
                continue
            seconds = time.perf_counter() - started
            slowest = max(slowest, seconds)
            with torch.no_grad():
                out = runner.forward(*inputs)
                eager = tensor_view(model)(*inputs)
            result["compile"][name] = {"seconds": seconds, "max_abs_diff_vs_eager": (out.float() - eager.float()).abs().max().item()}
            runners[name] = runner
            log(f"compiled {name} in {seconds:.0f} s")
        if runners:
            time_backend(f"{backend_name}-compile", runners, inputs, args, result, bases)
    result["total_seconds"] = time.perf_counter() - STARTED
    write(result, args)
    stem = args.name or ("sparse_gpu_quick" if args.quick else "sparse_gpu")
    log(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
