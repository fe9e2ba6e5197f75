"""Smoke tests for the real-server fixtures in ``tests/servers.py``."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

DENIED_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}


def test_s3_put_get_and_auth_enforced(s3_server):
    s3 = s3_server.client()
    key = f"smoke/{uuid.uuid4().hex}.txt"
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=b"hello seaweed")
    body = s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
    assert body == b"hello seaweed"

    env = s3_server.env()
    assert env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == s3_server.endpoint_url

    # wrong secret key -> 403
    bad = boto3.session.Session().client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key + "x",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as excinfo:
        bad.get_object(Bucket=s3_server.bucket, Key=key)
    err = excinfo.value.response
    assert err["Error"]["Code"] in DENIED_CODES, err
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 403

    # anonymous (unsigned) request -> 403
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError) as http_err:
        opener.open(f"{s3_server.endpoint_url}/{s3_server.bucket}/{key}", timeout=10)
    assert http_err.value.code == 403


def test_mlflow_params_metrics_artifacts_through_s3(mlflow_server, s3_server, tmp_path):
    import mlflow.artifacts
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    exp_id = client.create_experiment(f"smoke-{uuid.uuid4().hex[:8]}")
    run = client.create_run(exp_id)
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")

    client.log_param(run_id, "lr", "0.01")
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric("loss", 1.0 / (step + 1), now + step, step) for step in range(5)],
        params=[Param("rounds", "5")],
    )
    src = tmp_path / "model_card.txt"
    src.write_text("pfedla smoke artifact\n")
    client.log_artifact(run_id, str(src), artifact_path="cards")
    client.set_terminated(run_id)

    got = client.get_run(run_id)
    assert got.data.params == {"lr": "0.01", "rounds": "5"}
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(5))
    assert sorted(history, key=lambda m: m.step)[-1].value == pytest.approx(0.2)

    assert [f.path for f in client.list_artifacts(run_id, "cards")] == ["cards/model_card.txt"]
    # mlflow 3 clients download via a presigned S3 URL handed out by the server when it
    # advertises multipart downloads (S3 destination); MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD
    # =false forces streaming through the tracking server. Both paths must work.
    for proxy_only in (False, True):
        dst = tmp_path / f"download-{proxy_only}"
        dst.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            if proxy_only:
                mp.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path="cards/model_card.txt",
                dst_path=str(dst),
                tracking_uri=mlflow_server.tracking_uri,
            )
        with open(local) as fh:
            assert fh.read() == "pfedla smoke artifact\n"

    # the artifact object really is in the bucket, under the "mlflow" prefix
    s3 = s3_server.client()
    listing = s3.list_objects_v2(Bucket=mlflow_server.bucket, Prefix=mlflow_server.artifact_prefix)
    keys = [o["Key"] for o in listing.get("Contents", [])]
    matching = [k for k in keys if run_id in k and k.endswith("cards/model_card.txt")]
    assert matching, keys
    body = s3.get_object(Bucket=mlflow_server.bucket, Key=matching[0])["Body"].read()
    assert body == b"pfedla smoke artifact\n"


def test_s3_restart_keeps_data(s3_server):
    s3 = s3_server.client()
    key = f"restart/{uuid.uuid4().hex}.bin"
    payload = uuid.uuid4().bytes * 1000
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=payload)
    endpoint, old_pid = s3_server.endpoint_url, s3_server.pid

    s3_server.stop()
    assert not s3_server.running
    fast = s3_server.client(Config(connect_timeout=1, retries={"max_attempts": 1}))
    with pytest.raises(Exception):  # noqa: B017 - any connection error
        fast.head_bucket(Bucket=s3_server.bucket)

    s3_server.start()
    assert s3_server.running and s3_server.pid != old_pid
    assert s3_server.endpoint_url == endpoint
    s3 = s3_server.client()
    assert s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() == payload
    # and it still accepts writes
    s3.put_object(Bucket=s3_server.bucket, Key=key + ".after", Body=b"ok")
    assert s3.get_object(Bucket=s3_server.bucket, Key=key + ".after")["Body"].read() == b"ok"
