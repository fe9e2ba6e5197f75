"""No secret appears in output, files or MLflow (issue 21, cases 5-7): a canary password goes into
every place pfedla accepts a URL (flags, environment, config, pipeline.*) and is looked for
everywhere afterwards, the real MLflow server's store included."""

import json
from pathlib import Path

import yaml

from canary import CANARY, CONFIG_URLS, config_commands, dead_port, nested
from cli_errors import error_line, run_cli
from pfedla.cli import main


def test_canary_credentials_in_every_place_a_url_is_accepted_reach_no_output_file_or_mlflow(
        tmp_path, capsys, monkeypatch, mlflow_server):
    """The real mlflow server (it has no auth of its own and ignores the credentials requests sends),
    reached through a URI holding the canary; then each other place, which must refuse or fail in
    one line. Afterwards no output, no file here, no file of the server and no MLflow param, tag
    or artifact holds the canary."""
    printed: list[str] = []
    experiment = f"canary-{tmp_path.name}"
    out = tmp_path / "tracked"
    tracking = mlflow_server.tracking_uri.replace("http://", f"http://alice:s3cr@{CANARY}@")
    tracked = run_cli("run", "--quiet", "--set", "clients=2", "--set", "rounds=1", "--set",
                      "algorithms=[local]", "--set", f"output_dir={out}", "--set",
                      f"experiment_name={experiment}", env={"MLFLOW_TRACKING_URI": tracking})
    assert tracked.returncode == 0, tracked.stderr
    assert "tracking: http://alice:***@127.0.0.1:" in tracked.stdout
    printed.append(tracked.stdout + tracked.stderr)
    # the environment: stores that cannot be reached, so that their URLs end up in error messages
    port = dead_port()
    unreachable = f"http://key:s3cr@{CANARY}@127.0.0.1:{port}"
    s3_run = ["run", "--quiet", "--set", "dataset=mnist", "--set", "data_dir=s3://bucket/mnist",
              "--set", f"output_dir={tmp_path / 'never'}"]
    plain_run = ["run", "--quiet", "--set", f"output_dir={tmp_path / 'never'}"]
    for variable, command in (("MLFLOW_TRACKING_URI", plain_run), ("AWS_ENDPOINT_URL", s3_run),
                              ("MLFLOW_S3_ENDPOINT_URL", s3_run)):
        failed = run_cli(*command, env={variable: unreachable, "AWS_ACCESS_KEY_ID": "key",
                                        "AWS_SECRET_ACCESS_KEY": "not-the-canary", "PFEDLA_S3_RETRIES": "0",
                                        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
        assert f"127.0.0.1:{port}" in error_line(failed.returncode, failed.stderr), variable
        printed.append(failed.stdout + failed.stderr)
    # the flags
    submitted = run_cli("pipeline", "submit", "--host", f"{unreachable}/", "--set",
                        "pipeline.data_root=s3://pfedla")
    error_line(submitted.returncode, submitted.stderr)
    printed.append(submitted.stdout + submitted.stderr)
    # the config and pipeline.*: every URL key, through --set and through a config file
    for key, value in CONFIG_URLS.items():
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(nested(key, value)))
        for command in config_commands(tmp_path, key).values():
            for source in (["--set", f"{key}={value}"], ["--config", str(tmp_path / "config.yaml")]):
                error_line(main([*command, *source]), capsys.readouterr().err)
    printed.append("".join(capsys.readouterr()))
    assert not [text for text in printed if CANARY in text]
    # files: everything written here, and the tracking server's own database and log
    written = [path for path in tmp_path.rglob("*") if path.is_file() and path.name != "config.yaml"]
    assert out / "run.json" in written and out / "report.md" in written
    for path in [*written, mlflow_server.backend_db, mlflow_server.log_path]:
        assert CANARY.encode() not in path.read_bytes(), path
    # MLflow: every run's params and tags, and the experiment run's artifacts (summary, report)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 2  # the experiment's run and local's
    for run in runs:
        assert CANARY not in json.dumps([run.data.params, run.data.tags, run.info.run_name])
    parent = next(run for run in runs if run.data.tags.get("pfedla.role") == "experiment")
    downloaded = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "artifacts")))
    artifacts = [path for path in downloaded.rglob("*") if path.is_file()]
    assert {"summary.json", "report.md"} <= {path.name for path in artifacts}
    assert not [path for path in artifacts if CANARY.encode() in path.read_bytes()]
