"""The ``wurst`` command (also ``python -m wurst_core``).

Errors: a user error (a missing file or folder, a bad parameter or checkpoint, a size that does not fit) prints
``wurst: error: <message>`` on stderr (one line, but for listings such as a checkpoint's misfitting keys) and exits
with 2, as argparse does for bad options; anything else prints one ``wurst: error: unexpected ...`` line and exits
with 1. ``wurst --debug <command>`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from typing import Any, Sequence

from ..data import save_preview
from ..generate import generate
from ..human.analysis import AnalysisSpec, analyse, load
from ..human.figures import write_report
from ..human.server import serve
from ..human.simulate import RaterModel, parse_strengths, simulate_http, simulate_service
from ..human.store import Store
from ..params import build
from ..studies.preference_study import PreferenceParams, create_study, recovered_gap
from .registry import notebooks, schema
from .report import build_report
from .reproduce import notebook_parameters, reproduce, run_notebook


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wurst", description="Würstchen workbench")
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("reproduce", help="run every notebook on a profile and rebuild reports/index.md")
    r.add_argument("--profile", default="tiny", choices=["smoke", "tiny", "paper"])
    r.add_argument("--only", nargs="*", help="notebook stems to run (default: all, in order)")
    r.add_argument("--resume", action="store_true",
                   help="continue the newest reproduce run: skip finished notebooks, resume interrupted training")

    n = sub.add_parser("run", help="run one notebook through papermill into its run folder")
    n.add_argument("notebook", help="notebook stem, e.g. 03_stage_a")
    n.add_argument("--profile", default="tiny", choices=["smoke", "tiny", "paper"])
    n.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))

    sub.add_parser("notebooks", help="list the notebooks and their parameters")
    rep = sub.add_parser("report", help="rebuild reports/index.md from the latest runs")
    rep.add_argument("--profile", default="tiny", choices=["smoke", "tiny", "paper"])

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dp = dsub.add_parser("preview", help="save a captioned preview grid")
    dp.add_argument("--kind", default="procedural", choices=["procedural", "emoji", "folder"])
    dp.add_argument("--root", default=None, help="images + captions folder, manifest or tar shards (--kind folder)")
    dp.add_argument("--n", type=int, default=16)
    dp.add_argument("--resolution", type=int, default=64)
    dp.add_argument("--seed", type=int, default=0)
    dp.add_argument("--out", default="preview.png")

    g = sub.add_parser("generate", help="text to image with a trained or released Würstchen")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--weights", required=True, help="folder: our checkpoints, released .pt files or diffusers folders")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="image.png")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--prior-steps", type=int, default=60)
    g.add_argument("--prior-guidance", type=float, default=None, help="Stage C guidance (default: the pipeline's own)")
    g.add_argument("--decoder-steps", type=int, default=12)
    g.add_argument("--decoder-guidance", type=float, default=None, help="Stage B guidance (default: the pipeline's own)")
    g.add_argument("--dtype", default=None, help="the networks' precision: float32 (default) or bfloat16")

    _study_parser(sub)

    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message: return its code, as for every other error
        return e.code if isinstance(e.code, int) else 2
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("wurst: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        message = _user_error(e)
        if message is not None:
            print(f"wurst: error: {message}", file=sys.stderr)
            return 2
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"wurst: error: unexpected {type(e).__name__}: {first} (rerun as `wurst --debug ...` for the "
              f"traceback)", file=sys.stderr)
        return 1


def _type_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _user_error(e: Exception) -> str | None:
    """The message of an error the user can fix (bad input), None for anything else (a bug)."""
    if isinstance(e, KeyError):  # str(KeyError) is the key's repr; say what it is
        return f"missing key {e}"
    if isinstance(e, (OSError, ValueError)):  # files; parameters (ParameterError), checkpoints, sizes, memory
        return str(e) or type(e).__name__
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's is a RuntimeError
        return f"out of memory ({str(e).splitlines()[0] if str(e) else 'no details'}); ask for a smaller image"
    return None


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "reproduce":
        times = reproduce(args.profile, args.only, resume=args.resume)
        print("wall seconds per notebook:", {k: round(v, 1) for k, v in times.items()})
    elif args.cmd == "run":
        out = run_notebook(args.notebook, args.profile, {k: _value(v) for k, v in args.param})
        print(out)
    elif args.cmd == "notebooks":
        for name in notebooks():  # the schema's fields, with the help of the notebook's parameters cell
            print(name)
            cell = notebook_parameters(name)
            for f in dataclasses.fields(schema(name)):
                help_ = cell.get(f.name, {}).get("help", "(missing from the parameters cell)")
                allowed = (f"  in {f.metadata['domain']}" if "domain" in f.metadata else
                           f"  one of {' | '.join(map(str, f.metadata['choices']))}" if "choices" in f.metadata else "")
                print(f"    {f.name}: {_type_name(f.type)} = {f.default!r}  # {help_}{allowed}")
    elif args.cmd == "report":
        print(build_report(args.profile))
    elif args.cmd == "data":
        print(save_preview(args.kind, args.out, n=args.n, resolution=args.resolution, seed=args.seed, root=args.root))
    elif args.cmd == "study":
        return _study(args)
    elif args.cmd == "generate":
        kw = {k: v for k, v in dict(height=args.height, width=args.width).items() if v is not None}
        print(generate(" ".join(args.prompt), args.weights, seed=args.seed, out=args.out, dtype=args.dtype,
                       prior_steps=args.prior_steps, prior_guidance=args.prior_guidance,
                       decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance, **kw))
    return 0


def _study_parser(sub: Any) -> None:
    s = sub.add_parser("study", help="the human preference study (paper Figure 5): create, serve, simulate, analyse")
    ssub = s.add_subparsers(dest="study_cmd", required=True)
    c = ssub.add_parser("create", help="render every system's images once and write the study's design")
    c.add_argument("--db", required=True, help="the new study database (SQLite); images go beside it")
    c.add_argument("--profile", default="tiny", choices=["smoke", "tiny", "paper"])
    c.add_argument("--systems", default="", help="comma-separated: truth, wuerstchen, baseline, counterfactual, "
                   "shuffled, folder:PATH, pipeline:PATH (default: the profile's)")
    c.add_argument("--prompt-sets", default="novel,seen")
    for name, kind, default in (("n-prompts", int, 0), ("pairs-per-prompt", int, 0), ("attention-share", float, 0.1),
                                ("repeat-share", float, 0.1), ("resolution", int, 64), ("prior-steps", int, 0),
                                ("decoder-steps", int, 0), ("judge-steps", int, 0), ("seed", int, 0)):
        c.add_argument(f"--{name}", type=kind, default=default, help="0: the profile's" if default == 0 else None)
    v = ssub.add_parser("serve", help="the rating page (loopback address unless told otherwise)")
    v.add_argument("--db", required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8765)
    m = ssub.add_parser("simulate", help="simulated raters with known preferences (marked simulated)")
    m.add_argument("--db", required=True)
    m.add_argument("--raters", type=int, required=True)
    m.add_argument("--votes", type=int, required=True, help="comparisons per rater (the mean, with --spread)")
    m.add_argument("--url", default=None, help="vote over HTTP through a running `wurst study serve`, concurrently")
    m.add_argument("--spread", type=float, default=0.0, help="log-SD of comparisons per rater (0: all make --votes)")
    m.add_argument("--strengths", default="", help="name:value,... (default: 0.5 apart in the study's system order)")
    for name, default in (("position-bias", 0.3), ("tie", 0.3), ("heterogeneity", 0.2), ("careless", 0.05),
                          ("lapse", 0.03)):
        m.add_argument(f"--{name}", type=float, default=default)
    m.add_argument("--seed", type=int, default=0)
    a = ssub.add_parser("analyse", help="Figure 5, Bradley-Terry, data quality and judge agreement into --out")
    a.add_argument("--db", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--reference", default="", help="Figure 5's system (default: the study's first)")
    a.add_argument("--n-boot", type=int, default=1000)
    a.add_argument("--max-attention-fail", type=float, default=0.34)
    a.add_argument("--seed", type=int, default=0)


def _study(args: argparse.Namespace) -> int:
    if args.study_cmd == "create":
        values = {k: getattr(args, k) for k in ("profile", "systems", "prompt_sets", "n_prompts", "pairs_per_prompt",
                                                 "attention_share", "repeat_share", "resolution", "prior_steps",
                                                 "decoder_steps", "judge_steps", "seed")}
        store = create_study(build(PreferenceParams, values), args.db, log=lambda m: print(f"note: {m}"))
        n, meta = store.counts(), store.meta()
        print(f"study {store.path}: systems {meta['systems']}, {n['prompts']} prompts, {n['items']} items; "
              f"images in {store.images_dir}")
    elif args.study_cmd == "serve":
        serve(args.db, args.host, args.port)
    elif args.study_cmd == "simulate":
        store = Store(args.db)
        systems = store.meta().get("systems", [])
        model = RaterModel(parse_strengths(args.strengths, systems), position_bias=args.position_bias, tie=args.tie,
                           heterogeneity=args.heterogeneity, careless=args.careless, lapse=args.lapse)
        if args.raters < 1 or args.votes < 1:
            raise ValueError(f"--raters and --votes must be >= 1, got {args.raters} and {args.votes}")
        if args.url:
            out = simulate_http(args.url, store, model, args.raters, args.votes, args.spread, args.seed)
            if out["errors"] and not out["acknowledged"]:
                raise ConnectionError(f"no vote reached {args.url}: {out['errors'][0]}")
            stopped = f"; {len(out['errors'])} raters stopped on errors" if out["errors"] else ""
            print(f"{len(out['acknowledged'])} simulated judgments acknowledged over HTTP by {args.raters} "
                  f"raters{stopped}")
        else:
            out = simulate_service(store, model, args.raters, args.votes, args.spread, args.seed)
            print(f"{out['judgments']} simulated judgments by {args.raters} raters stored in {store.path}")
        print("population Bradley-Terry strengths the analysis should recover:",
              {k: round(v, 3) for k, v in out["population_strengths"].items()})
    elif args.study_cmd == "analyse":
        store = Store(args.db)
        result = analyse(load(store), AnalysisSpec(args.reference, args.n_boot, args.max_attention_fail,
                                                   seed=args.seed))
        written = write_report(result, args.out)
        store.export_csv(f"{args.out}/csv")
        print(f"{result.label} data: {result.info['judgments']} judgments of {result.info['raters']} raters "
              f"({result.info['raters_kept']} kept after the attention checks)")
        print("Bradley-Terry gap:", recovered_gap(result))
        print(f"figures and tables in {args.out}: {sorted(p.name for p in written.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
