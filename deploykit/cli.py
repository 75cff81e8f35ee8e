"""The command line: parses, prints, maps errors to exit codes (2 bad input, 3 quality gate failed, 1 internal failure)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deploykit import __version__
from deploykit.errors import DeployKitError, InputError, QualityGateError

console = Console(stderr=True, soft_wrap=True)


def _cmd_build(args) -> int:
    from deploykit.recipe import load_recipe
    from deploykit.runner import build, dry_run, skip_reasons

    recipe = load_recipe(args.recipe, args.allow_path, args.set)
    out = Path(args.out) if args.out else Path("artifacts") / recipe.name
    skip = skip_reasons([name.strip() for item in args.skip for name in item.split(",") if name.strip()],
                        args.random_weights)
    if args.dry_run:
        stages = dry_run(recipe, Path(args.recipe), out, random_weights=args.random_weights, skip=skip)
        console.print(f"[green]{escape(args.recipe)}: ready to build into {escape(str(out))}[/] (nothing written): "
                      + " -> ".join(f"{name} ({memory})" if memory else name for name, memory in stages.items()),
                      highlight=False)
        return 0
    report = build(recipe, Path(args.recipe), out, console, random_weights=args.random_weights,
                   skip=skip, overrides=tuple(args.set))
    if report is None:  # a non-main process of `accelerate launch`: the main process reports
        return 0
    speedups = ", ".join(f"{b} {s:.2f}x" for b, s in report.get("speedup", {}).items())
    console.print(f"[green]built {escape(str(out))}[/]" + (f": speedup {speedups}" if speedups else ""))
    if "macs_ratio" in report:
        console.print(f"MACs ratio {report['macs_ratio']:.3f}; report: {out / 'report.md'}")
    return 0


def _cmd_inspect(args) -> int:
    from deploykit.artifact import Artifact

    artifact = Artifact(args.artifact)
    if not artifact.root.is_dir():
        raise InputError(f"no such artifact folder: {artifact.root}")
    manifest = artifact.read_manifest()
    table = Table(title=f"{artifact.root} (recipe {manifest['recipe'].get('name')})")
    for col in ("stage", "folder", "digest"):
        table.add_column(col)
    for s in manifest["stages"]:
        table.add_row(s["name"], s["dir"], s["digest"][:16])
    console.print(table)
    console.print(f"{len(manifest['files'])} files; deploykit {manifest['deploykit']}, python {manifest['python']}, "
                  f"torch {manifest['packages'].get('torch', '?')}")
    report_path = artifact.root / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        for b, s in report.get("speedup", {}).items():
            console.print(f"  speedup {b}: {s:.2f}x")
        if "macs_ratio" in report:
            console.print(f"  MACs ratio: {report['macs_ratio']:.3f}")
    problems = artifact.verify()
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise InputError(f"{artifact.root} does not match its manifest:\n  {shown}{more}")
    console.print("[green]all hashes verified[/]")
    return 0


def _cmd_recipe_schema(args) -> int:
    from deploykit.recipe import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_recipe_check(args) -> int:
    from deploykit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.allow_path)
    console.print(f"[green]{escape(args.recipe)}: valid[/] ({len(recipe.stages)} stages: "
                  f"{' -> '.join(s.stage for s in recipe.stages)})")
    return 0


def _cmd_zoo_list(args) -> int:
    from deploykit.zoo import ZOO

    for name, entry in ZOO.items():
        trained = (entry.folder / "card.json").is_file()  # written last, for every kind of zoo teacher
        print(f"zoo:{name}\t{entry.description}\t{'trained' if trained else 'not trained'}")
    return 0


def _cmd_zoo_train(args) -> int:
    from deploykit.zoo import get_entry
    from deploykit.zoo.train import train_zoo_entry

    try:
        entry = get_entry(args.name)
    except KeyError as e:
        raise InputError(str(e.args[0])) from None
    out = Path(args.out) if args.out else entry.folder
    if args.device != "cpu":
        import torch

        if entry.kind == "pixel":
            raise InputError(f"zoo:{entry.name} trains on the CPU only (minutes); --device is for text-to-image teachers")
        if not args.device.startswith("cuda") or not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: not available here (cpu, or cuda[:N] where torch sees a GPU)")
    card = train_zoo_entry(entry, out, steps=args.steps, device=args.device)
    console.print(f"[green]trained zoo:{entry.name}[/] into {out}: final loss {card['final_loss_mean_last_100']}, "
                  f"classifier held-out accuracy {card['classifier_held_out_accuracy']:.3f}, {card['train_seconds']:.0f} s")
    return 0


def _cmd_serve(args) -> int:
    from deploykit.serve import ServeConfig, run_server

    try:
        config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                             timeout_s=args.timeout_s, max_steps=args.max_steps, max_side=args.max_side,
                             max_images=args.max_images, max_pixel_steps=args.max_pixel_steps,
                             read_timeout_s=args.read_timeout_s, warmup=not args.no_warmup)
    except ValueError as e:
        raise InputError(f"serve: {e}") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]serving on {args.host}: reachable from other machines; the server has no "
                      "authentication[/]")

    def loaded(pipeline) -> None:
        console.print(f"[green]serving {pipeline.root}[/] ({pipeline.kind}, backend {pipeline.backend}) on "
                      f"http://{args.host}:{args.port}  (POST /generate, GET /health, GET /metrics)")

    run_server(args.artifact, args.host, args.port, args.backend, config, on_loaded=loaded)
    return 0


def _cmd_bench(args) -> int:
    from deploykit.device.remote_bench import RemoteBench, store
    from deploykit.device.ssh import SSH, parse_host

    host = parse_host(args.host)
    identity = Path(args.identity).expanduser() if args.identity else None
    if identity is not None and not identity.is_file():
        raise InputError(f"--identity {args.identity}: no such key file")
    for name in ("runs", "warmup"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "runs" else 0):
            raise InputError(f"--{name} {value}: must be at least {1 if name == 'runs' else 0}")
    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise InputError(f"no such artifact folder: {artifact}")
    ssh = SSH(host, identity, tuple(args.ssh_option), args.connect_timeout,
              echo=lambda line: console.print(f"  {host.label}: {line}", highlight=False, markup=False))
    bench = RemoteBench(artifact, ssh, args.backend, args.remote_dir, args.remote_python, args.runs, args.warmup,
                        say=lambda text: console.print(text, highlight=False, markup=False))
    results, meta = bench.run()
    name, entry = store(artifact, results, meta)
    console.print(f"[green]{name}[/] on {entry['device']}: teacher p50 {entry['teacher']['p50_ms']:.2f} ms, student p50 "
                  f"{entry['student']['p50_ms']:.2f} ms -> [bold]{entry['speedup']:.2f}x[/] (per-pair median "
                  f"{entry['speedup_pair_median']:.2f}x)", highlight=False)
    est = entry.get("estimate")
    if est:
        console.print(f"roofline estimate on the {est['target']} ({est['device']}, {est['precision']}): teacher "
                      f"{est['teacher_ms']:.2f} ms, student {est['student_ms']:.2f} ms ({est['speedup']:.2f}x)"
                      + ("; measured on the CPU stand-in, not comparable" if entry["stand_in"] else ""), highlight=False)
    console.print(f"results: {artifact / entry['results']}; report: {artifact / 'report.md'}", highlight=False)
    return 0


def _allow_path_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="a folder outside the recipe's own that files the recipe names (distill.prompts) may be in; "
                        "repeatable (default: the recipe's folder only)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploykit", description="Prune, distill, export and benchmark diffusion models.")
    parser.add_argument("--version", action="version", version=f"deploykit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="run a recipe into an artifact folder")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/digits_cpu.yaml")
    p.add_argument("--out", help="artifact folder (default: artifacts/<recipe name>)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the teacher's topology with random weights instead of loading it (measures speed, "
                        "never quality; the report says so)")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything a build checks before it writes (the recipe, its files, the teacher, the "
                        "memory its settings need, the output folder), print the stages it would run, write nothing")
    _allow_path_option(p)
    p.add_argument("--skip", action="append", default=[], metavar="STAGE[,STAGE]",
                   help="do not run these stages of the recipe (e.g. distill,eval in a speed-only --random-weights "
                        "build); the report and manifest say so, and a stage whose output a later stage needs is refused")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a recipe setting for this build: a top-level field (resolution=256) or a stage's "
                        "(prune.round_to=4, bench.end_to_end.steps=2); VALUE is YAML; recorded in the manifest")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("inspect", help="show an artifact and verify every hash")
    p.add_argument("artifact")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("serve", help="serve an artifact over HTTP (generate, health, metrics)")
    p.add_argument("artifact", help="artifact folder made by `deploykit build`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", help="tensorrt, onnxruntime-cuda, torch-cuda, onnxruntime-cpu, openvino-cpu or torch-cpu "
                                     "(default: the first of these this machine and the artifact have; openvino-cpu "
                                     "needs pip install 'deploykit[openvino]')")
    p.add_argument("--max-batch", type=int, default=4, help="images per model call; 1 turns batching off (default 4)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long a request may wait for others to join its batch (default 10)")
    p.add_argument("--queue-size", type=int, default=16, help="waiting requests before 503 (default 16)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request, queueing included (default 60)")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--max-side", type=int, default=1024, help="largest height or width in pixels (default 1024)")
    p.add_argument("--max-images", type=int, default=4, help="images per request (default 4)")
    p.add_argument("--max-pixel-steps", type=int, default=None,
                   help="compute budget per request: height x width x steps x images (default: the artifact's own "
                        "size x --max-steps x --max-images)")
    p.add_argument("--read-timeout-s", type=float, default=10.0,
                   help="a client's time to send a request's headers, and again its body (default 10)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up generation before serving")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("bench", help="time an artifact's device bundle on the device over SSH (Jetson targets)",
                       description="Copy the artifact's bundle/ to the device over SSH (only what changed), build its "
                                   "TensorRT engines there, time teacher against student there, and put the figures "
                                   "into the artifact's report (remote/<host>/<backend>/).")
    p.add_argument("artifact", help="artifact folder built from a recipe with a bundle stage")
    p.add_argument("--host", required=True, help="user@device[:port], or a host alias from ~/.ssh/config")
    p.add_argument("--identity", "-i", help="private key file (ssh -i)")
    p.add_argument("--ssh-option", "-o", action="append", default=[], metavar="OPTION",
                   help="passed to ssh as -o OPTION, e.g. ProxyJump=gateway (repeatable)")
    p.add_argument("--backend", choices=["tensorrt", "onnxruntime-cpu"], default="tensorrt",
                   help="tensorrt (default: build the engines on the device and time them) or onnxruntime-cpu (the "
                        "device's CPU, no TensorRT needed)")
    p.add_argument("--remote-dir", help="folder on the device (default: deploykit-bundles/<recipe name>, in the login "
                                        "folder)")
    p.add_argument("--remote-python", default="python3", help="the device's Python (default python3)")
    p.add_argument("--runs", type=int, help="timed teacher / student pairs (default: the bundle's)")
    p.add_argument("--warmup", type=int, help="warm-up pairs (default: the bundle's)")
    p.add_argument("--connect-timeout", type=int, default=15, help="seconds (ssh ConnectTimeout, default 15)")
    p.set_defaults(func=_cmd_bench)

    recipe = sub.add_parser("recipe", help="recipe tools").add_subparsers(dest="recipe_command", required=True)
    p = recipe.add_parser("schema", help="print the recipe JSON schema")
    p.set_defaults(func=_cmd_recipe_schema)
    p = recipe.add_parser("check", help="validate a recipe and the files it names")
    p.add_argument("recipe")
    _allow_path_option(p)
    p.set_defaults(func=_cmd_recipe_check)

    zoo = sub.add_parser("zoo", help="the project's own teachers").add_subparsers(dest="zoo_command", required=True)
    p = zoo.add_parser("list", help="list zoo teachers")
    p.set_defaults(func=_cmd_zoo_list)
    p = zoo.add_parser("train", help="train a zoo teacher and its FID feature extractor")
    p.add_argument("name")
    p.add_argument("--steps", type=int, help="override the teacher's training steps")
    p.add_argument("--out", help="output folder (default: the package's zoo folder)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: where a text-to-image teacher trains")
    p.set_defaults(func=_cmd_zoo_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    # diffusers logs import-time notices (e.g. optimum and optimum-onnx both providing `optimum`)
    # that mean nothing to a user; deploykit reports what matters itself. An explicit setting wins.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args = make_parser().parse_args(argv)
    debug = os.environ.get("DEPLOYKIT_DEBUG") == "1"
    try:
        return args.func(args)
    except InputError as e:
        if debug:
            raise
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        return 2
    except QualityGateError as e:
        if debug:
            raise
        console.print(f"[red]quality gate failed:[/] {escape(str(e))}", highlight=False)
        return 3
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; run the same command again to resume[/]")
        return 130
    except DeployKitError as e:
        if debug:
            raise
        console.print(f"[red]failed:[/] {escape(str(e))}", highlight=False)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI is the one place that turns failures into exit codes
        if debug:
            raise
        console.print(f"[red]internal error:[/] {type(e).__name__}: {escape(str(e))}\n(set DEPLOYKIT_DEBUG=1 for the traceback)",
                      highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
