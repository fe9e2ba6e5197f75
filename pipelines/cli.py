"""``pfedla pipeline compile | run-local | submit``: the Kubeflow layer's commands.

They are added to the ``pfedla`` command through the ``pfedla.commands`` entry point (see
pyproject.toml), so the library's CLI never imports the KFP layer. Like the rest of the CLI, they
parse arguments and call :mod:`pfedla_pipelines.fl_pipeline` and :mod:`pfedla_pipelines.runner`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pfedla.cli import add_config_args

# The handlers import the pipeline modules (and so kfp) only when a pipeline command runs: building
# the parser must stay cheap for every other `pfedla` command.


def _pipeline_compile(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla_pipelines.fl_pipeline import compile_pipeline, segments

    config = load_config(args.config, args.overrides)
    rounds, sizes = compile_pipeline(config, args.output)
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output} ({size / 1024:.0f} KiB): rounds {rounds.first}..{rounds.stop - 1} "
          f"of {rounds.total}")
    for line in sizes.report():
        print(line)
    if not rounds.finishes:
        print(f"this is segment 1 of {len(segments(config))}: `pfedla pipeline submit` runs them all in turn")


def _pipeline_run_local(args: argparse.Namespace) -> None:
    from pfedla.config import load_config
    from pfedla_pipelines.runner import run_local

    config = load_config(args.config, args.overrides)
    summary = run_local(config, args.pipeline_root, runner=args.runner, overwrite=args.overwrite)
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
    from pfedla.errors import without_credentials
    from pfedla_pipelines.runner import submit

    config = load_config(args.config, args.overrides)
    run_ids = submit(config, args.host, args.experiment, wait=args.wait, poll_seconds=args.poll_seconds,
                     namespace=args.namespace, token_file=args.token_file)
    print(f"{without_credentials(args.host)}: runs {', '.join(run_ids)}")


def register(commands: Any) -> None:
    """Add ``pfedla pipeline ...`` to the ``pfedla`` parser's subcommands."""
    pipeline = commands.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit")
    actions = pipeline.add_subparsers(dest="action", required=True)
    compile_cmd = actions.add_parser("compile", help="write the pipeline YAML")
    add_config_args(compile_cmd)
    compile_cmd.add_argument("-o", "--output", default="pipeline.yaml", help="YAML file to write")
    compile_cmd.set_defaults(handler=_pipeline_compile)
    local_cmd = actions.add_parser("run-local", help="run the pipeline here with kfp.local (no cluster)")
    add_config_args(local_cmd)
    local_cmd.add_argument("--pipeline-root", help="where step outputs go (default: a temp directory)")
    local_cmd.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                           help="run each step as a subprocess here, or in the step image (pipeline.image, "
                                "default: `make image`'s) as a pod would: user 10001, read-only root, "
                                "host network, endpoints and credentials from the environment")
    local_cmd.add_argument("--overwrite", action="store_true",
                           help="replace an earlier run-local's outputs in output_dir (never a `pfedla run`)")
    local_cmd.set_defaults(handler=_pipeline_run_local)
    submit_cmd = actions.add_parser("submit",
                                    help="submit to a Kubeflow Pipelines API server, segment by segment")
    add_config_args(submit_cmd)
    submit_cmd.add_argument("--host", required=True, help="KFP API URL, e.g. http://localhost:8080")
    submit_cmd.add_argument("--experiment", help="KFP experiment (default: experiment_name)")
    submit_cmd.add_argument("--wait", action=argparse.BooleanOptionalAction, default=None,
                            help="follow each segment and submit the next when it succeeds (default: on when "
                                 "rounds > pipeline.rounds_per_run)")
    submit_cmd.add_argument("--poll-seconds", type=float, default=15.0,
                            help="how often --wait asks for status")
    submit_cmd.add_argument("--namespace", help="multi-user Kubeflow: the profile namespace experiments and "
                                                "runs live in")
    submit_cmd.add_argument("--token-file", help="file holding the bearer token the KFP API wants (default: "
                                                 "$KF_PIPELINES_SA_TOKEN_PATH, as in a Kubeflow pod)")
    submit_cmd.set_defaults(handler=_pipeline_submit)
