"""The ``sparseforge`` command line.

Flags of ``train`` are generated from :class:`TrainConfig`, so a field added to
the config is a flag with its help text, type and accepted values at once.
User errors print one line (``error: ...``) and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import SparseforgeError
from . import rundir


# ---- config -> argparse ---------------------------------------------------
def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{help_} (default: {default})", **kw)
            continue
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
        elif get_origin(tp) is tuple:
            kw["type"] = lambda s: [float(v) for v in s.split(",") if v.strip()]
            kw["metavar"] = "A,B,..."
        elif tp in (int, float, str):
            kw["type"] = tp
        parser.add_argument(flag, help=f"{help_} (default: {default})", **kw)


def config_from_args(cls, args: argparse.Namespace, base: dict[str, Any] | None = None):
    values = dict(base or {})
    for name in cls.field_names():
        if hasattr(args, name):
            values[name] = getattr(args, name)
    return cls.from_dict(values)


# ---- commands ---------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .api import default_run_dir, train
    from .train import TrainConfig

    base = TrainConfig.load(args.config).to_dict() if args.config else {}
    cfg = config_from_args(TrainConfig, args, base)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    if args.resume and (run_dir / rundir.CONFIG).exists():
        from .train import TrainConfig as TC

        saved = TC.load(run_dir / rundir.CONFIG)
        changed = [k for k in TrainConfig.field_names() if hasattr(args, k) and getattr(saved, k) != getattr(cfg, k)]
        if changed:
            raise SparseforgeError(f"--resume uses the run's saved config; these flags differ from it: {', '.join(changed)}. "
                                   "Drop them, or start a new --run-dir")
    _, result = train(cfg, run_dir, resume=args.resume, progress=None if not args.no_progress else False,
                      announce=True)
    from .distributed import is_main

    if is_main():                 # under torchrun one result line, not one per rank
        print(json.dumps({k: v for k, v in result.items() if k != "split"}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_model

    t0 = time.perf_counter()
    model = None
    if args.weights:
        from .models import read_state_dict, spec_from_metadata

        p = Path(args.weights)
        # a file or run that records its model (pruned widths, folded blocks, masks) is rebuilt from that record
        if p.is_dir() or (p.suffix == ".safetensors" and spec_from_metadata(read_state_dict(p)[1], p)):
            model, _ = _model_from_path(p, args.model)
            args.model = args.model or model.sf_spec["name"]
    if model is None and not args.model:
        raise SparseforgeError(f"{args.weights or 'no --weights'}: nothing says which model to build; pass --model "
                               "NAME (e.g. resnet20)")
    res = evaluate_model(args.model, args.weights, args.dataset, args.data_dir, args.normalize,
                         args.batch_size, args.limit, args.threads, model=model)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    print(f"{args.model} on {args.dataset} test ({res['n']} images): top-1 {res['acc']:.2f}%  loss {res['loss']:.4f}")
    if args.json:
        print(json.dumps({"model": args.model, "weights": str(args.weights), **res}))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import torch

    from .models import create_model, load_weights
    from .report.stats import model_stats

    model = create_model(args.model, num_classes=args.num_classes)
    if args.weights:
        load_weights(model, args.weights)
    st = model_stats(model, torch.zeros(1, 3, args.size, args.size))
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
    else:
        print(st.to_markdown())
        print(f"\nparams {st.total_params:,}  MACs {st.macs:,}  FLOPs {st.flops:,}  sparsity {100 * st.sparsity:.2f}%")
    return 0


def cmd_groups(args: argparse.Namespace) -> int:
    """The structured-pruning pre-flight: what ``StructuredConfig`` can thin and ``DepthConfig`` can drop, before
    any training is spent on it."""
    import torch

    from .models import create_model, load_weights
    from .structured import DepthConfig, block_macs, candidate_blocks, count_macs, groups

    model = create_model(args.model, num_classes=args.num_classes).eval()
    if args.weights:
        load_weights(model, args.weights)
    x = torch.zeros(1, 3, args.size, args.size)
    g = groups(model, x)
    ignored = tuple(args.ignore or ())
    total = count_macs(model, x)
    macs = block_macs(model, x)
    cands = candidate_blocks(model, DepthConfig(blocks=1, ignored_layers=ignored))
    if args.json:
        print(json.dumps({
            "model": args.model, "macs": total,
            "groups": [{"name": gr.name, "channels": len(gr), "kinds": sorted(gr.kinds), "blocked": gr.blocked,
                        "modules": gr.modules} for gr in g.groups(ignored)],
            "could_not_group": list(dict.fromkeys(g.problems)),
            "droppable_blocks": {n: macs.get(n, 0) / total for n in cands}}, indent=2))
        return 0
    print(g.explain(ignored))
    print(f"\n{len(cands)} residual blocks DepthConfig may drop (identity shortcut), each this share of the "
          f"{total:,} MACs:")
    for n in cands:
        print(f"  {n:28s} {100 * macs.get(n, 0) / total:5.2f}%")
    if not cands:
        print("  none: depth pruning needs residual blocks with an identity shortcut and remove_branch()")
    return 0


def parse_sets(items: list[str]) -> dict:
    """--set a.b=value pairs -> nested dict; values parsed as TOML scalars (strings may be bare)."""
    from .config import loads_toml

    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SparseforgeError(f"--set {item!r}: use key=value, e.g. --set train.lr=0.01")
        key, val = item.split("=", 1)
        try:
            v = loads_toml(f"v = {val}")["v"]
        except SparseforgeError:
            v = val
        d = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def _stage_methods_help() -> str:
    """Every registered recipe method with the first line of its config's docstring (the registry, not a list)."""
    from .stages import STAGES

    rows = ["methods a [[stage]] can name (method = ...; fields: the config's, see docs/GUIDE.md):"]
    for name, cls in STAGES.items():
        doc = (cls.config.__doc__ or cls.__doc__ or "").strip().splitlines()
        rows.append(f"  {name:12s} {cls.config.__name__}{' (prunes)' if cls.prunes else ''}: {doc[0] if doc else ''}")
    return "\n".join(rows)


