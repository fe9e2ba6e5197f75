"""MLflow tracking against a real `mlflow server` (artifacts proxied to a real S3 server)."""


from pfedla.tracking import Tracker, default_tracking_uri


def test_default_uri_is_sqlite_in_the_output_dir_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_a_parent_run_groups_runs_continues_on_resume_and_logs_its_outputs_once(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "parents", tmp_path / "mlartifacts")
    tags = {"pfedla.run": "r1", "pfedla.role": "experiment"}
    parent = tracker.open_parent("experiment r1", {"seeds": "[0, 1]"}, tags, resume=False)
    child = tracker.start_run("local seed 0", {}, {"mlflow.parentRunId": parent})
    tracker.end_run()
    assert tracker.open_parent("experiment r1", {}, tags, resume=True) == parent  # continued, not duplicated
    assert tracker.open_parent("other", {}, {**tags, "pfedla.run": "r2"}, resume=True) != parent
    (tmp_path / "report.md").write_text("# report")
    for _ in range(2):  # a resume after a kill inside close_parent repeats it
        tracker.close_parent(parent, {"local/final_accuracy_mean": 0.5}, [(tmp_path / "report.md", None)])
    run = tracker.client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.params == {"seeds": "[0, 1]"}
    assert len(tracker.client.get_metric_history(parent, "local/final_accuracy_mean")) == 1
    assert [a.path for a in tracker.client.list_artifacts(parent)] == ["report.md"]
    assert tracker.client.get_run(child).data.tags["mlflow.parentRunId"] == parent


