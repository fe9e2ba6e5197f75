"""Checkpoint store: atomic writes, keep-last-K, fallback past damaged checkpoints."""




def test_store_outage_mid_run_stops_clearly_then_resume_completes(tmp_path, s3_server, monkeypatch):
    """Stops the real S3 server (SeaweedFS) while `pfedla run` checkpoints to it."""
    import json
    import os
    import subprocess
    import sys
    import time

    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    prefix = f"ckpt-{tmp_path.name}"
    raw = {"clients": 4, "rounds": 40, "algorithms": ["pfedla"], "device": "cpu", "eval_every": 10,
           "checkpoint_dir": f"s3://{s3_server.bucket}/{prefix}"}
    out = tmp_path / "out"
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(out)}))
    env = {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1", "PFEDLA_S3_RETRIES": "2"}
    command = [sys.executable, "-m", "pfedla.cli", "run", "--quiet"]
    process = subprocess.Popen(command + ["--config", str(tmp_path / "exp.yaml")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    s3 = s3_server.client()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        listed = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/")
        if any("/pfedla/round_00003" in item["Key"] for item in listed.get("Contents", [])):
            break
        time.sleep(0.05)
    s3_server.stop(grace=0)  # a sudden outage
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        s3_server.start()
    assert process.returncode == 2, stderr
    assert "pfedla: error: checkpoint after round" in stderr and "could not be stored" in stderr
    # Refused connections or a store answering 5xx while it shuts down: both name the object.
    assert f"s3://{s3_server.bucket}/{prefix}" in stderr and "saved locally in" in stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not (out / "summary.json").exists()
    identity = json.loads((out / "run.json").read_text())["identity"]
    fallback = out / "checkpoints" / "fallback" / identity / "seed_0" / "pfedla"
    assert list(fallback.glob("round_*.safetensors"))

    resumed = subprocess.run(command + ["--resume", str(out)], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    # The uninterrupted reference, with the same thread count (float reductions depend on it).
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump({**raw, "checkpoint_dir": None,
                                                       "output_dir": str(tmp_path / "ref")}))
    subprocess.run(command + ["--config", str(tmp_path / "ref.yaml")], env=env, check=True, timeout=600,
                   capture_output=True)
    summary = json.loads((out / "summary.json").read_text())["pfedla"]["seeds"]["0"]
    reference = json.loads((tmp_path / "ref" / "summary.json").read_text())["pfedla"]["seeds"]["0"]
    assert summary["client_accuracies"] == reference["client_accuracies"]
    folder = f"{prefix}/{identity}/seed_0/pfedla"
    stored = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{folder}/")["Contents"]
    assert f"{folder}/round_00040.safetensors" in {o["Key"] for o in stored}