def cmd_compress(args: argparse.Namespace) -> int:
    from .recipe import Recipe, RecipeRunner

    p = Path(args.recipe)
    sets = parse_sets(args.set)
    if args.data_dir:
        sets["data_dir"] = args.data_dir
    recipe = Recipe.load_file(p, sets)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / recipe.run_name(p.stem)
    resume = args.resume or (run_dir / rundir.RECIPE).exists()  # same recipe required; checked by the runner
    res = RecipeRunner(recipe, run_dir, progress=None if not args.no_progress else False).run(resume=resume)
    from .distributed import is_main

    if not is_main():
        return 0
    print(f"final test accuracy {res['final']['acc']:.2f}% (start {res['start']['acc']:.2f}%)")
    print(f"report: {run_dir / 'report.html'}")
    return 0


def _model_from_path(path: Path, model_name: str | None):
    """Rebuild a model (masks and pattern library included) from a run directory or a weights file; ``model_name``
    overrides the name the file records (a foreign state dict records none)."""
    from .checkpoint import latest_checkpoint
    from .models import load_weights, model_from_spec, read_state_dict, spec_from_metadata

    weights = path
    if path.is_dir():
        weights = path / rundir.MODEL
        if not weights.exists():
            ref = latest_checkpoint(path)
            if ref is None:
                raise SparseforgeError(f"{path} holds no model.safetensors and no checkpoints; pass a run directory or weights file")
            weights = ref.weights_path
    spec = spec_from_metadata(read_state_dict(weights)[1], weights)
    if model_name:
        spec = {**(spec or {}), "name": model_name}
    if spec is None:
        raise SparseforgeError(f"{weights} does not say which model it holds; pass --model NAME")
    return load_weights(model_from_spec(spec), weights).eval(), weights


