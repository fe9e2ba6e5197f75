"""``pfedla ...``: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pfedla.errors import PfedlaError, one_line, without_credentials


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: the embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set rounds=10 --set partition.kind=iid")


def _run(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla.simulation import format_table, load_run_config, run_experiment

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


def _pipeline_compile(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla_pipelines.fl_pipeline import compile_pipeline, segments

    config = load_config(args.config, args.overrides)
    rounds = compile_pipeline(config, args.output)
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output} ({size / 1024:.0f} KiB): rounds {rounds.first}..{rounds.stop - 1} "
          f"of {rounds.total}")
    if not rounds.finishes:
        print(f"this is segment 1 of {len(segments(config))}: `pfedla pipeline submit` runs them all in turn")


def _pipeline_run_local(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla_pipelines.runner import run_local

    config = load_config(args.config, args.overrides)
    summary = run_local(config, args.pipeline_root)
    for name, entry in summary.items():
        print(f"{name}: mean accuracy {entry['mean_accuracy']:.4f} over test samples, "
              f"{entry['client_mean_accuracy']:.4f} over clients, after {entry['rounds']} rounds "
              f"(min {entry['min_accuracy']:.4f}, max {entry['max_accuracy']:.4f}), "
              f"{entry['segments']} segment(s)")
        for round_idx, traffic in entry["data_movement"]["rounds"].items():
            print(f"  round {round_idx}: {traffic['moved_bytes'] / 2**20:.1f} MiB through the data plane, "
                  f"{traffic['ratio']:.3f}x the least possible")
    print(f"outputs: {config.output_dir}/summary.json")


def _pipeline_submit(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla_pipelines.runner import submit

    config = load_config(args.config, args.overrides)
    run_ids = submit(config, args.host, args.experiment, wait=args.wait, poll_seconds=args.poll_seconds)
    print(f"{without_credentials(args.host)}: runs {', '.join(run_ids)}")


def _deploy(args: argparse.Namespace) -> None:
    from pfedla.deploy import deploy

    applied = deploy(args.overlay, namespace=args.namespace, kubeconfig=args.kubeconfig,
                     context=args.context, wait_timeout=args.wait_timeout, secrets_env=args.secrets_env,
                     generate_secrets=args.generate_secrets)
    print(f"applied {len(applied)} objects:")
    for ref in applied:
        print(f"  {ref}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfedla", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the in-process simulation of every listed algorithm")
    _add_config_args(run)
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

    pipeline = commands.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit")
    actions = pipeline.add_subparsers(dest="action", required=True)
    compile_cmd = actions.add_parser("compile", help="write the pipeline YAML")
    _add_config_args(compile_cmd)
    compile_cmd.add_argument("-o", "--output", default="pipeline.yaml", help="YAML file to write")
    compile_cmd.set_defaults(handler=_pipeline_compile)
    local_cmd = actions.add_parser("run-local", help="run the pipeline here with kfp.local (no cluster)")
    _add_config_args(local_cmd)
    local_cmd.add_argument("--pipeline-root", help="where step outputs go (default: a temp directory)")
    local_cmd.set_defaults(handler=_pipeline_run_local)
    submit_cmd = actions.add_parser("submit",
                                    help="submit to a Kubeflow Pipelines API server, segment by segment")
    _add_config_args(submit_cmd)
    submit_cmd.add_argument("--host", required=True, help="KFP API URL, e.g. http://localhost:8080")
    submit_cmd.add_argument("--experiment", help="KFP experiment (default: experiment_name)")
    submit_cmd.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                            help="follow each segment and submit the next when it succeeds (default: on when "
                                 "rounds > pipeline.rounds_per_run)")
    submit_cmd.add_argument("--poll-seconds", type=float, default=15.0,
                            help="how often --wait asks for status")
    submit_cmd.set_defaults(handler=_pipeline_submit)

    deploy_cmd = commands.add_parser("deploy", help="apply a kustomization (S3, MLflow, RBAC) to a cluster")
    deploy_cmd.add_argument("--overlay", required=True, help="kind, gpu, or a kustomization directory")
    deploy_cmd.add_argument("--namespace", help="namespace for pfedla's services (default: pfedla)")
    deploy_cmd.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    deploy_cmd.add_argument("--context", help="kubeconfig context")
    deploy_cmd.add_argument("--wait-timeout", type=float, default=300,
                            help="seconds to wait for rollouts (0: do not wait)")
    deploy_cmd.add_argument("--secrets-env",
                            help="env file with real credentials (default: k8s/base/secrets.env)")
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
