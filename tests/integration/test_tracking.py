"""MLflow tracking against a real `mlflow server` (artifacts proxied to a real S3 server)."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pfedla.config import config_from_dict
from pfedla.simulation import run_experiment
from pfedla.tracking import METRIC_FLUSH_ROUNDS, Tracker


def test_short_experiment_on_a_real_mlflow_server(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    rounds = METRIC_FLUSH_ROUNDS + 2  # one full batch plus a partial one at the end
    config = config_from_dict({"clients": 3, "rounds": rounds, "heatmap_every": 5, "device": "cpu",
                               "algorithms": ["pfedla", "local"], "output_dir": str(tmp_path / "out"),
                               "experiment_name": f"tracking-{tmp_path.name}"})
    outcome = run_experiment(config, progress=False)
    assert outcome.tracking_uri == mlflow_server.tracking_uri
    assert not (tmp_path / "out" / "mlflow.db").exists()

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name(config.experiment_name)
    found = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in found if r.data.tags.get("pfedla.role") == "experiment"]
    runs = {r.info.run_name: r for r in found if r is not parent}
    assert set(runs) == {"pfedla seed 0", "local seed 0"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {parent.info.run_id}
    run = runs["pfedla seed 0"]
    assert run.info.status == "FINISHED"
    assert run.data.params["rounds"] == str(rounds) and run.data.tags["pfedla.algorithm"] == "pfedla"
    history = client.get_metric_history(run.info.run_id, "accuracy_mean")
    assert [m.step for m in history] == list(range(rounds))
    assert history[-1].value == pytest.approx(outcome.results["pfedla"].mean_accuracy)
    assert len(client.get_metric_history(run.info.run_id, "alpha_self_weight")) == rounds
    labels = {a.path for a in client.list_artifacts(run.info.run_id, "layer_weights")}
    assert labels == {"layer_weights/round_0005", "layer_weights/round_0010", "layer_weights/round_0012"}
    alpha_path = client.download_artifacts(run.info.run_id, "layer_weights/round_0012/layer_weights.npy",
                                           str(tmp_path))
    np.testing.assert_array_equal(np.load(alpha_path), outcome.results["pfedla"].layer_weights)
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "layer_weights/round_0012")
            if a.path.endswith(".png")]
    assert len(pngs) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id, "models")} == {"models/pfedla.safetensors"}
    # mlflow-artifacts:/<path> is proxied to s3://<bucket>/mlflow/<path>
    prefix = "mlflow/" + run.info.artifact_uri.split(":", 1)[1].strip("/") + "/models/"
    stored = mlflow_server.s3.client().list_objects_v2(Bucket=mlflow_server.bucket, Prefix=prefix)
    assert [o["Key"] for o in stored.get("Contents", [])] == [f"{prefix}pfedla.safetensors"]


def test_metrics_are_sent_in_batches(tmp_path, mlflow_server, monkeypatch):
    tracker = Tracker(mlflow_server.tracking_uri, f"batches-{tmp_path.name}")
    run_id = tracker.start_run("batch", {"a": "1"}, {})
    calls = []
    original = tracker.client.log_batch
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (calls.append(k), original(*a, **k)))
    steps = METRIC_FLUSH_ROUNDS * 2 + 1
    for step in range(steps):
        tracker.log_metrics(step, {"x": float(step), "y": 1.0})
    tracker.end_run()
    assert len(calls) == 3  # two full batches and the rest at the end: not one call per value
    history = tracker.client.get_metric_history(run_id, "x")
    assert sorted(m.value for m in history) == [float(s) for s in range(steps)]


def test_credentials_never_reach_mlflow_logs_or_outputs(tmp_path, mlflow_server, s3_server):
    """A run that uses S3 credentials and MLflow auth variables; none of their values may leak."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    password = "pfedla-TEST-password-7d41c0"
    secrets = [s3_server.secret_key, s3_server.access_key, password]
    env = {**os.environ, **s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server.tracking_uri,
           "MLFLOW_TRACKING_USERNAME": "pfedla", "MLFLOW_TRACKING_PASSWORD": password}
    out = tmp_path / "out"
    config = {"clients": 3, "rounds": 2, "device": "cpu", "algorithms": ["pfedla"], "output_dir": str(out),
              "experiment_name": f"secrets-{tmp_path.name}",
              "checkpoint_dir": f"s3://{s3_server.bucket}/secrets-{tmp_path.name}"}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pfedla.cli", "run", "--config", str(tmp_path / "exp.yaml")]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name(config["experiment_name"])
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # pfedla's, and the parent run holding the report
    texts = [finished.stdout, finished.stderr]
    files = [p for p in out.rglob("*") if p.is_file()]
    for run in runs:
        texts += [*run.data.params, *run.data.params.values(), *run.data.tags, *run.data.tags.values(),
                  *run.data.metrics]
        downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        files += [p for p in downloaded.rglob("*") if p.is_file()]
    assert len(files) > 5
    for secret in secrets:
        assert not any(secret in text for text in texts), "a credential reached MLflow or the logs"
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"a credential reached {path}"
    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"secrets-{tmp_path.name}/")
    assert listed["KeyCount"] > 0  # the credentials were really used
