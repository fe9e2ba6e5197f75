"""Config loading, overrides and validation errors that name the key and what is allowed."""



from cli_errors import error_line, run_cli


def test_an_overlong_experiment_name_fails_before_any_work(tmp_path):
    result = run_cli("run", "--quiet", "--set", f"experiment_name={'x' * 501}", "--set",
                     f"output_dir={tmp_path / 'out'}")
    assert error_line(result.returncode, result.stderr) == \
        "pfedla: error: config key 'experiment_name': is 501 characters; MLflow allows at most 500"
    assert not (tmp_path / "out").exists()  # MLflow refused it only after the data loaded and the run began


def test_an_absurd_size_fails_at_validation_not_as_an_allocation_error(tmp_path):
    out = tmp_path / "out"
    result = run_cli("run", "--quiet", "--set", "pfedla.hidden_dim=1000000", "--set", f"output_dir={out}")
    assert error_line(result.returncode, result.stderr) == \
        "pfedla: error: config key 'pfedla.hidden_dim': must be at most 4096, got 1000000"
    assert not out.exists()
