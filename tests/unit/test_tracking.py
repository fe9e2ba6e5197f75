"""MLflow tracking against a real `mlflow server` (artifacts proxied to a real S3 server)."""


from pfedla.tracking import default_tracking_uri


def test_default_uri_is_sqlite_in_the_output_dir_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


