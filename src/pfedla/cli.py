"""``pfedla ...``: parses arguments and calls the library; no logic of its own.

``pfedla run``, ``report`` and ``deploy`` are defined here; packages built on the library add
commands of their own through the ``pfedla.commands`` entry point group (the Kubeflow layer adds
``pfedla pipeline``), so the library never imports them."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from pfedla.errors import PfedlaError, one_line, without_credentials

# Commands other packages add: each entry point is a function taking the parser's subcommands.
COMMANDS_GROUP = "pfedla.commands"


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set rounds=10 --set partition.kind=iid")


def _run(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla.results import format_table
    from pfedla.simulation import load_run_config, run_experiment

    if args.resume:
        if args.config or args.overrides:
            raise PfedlaError("--resume continues a run with its recorded config: drop --config/--set")
        config = load_run_config(args.resume)
    else:
        config = load_config(args.config, args.overrides)
    outcome = run_experiment(config, progress=not args.quiet, resume=bool(args.resume),
                             overwrite=args.overwrite)
    print(format_table(outcome.summary))
    print(f"\noutputs:  {outcome.output_dir}/ (summary.json, report.md, figures/; per seed s: seed_<s>/ with "
          "partition.json, layer_weights.npy, models/)")
    print(f"run:      {outcome.identity} (run.json; MLflow tag pfedla.run)")
    print(f"tracking: {without_credentials(outcome.tracking_uri)}")
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"view:     mlflow ui --backend-store-uri {outcome.tracking_uri}")


def _report(args: argparse.Namespace) -> None:
    from pfedla.report import write_report

    written = write_report(args.output_dir)
    print(f"wrote {written[0]} and {len(written) - 1} figures in {written[0].parent / 'figures'}/")


def _deploy(args: argparse.Namespace) -> None:
    from pfedla.ops.deploy import deploy

    applied = deploy(args.overlay, namespace=args.namespace, kubeconfig=args.kubeconfig,
                     context=args.context, wait_timeout=args.wait_timeout, secrets_env=args.secrets_env,
                     generate_secrets=args.generate_secrets, profile_namespace=args.profile_namespace)
    print(f"applied {len(applied)} objects:")
    for ref in applied:
        print(f"  {ref}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfedla", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the in-process simulation of every listed algorithm")
    add_config_args(run)
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--resume", metavar="OUTPUT_DIR",
                     help="continue an interrupted run from its last complete round")
    run.add_argument("--overwrite", action="store_true",
                     help="start over in an output_dir holding an unfinished run (deletes its checkpoints)")
    run.set_defaults(handler=_run)

    report = commands.add_parser("report", help="write report.md and figures for a finished run (pfedla run "
                                                "writes them too)")
    report.add_argument("output_dir", metavar="OUTPUT_DIR", help="the output_dir of a finished pfedla run")
    report.set_defaults(handler=_report)

    for command in entry_points(group=COMMANDS_GROUP):  # e.g. `pfedla pipeline`, from the KFP layer
        command.load()(commands)

    deploy_cmd = commands.add_parser("deploy", help="apply a kustomization (S3, MLflow, RBAC) to a cluster")
    deploy_cmd.add_argument("--overlay", required=True, help="kind, gpu, or a kustomization directory")
    deploy_cmd.add_argument("--namespace", help="namespace for pfedla's services (default: pfedla)")
    deploy_cmd.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    deploy_cmd.add_argument("--context", help="kubeconfig context")
    deploy_cmd.add_argument("--wait-timeout", type=float, default=300,
                            help="seconds to wait for rollouts (0: do not wait)")
    deploy_cmd.add_argument("--secrets-env",
                            help="env file with real credentials (default: k8s/base/secrets.env)")
    deploy_cmd.add_argument("--profile-namespace",
                            help="multi-user Kubeflow: also give this profile namespace what pfedla's steps "
                                 "need there (runner identity, S3 Secret, endpoints ConfigMap, step policy)")
    deploy_cmd.add_argument("--generate-secrets", action="store_true",
                            help="create k8s/base/secrets.env with random credentials if it does not exist "
                                 "(local clusters)")
    deploy_cmd.set_defaults(handler=_deploy)
    return parser


class _MaskedCredentials(logging.Filter):
    """Log lines (pfedla's and the libraries') without the password of any URL they quote."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = without_credentials(record.getMessage()), None
        return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _MaskedCredentials) for f in handler.filters):  # main() may run again
            handler.addFilter(_MaskedCredentials())
    logging.getLogger("pfedla").setLevel(logging.INFO)
    try:
        args.handler(args)
    except PfedlaError as error:
        # one line whatever the message quotes (a path with a line break), and no URL's password
        print(f"pfedla: error: {one_line(without_credentials(str(error)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pfedla: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
