"""`blockstudio` commands: train, generate, export, import, inspect, merge, watermark, models, lab, jobs, app.

Every command validates its input before loading a model, prints one-line errors (exit code 2) for bad
input, and never leaves half-written files behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130


def _quiet_libraries() -> None:
    """Keep library chatter (download bars, harmless LoRA-loading notices) out of the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except Exception:
        pass
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:
        pass


def _format_seconds(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressPrinter:
    """Step, loss, it/s and ETA on one updating line (a line every 10% when not a terminal)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_reported = -1

    def __call__(self, event) -> None:
        text = (f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  "
                f"{event.steps_per_s:.2f} it/s  ETA {_format_seconds(event.eta_s)}")
        if self.tty:
            end = "\n" if event.step == event.total_steps else ""
            self.stream.write("\r" + text.ljust(70) + end)
            self.stream.flush()
            return
        tenth = max(event.total_steps // 10, 1)
        if event.step % tenth == 0 or event.step == event.total_steps:
            self.stream.write(text + "\n")
            self.stream.flush()


# -- commands -----------------------------------------------------------------------------------------


def _run_request_fields(args: argparse.Namespace) -> dict:
    """The request values of the chosen `train` recipe, from the options its settings' metadata made."""
    from pipelines.recipes import recipe_for

    return settings_from_args(recipe_for(args.recipe).settings, args)


def settings_from_args(settings: type, args: argparse.Namespace) -> dict:
    """{field: value} of a settings dataclass from the options `_add_setting_options` added for it."""
    from pipelines.settings import setting_fields

    values = {}
    for field in setting_fields(settings):
        if field.flag is None:
            continue
        value = getattr(args, field.dest)
        if field.kind == "tristate" and value is None:
            continue  # not given: the recipe's own default (SplitFlux's Adam keeps 32-bit state)
        values[field.name] = (not value) if field.invert else value
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from pipelines.recipes import recipe_for

    spec = recipe_for(args.recipe)
    request = spec.settings(**_run_request_fields(args))
    return _run_training(lambda **kw: spec.train(request, **kw), args.out)


def _save_preview(out: str):
    """Write training previews to OUT.partial/samples/step-NNNNNN.png as they arrive."""
    from pipelines.storage import atomic_file
    from pipelines.training import work_dir_for

    folder = work_dir_for(out) / "samples"

    def save(step: int, image) -> None:
        with atomic_file(folder / f"step-{step:06d}.png") as tmp:
            image.save(tmp, format="PNG")

    return save


def _run_training(run, out: str) -> int:
    from pipelines.training import CancelToken, TrainingCancelled, work_dir_for

    cancel = CancelToken()
    started = time.perf_counter()
    try:
        path = run(on_progress=ProgressPrinter(), on_sample=_save_preview(out), cancel=cancel)
    except KeyboardInterrupt:
        print(f"\ncancelled; checkpoints are in {work_dir_for(out)} (use --resume to continue)", file=sys.stderr)
        return EXIT_CANCELLED
    except TrainingCancelled as exc:
        print(f"{exc}; resume with --resume", file=sys.stderr)
        return EXIT_CANCELLED
    print(f"adapter package written to {path} in {_format_seconds(time.perf_counter() - started)}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.generation import AdapterChoice, StudioPipeline, check_sampling
    from pipelines.package import AdapterPackage
    from pipelines.storage import atomic_file

    sampling = check_sampling(seed=args.seed, steps=args.steps, guidance=args.guidance, width=args.width,
                              height=args.height, num_images=args.num_images)
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out must end in .png, .jpg or .webp, not {out.name!r}")
    paths = [out] if sampling["num_images"] == 1 else \
        [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(sampling["num_images"])]
    for path in paths:
        if path.is_dir() or (path.exists() and not args.force):
            raise ValueError(f"{path} already exists; pass --force to replace it, or choose another --out")
    content = None
    extras = tuple(part for part in _optional_parts() if getattr(args, f"with_{part}"))
    if args.content:
        package = AdapterPackage.open(args.content)
        part = args.content_part or package.part_for("mix")
        content = AdapterChoice(package, part, args.content_scale, extras)
    elif extras:
        raise ValueError(f"--with-{extras[0].replace('_', '-')} loads the {extras[0]} part of the --content "
                         "package; give --content")
    style = AdapterChoice.for_use(AdapterPackage.open(args.style), "style", args.style_scale) if args.style else None
    model = args.model or (content or style).package.base_model if (content or style) else args.model
    if not model:
        raise ValueError("give --model (or an adapter package, whose base model is then used)")
    studio = StudioPipeline(model)
    images = studio.generate(args.prompt, content=content, style=style, negative_prompt=args.negative_prompt,
                             fast=args.fast, **sampling)
    for image, path in zip(images, paths, strict=True):
        with atomic_file(path) as tmp:
            image.save(tmp, format=_pil_format(path))
        print(path)
    return 0


def _pil_format(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")


def cmd_export(args: argparse.Namespace) -> int:
    from pipelines.rank_export import export_package

    path = export_package(args.package, args.rank, args.out, force=args.force)
    print(f"package at rank {args.rank} written to {path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipelines.importer import import_lora

    path = import_lora(args.file, args.out, model=args.model, token=args.token, method=args.method,
                       pipe=None, force=args.force)
    print(f"imported into {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from pipelines.formats import read_safetensors
    from pipelines.package import AdapterPackage

    path = Path(args.path)
    if path.is_dir():
        print(json.dumps(AdapterPackage.open(path).info, indent=2, sort_keys=True))
        return 0
    tensors, metadata = read_safetensors(path)
    print(json.dumps({"tensors": len(tensors), "metadata": metadata}, indent=2, sort_keys=True))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from pipelines.merge import MergeOptions, merge_packages, parse_weights
    from pipelines.package import AdapterPackage
    from pipelines.storage import check_writable_target

    options = MergeOptions(mode=args.mode, mask_lambda=args.mask_lambda, weights=parse_weights(args.weights),
                           rank=args.rank)
    options.checked(len(args.packages))
    packages = [AdapterPackage.open(path) for path in args.packages]
    out = check_writable_target(args.out, force=args.force)
    path = merge_packages(packages, out, out.name, options, replace=args.force)
    info = AdapterPackage.open(path).info
    print(f"merged {len(packages)} styles ({args.mode}) into {path}: rank {info['rank']}, "
          f"{info['merge']['energy_kept_min']:.1%} of the merged delta kept (worst module)")
    return 0


def cmd_watermark(args: argparse.Namespace) -> int:
    from pipelines.storage import check_writable_target
    from pipelines.watermark import mark_package, parse_bits, verify_package

    key = args.key if args.key is not None else os.environ.get("BLOCKSTUDIO_WATERMARK_KEY", "")
    if args.watermark_command == "embed":
        out = check_writable_target(args.out, force=args.force) if args.out else None
        path = mark_package(args.package, args.signature, key=key, strength=args.strength, out=out,
                            replace=args.force)
        print(f"signed {path} with {len(parse_bits(args.signature))} bits")
        return 0
    result = verify_package(args.package, key=key, part=args.part)
    print(f"{result.package}: signature {result.text} ({len(result.bits)} bits, read from its {result.part} file)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipelines.models import REGISTRY, model_path

    if args.action == "list":
        for spec in REGISTRY.values():
            print(f"{spec.name:14s} {spec.arch:5s} {spec.repo_id or '(built locally)':42s} {spec.description}")
        return 0
    if not args.name:
        raise ValueError("models path needs a model name, e.g. blockstudio models path tiny-sdxl")
    print(model_path(args.name))
    return 0


class LabProgressPrinter:
    """A lab run's percentage and message on one updating line (a line every 10% when not a terminal)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.perf_counter()
        self.last_tenth = -1

    def __call__(self, fraction: float, message: str) -> None:
        text = f"{100 * fraction:3.0f}%  {_format_seconds(time.perf_counter() - self.started)}  {message}"
        if self.tty:
            self.stream.write("\r" + text[:100].ljust(100) + ("\n" if fraction >= 1 else ""))
            self.stream.flush()
        elif int(fraction * 10) > self.last_tenth:
            self.last_tenth = int(fraction * 10)
            self.stream.write(text + "\n")
            self.stream.flush()


def _lab_overrides(items: list[str]) -> dict[str, str]:
    """`--set key=value` options as a dict; a malformed or repeated one is refused."""
    import re

    values: dict[str, str] = {}
    for item in items:
        match = re.fullmatch(r"([a-z_][a-z0-9_]*)=(.*)", item, flags=re.DOTALL)
        if match is None:
            raise ValueError(f"--set takes key=value (e.g. --set steps=100), not {item!r}")
        key, value = match.groups()
        if key in values:
            raise ValueError(f"--set {key} is given twice")
        values[key] = value
    return values


def cmd_lab(args: argparse.Namespace) -> int:
    from pipelines.adapters import METHODS
    from pipelines.lab import EXPERIMENTS, Progress, experiment_for, make_settings, run_experiment
    from pipelines.storage import check_writable_target

    if args.lab_command == "list":
        for name, info in sorted(METHODS.items(), key=lambda item: (item[0] not in EXPERIMENTS, item[0])):
            ok, why = info.available()
            status = ("runnable" if ok else f"unavailable: {why}") if name in EXPERIMENTS else "no experiment yet"
            print(f"{name:18s} {info.title[:40]:40s} {status}")
        return 0
    experiment = experiment_for(args.method)
    base = experiment.settings_cls.quick() if args.quick else experiment.settings_cls()
    settings = make_settings(args.method, {**base.to_dict(), **_lab_overrides(args.set or [])})
    out = check_writable_target(args.out) if args.out else None
    try:
        result = run_experiment(args.method, settings, Progress(LabProgressPrinter(), interval=0.5))
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return EXIT_CANCELLED
    if out is not None:
        result.save(out)
    print(result.summary)
    if out is not None:
        print(f"\nresult written to {out} (result.json and {len(result.figures)} figures)")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """The job queue of a data folder, read from the records on disk (no server needed)."""
    import json

    from pipelines.storage import home_dir
    from studio.job_records import operator_listing

    home = Path(args.home).expanduser() if args.home else home_dir()
    if not home.is_dir():
        raise ValueError(f"{home} is not a folder; give the data folder the server uses (--home, or BLOCKSTUDIO_HOME)")
    service, rows = operator_listing(home, everything=args.all)
    if args.json:
        print(json.dumps({"service": service, "jobs": rows}, indent=2, sort_keys=True))
        return 0
    print(_service_line(service))
    running = sum(r["status"] in ("running", "cancelling") for r in rows)
    waiting = sum(r["status"] == "queued" for r in rows)
    print(f"jobs: {running} running, {waiting} waiting" + ("" if args.all else " (done ones: --all)"))
    if not rows:
        return 0
    header = ("#", "JOB", "STATUS", "KIND", "METHOD", "MODEL", "NAME", "STEP", "WORKSPACE", "WORKER")
    table = [header] + [(
        str(r["position"]) if r["position"] is not None else "-", r["id"], r["status"], r["kind"], r["method"],
        r["model"], r["name"] or "-", f"{r['step']}/{r['total']}", r["workspace"], r["worker"] or "-",
    ) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _service_line(service: dict | None) -> str:
    """Who serves the data folder's jobs, as far as the service file (and this machine's processes) tell."""
    if service is None:
        return "served by: no server has served this data folder yet"
    facts = (f"{service['backend']}" + (f" at {service['address']}" if service.get("address") else "")
             + f" · {service['workers']} worker(s) · {service['gpus']} GPU(s) · {service['slots']} at a time"
             + (f" · {service['detail']}" if service.get("detail") else ""))
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(service["updated"]))
    if service["state"] == "serving":
        return f"served by: {facts} · pid {service['pid']} on {service['host']}, last seen {when}"
    if service["state"] == "stopped":
        return f"served by: nobody now (the last server, {facts}, stopped at {when})"
    return (f"served by: nobody now (the last server, {facts}, pid {service['pid']}, ended without stopping; its "
            "running jobs show as interrupted once a server starts)")


def cmd_app(args: argparse.Namespace) -> int:
    from studio.app import launch

    launch(host=args.host, port=args.port, share=args.share)
    return 0


# -- parser -------------------------------------------------------------------------------------------


def _add_setting_options(p: argparse.ArgumentParser, spec) -> None:
    """One option per setting of a recipe's settings dataclass, from its fields' metadata (flag, help, type,
    default, choices); `--model`'s help names the models of the recipe's architecture, and `{token_example}` and
    `{style_token_example}` in a help become tokens of the kind the recipe derives (`[v42]`, `[s42]`)."""
    from pipelines.models import architecture
    from pipelines.settings import setting_fields
    from studio.methods import models_for

    arch = spec.arch
    examples = {"{token_example}": spec.token_format.format(number=42),
                "{style_token_example}": (spec.style_token_format or spec.token_format).format(number=42)}
    for field in setting_fields(spec.settings):
        if field.flag is None:
            continue
        help_text = field.help or None
        for placeholder, example in examples.items():
            help_text = help_text and help_text.replace(placeholder, example)
        if field.name == "model" and not field.help:
            names = ", ".join(spec.name for spec in models_for(arch))
            help_text = f"{names}, a Hub id or a local {architecture(arch).label} folder"
        if field.kind == "flag":
            p.add_argument(field.flag, action="store_true", help=help_text)
        elif field.kind == "tristate":
            p.add_argument(field.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif field.required:
            p.add_argument(field.flag, required=True, help=help_text)
        else:
            default = ",".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
            kind = {"int": int, "float": float}.get(field.kind, str)
            p.add_argument(field.flag, type=kind, default=default, choices=field.choices, help=help_text)


def _add_force_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--force", action="store_true", help=f"replace {what}")


def _optional_parts() -> dict[str, list]:
    """{part: the recipes with it} of every part a recipe loads only when asked for (SplitFlux's boundary)."""
    from pipelines.recipes import all_recipes

    parts: dict[str, list] = {}
    for spec in all_recipes():
        for part in spec.parts:
            if part.optional:
                parts.setdefault(part.name, []).append((spec, part))
    return parts


def add_merge_and_watermark(sub) -> None:
    """The `merge` and `watermark embed|verify` commands."""
    merge = sub.add_parser("merge", help="merge the styles of several packages into one package")
    merge.add_argument("packages", nargs="+", help="two or more package folders (same base model and method)")
    merge.add_argument("--out", required=True, help="folder for the merged package")
    merge.add_argument("--mode", choices=["masked", "sum"], default="masked",
                       help="masked: each style adds its delta on its TALL mask (MergeVLA); sum: the plain "
                            "weighted sum of the styles' deltas")
    merge.add_argument("--lambda", dest="mask_lambda", type=float, default=0.6,
                       help="lambda of the masks |w tau| > lambda |sum - w tau| (MergeVLA: 0.6)")
    merge.add_argument("--weights", default=None, help="one weight per package, e.g. 1,0.5 (default 1 each)")
    merge.add_argument("--rank", type=int, default=None,
                       help="rank of the merged LoRA, by truncated SVD (default: the sum of the inputs' ranks; a "
                            "plain sum at that rank is written exactly, the factors side by side)")
    _add_force_option(merge, "an existing package at --out")
    merge.set_defaults(func=cmd_merge)

    mark = sub.add_parser("watermark", help="sign a package with a MarkBoard signature, or read it back")
    mark_commands = mark.add_subparsers(dest="watermark_command", required=True)
    embed = mark_commands.add_parser("embed", help="write a signature into a package (or swap the one it has)")
    embed.add_argument("package", help="the package folder")
    embed.add_argument("--signature", required=True, help="the bits, e.g. 10110010 (at most 64)")
    embed.add_argument("--out", default=None, help="write a signed copy here instead of signing the package itself")
    embed.add_argument("--strength", type=float, default=10.0,
                       help="how far a bit reads above an unsigned package's noise (6-16)")
    _add_force_option(embed, "an existing package at --out")
    verify = mark_commands.add_parser("verify", help="read a package's signature")
    verify.add_argument("package", help="the package folder")
    verify.add_argument("--part", default="full", help="which weight file to read (default: the whole adapter)")
    for command in (embed, verify):
        command.add_argument("--key", default=None,
                             help="the owner's key (default: $BLOCKSTUDIO_WATERMARK_KEY, else none: anyone can read "
                                  "and change the signature)")
        command.set_defaults(func=cmd_watermark)


def build_parser() -> argparse.ArgumentParser:
    from pipelines.recipes import all_recipes

    parser = argparse.ArgumentParser(prog="blockstudio", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train content and style adapters from one image")
    methods = train.add_subparsers(dest="method", required=True)
    for spec in all_recipes():
        recipe = methods.add_parser(spec.command, help=spec.cli_help or spec.label)
        _add_setting_options(recipe, spec)
        recipe.set_defaults(func=cmd_train, recipe=spec.key)

    gen = sub.add_parser("generate", help="generate with content and/or style adapters")
    gen.add_argument("--model", default=None, help="base model (default: the adapters' base model)")
    gen.add_argument("--content", default=None, help="package whose content adapter to use")
    gen.add_argument("--style", default=None, help="package whose style adapter to use")
    gen.add_argument("--content-scale", type=float, default=1.0)
    gen.add_argument("--style-scale", type=float, default=1.0)
    mixes = "; ".join(f"{spec.name}: {spec.composition.uses.get('mix', 'content')}" for spec in all_recipes())
    gen.add_argument("--content-part", default=None,
                     help=f"which content part (default: the one the package mixes with, {mixes}; or any part the "
                          "package has, e.g. content)")
    for part, owners in _optional_parts().items():
        described = "; ".join(f"{spec.name}: {what.description}" for spec, what in owners)
        gen.add_argument(f"--with-{part.replace('_', '-')}", action="store_true",
                         help=f"also load the content package's {part} part ({described}), at the content scale")
    gen.add_argument("--prompt", default=None, help='e.g. "A [c] in [s] style"; [c]/[s] become the tokens')
    gen.add_argument("--negative-prompt", default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=None, help="default: the model's (SDXL 50)")
    gen.add_argument("--fast", action="store_true", help="without --steps: the model's fast steps (SDXL 30)")
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--out", required=True, help="image file to write (.png, .jpg, .webp)")
    _add_force_option(gen, "an existing image file at --out")
    gen.set_defaults(func=cmd_generate)

    export = sub.add_parser("export", help="write a DyLoRA or SoRA package again at another rank")
    export.add_argument("package", help="a package trained with --adapter dylora or sora")
    export.add_argument("--rank", type=int, required=True,
                        help="DyLoRA: any rank in its range; SoRA: up to the live ranks its gates kept")
    export.add_argument("--out", required=True, help="new folder for the package at that rank")
    _add_force_option(export, "an existing package (or a folder of other files) at --out")
    export.set_defaults(func=cmd_export)

    importable = [spec for spec in all_recipes() if spec.importer is not None]
    imp = sub.add_parser("import", help="import a LoRA made elsewhere into an adapter package")
    imp.add_argument("file", help="a .safetensors LoRA (" + "; ".join(
        f"{spec.name}: {spec.importer.layouts}" for spec in importable) + ")")
    imp.add_argument("--out", required=True)
    imp.add_argument("--model", default=None, help="base model (default: the method's, e.g. " + ", ".join(
        f"{spec.defaults()['model']} for {spec.key}" for spec in importable) + ")")
    imp.add_argument("--token", default=None, help="the trigger token it was trained with (default: " + ", ".join(
        f"{spec.importer.default_token} for {spec.key}" for spec in importable) + ")")
    imp.add_argument("--method", default=importable[0].key if importable else None,
                     choices=[spec.key for spec in importable])
    _add_force_option(imp, "an existing package (or a folder of other files) at --out")
    imp.set_defaults(func=cmd_import)

    ins = sub.add_parser("inspect", help="show a package's adapter.json or a file's safetensors metadata")
    ins.add_argument("path")
    ins.set_defaults(func=cmd_inspect)

    add_merge_and_watermark(sub)

    models = sub.add_parser("models", help="list models, or print a model's local diffusers folder")
    models.add_argument("action", choices=["list", "path"])
    models.add_argument("name", nargs="?")
    models.set_defaults(func=cmd_models)

    lab = sub.add_parser("lab", help="run the adapter lab's experiments")
    lab_commands = lab.add_subparsers(dest="lab_command", required=True)
    lab_commands.add_parser("list", help="the adapter methods and whether each has an experiment").set_defaults(
        func=cmd_lab)
    lab_run = lab_commands.add_parser("run", help="run a method's experiment; print its summary")
    lab_run.add_argument("method", help="a method name from `blockstudio lab list`")
    lab_run.add_argument("--quick", action="store_true", help="the quick settings (seconds) instead of the full demo")
    lab_run.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="change one setting, e.g. --set ranks=1,2,4 --set steps=100 (repeatable)")
    lab_run.add_argument("--out", default=None, help="folder for the result: result.json and one PNG per figure")
    lab_run.set_defaults(func=cmd_lab)

    jobs = sub.add_parser("jobs", help="list the training and lab jobs of a data folder (no server needed)")
    jobs.add_argument("--home", default=None, help="the data folder (default: $BLOCKSTUDIO_HOME or ~/.cache/blockstudio)")
    jobs.add_argument("--all", action="store_true", help="also the finished and discarded jobs")
    jobs.add_argument("--json", action="store_true", help="print the service and the jobs as JSON")
    jobs.set_defaults(func=cmd_jobs, loads_models=False)

    app = sub.add_parser("app", help="start the studio in the browser")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--share", action="store_true")
    app.set_defaults(func=cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "loads_models", True):
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError, OverflowError) as exc:
        print(f"blockstudio: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _one_line(exc: BaseException) -> str:
    from pipelines.errors import is_disk_full

    if is_disk_full(exc):
        where = f" while writing {exc.filename}" if getattr(exc, "filename", None) else ""
        return f"the disk is full{where}; free some space and run the command again (--resume continues a run)"
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(message).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
