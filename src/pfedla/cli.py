"""``pfedla ...``: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import sys

from pfedla.errors import PfedlaError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set rounds=10 --set partition.kind=iid")


def _run(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla.simulation import format_table, run_experiment

    config = load_config(args.config, args.overrides)
    outcome = run_experiment(config, progress=not args.quiet)
    print(format_table(outcome.results))
    print(f"\noutputs:  {outcome.output_dir}/ (summary.json, partition.json, layer_weights.npy, models/)")
    print(f"tracking: {outcome.tracking_uri}")
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"view:     mlflow ui --backend-store-uri {outcome.tracking_uri}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfedla", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the in-process simulation of every listed algorithm")
    _add_config_args(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except PfedlaError as error:
        print(f"pfedla: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pfedla: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
