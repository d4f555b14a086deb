"""The ``wurst`` command (also ``python -m wurst_core``)."""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Sequence


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wurst", description="Würstchen workbench")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("reproduce", help="run every notebook on a profile and rebuild reports/index.md")
    r.add_argument("--profile", default="tiny", choices=["smoke", "tiny", "paper"])
    r.add_argument("--only", nargs="*", help="notebook stems to run (default: all, in order)")

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

    args = p.parse_args(argv)
    if args.cmd == "reproduce":
        from .reproduce import reproduce

        times = reproduce(args.profile, args.only)
        print("wall seconds per notebook:", {k: round(v, 1) for k, v in times.items()})
    elif args.cmd == "run":
        from .reproduce import run_notebook

        out = run_notebook(args.notebook, args.profile, {k: _value(v) for k, v in args.param})
        print(out)
    elif args.cmd == "notebooks":
        from .reproduce import notebook_parameters, notebooks

        for name in notebooks():
            print(name)
            for k, v in notebook_parameters(name).items():
                print(f"    {k}: {v['inferred_type_name']} = {v['default']}  # {v['help']}")
    elif args.cmd == "report":
        from .report import build_report

        print(build_report(args.profile))
    elif args.cmd == "data":
        from .data import save_preview

        print(save_preview(args.kind, args.out, n=args.n, resolution=args.resolution, seed=args.seed, root=args.root))
    elif args.cmd == "generate":
        from .pipeline import generate

        kw = {k: v for k, v in dict(height=args.height, width=args.width).items() if v is not None}
        print(generate(" ".join(args.prompt), args.weights, seed=args.seed, out=args.out,
                       prior_steps=args.prior_steps, prior_guidance=args.prior_guidance,
                       decoder_steps=args.decoder_steps, decoder_guidance=args.decoder_guidance, **kw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