def cmd_compile(args: argparse.Namespace) -> int:
    import torch

    from .engine import compile as sf_compile

    path = Path(args.source)
    model, weights = _model_from_path(path, args.model)
    shape = args.input_shape
    x = torch.randn(1, *shape)
    engine, st = sf_compile(model, x, threads=args.threads or None, portable=args.portable, return_stages=True,
                            isa=args.isa)
    xb = torch.randn(4, *shape)
    with torch.inference_mode():
        ref = model(xb)
    err = float((engine(xb) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "engine"
    engine.save(out)
    print(engine.summary())
    print(f"compiled {weights} in {sum(st.seconds.values()):.2f} s ({'cached build' if st.build_info['cached'] else 'cold build'}); "
          f"max |engine - torch| / max |torch| = {err:.2e} on 4 random inputs")
    print(f"engine: {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import copy

    import torch

    from .engine import compile as sf_compile
    from .report.env import environment
    from .report.latency import measure, torch_fused
    from .sparsity import fold_masks
    from .utils import atomic_write_json

    torch.set_num_threads(args.threads)
    model, weights = _model_from_path(Path(args.source), args.model)
    shape = args.input_shape
    engine = sf_compile(model, torch.randn(1, *shape), threads=args.threads)
    dense = torch_fused(fold_masks(copy.deepcopy(model)))
    x = torch.randn(args.batch, *shape)
    res = measure({"sparseforge": lambda: engine(x), "torch (BN folded)": lambda: dense(x)}, runs=args.runs)
    for k, v in res.items():
        print(f"{k:20s} median {v['median_ms']:.3f} ms  (p10 {v['p10_ms']:.3f}, p90 {v['p90_ms']:.3f}, "
              f"{v['runs']} runs)")
    sp = res["torch (BN folded)"]["median_ms"] / res["sparseforge"]["median_ms"]
    print(f"speedup {sp:.2f}x at batch {args.batch}, {args.threads} threads")
    if args.json:
        atomic_write_json(Path(args.json), {"weights": str(weights), "batch": args.batch, "threads": args.threads,
                                            "arms": res, "speedup": sp, "env": environment()})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .models import list_models
    from .report.env import environment

    env = environment()
    if args.json:
        print(json.dumps({**env, "models": list_models()}, indent=2))
        return 0
    for k, v in env.items():
        print(f"{k:22s} {', '.join(v) if isinstance(v, list) else v}")
    print(f"{'models':22s} {', '.join(list_models())}")
    print(f"{'OMP_NUM_THREADS':22s} {os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(data_dir=args.data_dir, out=args.out, epochs=args.epochs, threads=args.threads)
    return 0


def _recipe_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("recipe", help="recipe TOML (see recipes/)")
    c.add_argument("--data-dir", help="dataset directory (overrides the recipe's data_dir)")
    c.add_argument("--run-dir", help="run directory (default: runs/<recipe>-<hash of the resolved recipe>)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=0.01 --set stage.0.epochs=1")
    c.add_argument("--resume", action="store_true", help="continue the run in --run-dir (automatic for the default run dir)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_compress)


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_onnx

    model, weights = _model_from_path(Path(args.source), args.model)
    out = Path(args.out)
    if out.exists():
        raise SparseforgeError(f"{out} exists; choose another --out (nothing is overwritten)")
    export_onnx(model, torch.randn(1, 3, args.size, args.size), out)
    print(f"wrote {out} (from {weights})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.compare import compare_runs

    md, html_path = compare_runs([Path(r) for r in args.runs], Path(args.out))
    print(md)
    print(f"report: {html_path}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as the CLI's one-line error (exit 2) instead of usage + message."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _int_at_least(lo: int, what: str = "an integer"):
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {lo}, got {v!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"expected {what} >= {lo}, got {n}")
        return n
    parse.__name__ = f"integer >= {lo}"
    return parse


def _input_shape(v: str) -> tuple[int, ...]:
    """C,H,W of one image, each a positive integer."""
    parts = v.split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected C,H,W with three positive integers (e.g. 3,32,32), got {v!r}")
    return shape


_input_shape.__name__ = "C,H,W"


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .train import TrainConfig

    p = _Parser(prog="sparseforge", description="Make CNNs small and measurably fast on CPUs.")
    p.add_argument("--version", action="version", version=f"sparseforge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (resumable)", description="Train a model. Every TrainConfig field is a flag.")
    t.add_argument("--config", help="TOML file with TrainConfig fields (flags override it)")
    t.add_argument("--run-dir", help="run directory (default: runs/train-<model>-<dataset>-<config hash>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(t, TrainConfig)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="test accuracy of a model and weights")
    e.add_argument("--model", help="model name, e.g. resnet20 (default: the one the weights file records)")
    e.add_argument("--weights", help=".safetensors / .pt / .th file or run directory")
    e.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "synthetic"])
    e.add_argument("--data-dir", help="CIFAR python-batch directory")
    e.add_argument("--normalize", default="auto", choices=["auto", "imagenet", "cifar10", "cifar100", "half"],
                   help="input normalisation (auto = imagenet for CIFAR, as the shared weights expect)")
    e.add_argument("--batch-size", type=_int_at_least(1), default=256)
    e.add_argument("--limit", type=_int_at_least(0), default=0, help="only the first N test images (0 = all)")
    e.add_argument("--threads", type=_int_at_least(0), default=0)
    e.add_argument("--json", action="store_true", help="also print a JSON line")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("stats", help="per-layer params, sparsity and FLOPs of a model")
    s.add_argument("--model", required=True)
    s.add_argument("--weights")
    s.add_argument("--num-classes", type=_int_at_least(1), default=10)
    s.add_argument("--size", type=_int_at_least(1), default=32, help="input height/width")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_stats)

    for name, helptext in (("run", "run a recipe: train -> compress -> fine-tune -> compile -> bench -> report"),
                           ("compress", "alias of run")):
        c = sub.add_parser(name, help=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Run a recipe's stages; re-running the same command resumes an interrupted "
                                       "run (finished stages are loaded, an interrupted stage continues from its "
                                       "last checkpoint). The resolved recipe is saved and hashed into the run "
                                       "directory name.", epilog=_stage_methods_help())
        _recipe_args(c)

    rp = sub.add_parser("report", help="compare run directories side by side (markdown + self-contained HTML)")
    rp.add_argument("runs", nargs="+", help="run directories (each holds results.json)")
    rp.add_argument("--out", default="report-compare", help="output path without extension (default report-compare)")
    rp.set_defaults(fn=cmd_report)

    ex = sub.add_parser("export", help="ONNX of the folded model (masks folded to zeros), for other runtimes")
    ex.add_argument("source", help="run directory or weights file")
    ex.add_argument("--model", help="model name, if the weights do not record it")
    ex.add_argument("--out", required=True, help="output .onnx path")
    ex.add_argument("--size", type=_int_at_least(1), default=32, help="input height/width")
    ex.set_defaults(fn=cmd_export)

    cc = sub.add_parser("compile", help="compile a pruned model into a fast CPU engine artefact")
    cc.add_argument("source", help="run directory (compress/train) or weights file")
    cc.add_argument("--model", help="model name, if the weights do not record it")
    cc.add_argument("--out", help="artefact directory (default: <run dir>/engine)")
    cc.add_argument("--threads", type=_int_at_least(0), default=0, help="threads the engine runs with (default: torch's)")
    cc.add_argument("--input-shape", type=_input_shape, default=(3, 32, 32), help="per-image input shape C,H,W")
    cc.add_argument("--portable", action="store_true", help="build without -march=native (runs on any x86-64)")
    cc.add_argument("--isa", choices=["native", "avx2", "portable"], default=None,
                    help="instruction set: native (default, this CPU), avx2 (what AVX2-only CPUs run), portable")
    cc.set_defaults(fn=cmd_compile)

    b = sub.add_parser("bench", help="measure engine latency against PyTorch dense")
    b.add_argument("source", help="run directory or weights file")
    b.add_argument("--model", help="model name, if the weights do not record it")
    b.add_argument("--batch", type=_int_at_least(1), default=1)
    b.add_argument("--threads", type=_int_at_least(1), default=2)
    b.add_argument("--runs", type=_int_at_least(1), default=30)
    b.add_argument("--input-shape", type=_input_shape, default=(3, 32, 32))
    b.add_argument("--json", help="write the measurements to this JSON file")
    b.set_defaults(fn=cmd_bench)

    gp = sub.add_parser("groups", help="structured pre-flight: dependency groups, what cannot be pruned and why, "
                                       "droppable residual blocks")
    gp.add_argument("--model", default="resnet20")
    gp.add_argument("--weights", help="weights to load first (optional: the groups depend on the architecture)")
    gp.add_argument("--num-classes", type=_int_at_least(1), default=10)
    gp.add_argument("--size", type=_int_at_least(1), default=32, help="input height and width")
    gp.add_argument("--ignore", action="append", help="layer name or glob never pruned (repeatable)")
    gp.add_argument("--json", action="store_true")
    gp.set_defaults(fn=cmd_groups)

    i = sub.add_parser("info", help="versions, CPU features, threads, models")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)

    d = sub.add_parser("demo", help="offline end-to-end demo on synthetic data (CIFAR with --data-dir)")
    d.add_argument("--data-dir", help="run on CIFAR-10 from this directory instead of synthetic data")
    d.add_argument("--out", default="runs/demo", help="run directory root (default runs/demo)")
    d.add_argument("--epochs", type=_int_at_least(0), default=0, help="training epochs (default: 4 synthetic, 1 CIFAR)")
    d.add_argument("--threads", type=_int_at_least(0), default=0)
    d.set_defaults(fn=cmd_demo)
    return p


def os_error_line(e: OSError) -> str | None:
    """One line for what the user's machine refused (permissions, read-only or full disk), naming the path and the
    fix; None for any other OS error. Every write is atomic, so what was there before is intact."""
    import errno

    full = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    if e.errno not in full | {errno.EACCES, errno.EPERM, errno.EROFS}:
        return None
    where = f" {e.filename}" if e.filename else ""
    fix = ("free disk space (df -h) or write elsewhere (--run-dir / --out)" if e.errno in full else
           "check the directory's permissions or write elsewhere (--run-dir / --out)")
    return f"cannot write{where}: {e.strerror}; {fix} (files already there are unchanged)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import init_from_env, shutdown

    init_from_env()          # under torchrun: DDP process group from the environment
    try:
        return args.fn(args)
    except SparseforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise                     # not the user's disk or permissions: a bug, keep its traceback
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; runs with a --run-dir can be continued with --resume", file=sys.stderr)
        return 130
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
