"""`pfedla` command line: it parses, calls the library, and reports errors without tracebacks."""



from pfedla.cli import main

PASSWORD = "s3cret-PW-7d1e"


def test_a_run_tracked_with_a_password_in_the_uri_never_prints_it(tmp_path, capsys, monkeypatch,
                                                                    mlflow_server):
    """The real mlflow server (no auth of its own: it ignores the credentials requests sends)."""
    uri = mlflow_server.tracking_uri.replace("http://", f"http://alice:{PASSWORD}@")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")  # pfedla sets it; undone after
    code = main(["run", "--quiet", "--set", "clients=2", "--set", "rounds=1", "--set", "algorithms=[local]",
                 "--set", f"output_dir={tmp_path / 'out'}", "--set", f"experiment_name=pw-{tmp_path.name}"])
    printed = capsys.readouterr()
    assert code == 0 and PASSWORD not in printed.out + printed.err
    assert "tracking: http://alice:***@127.0.0.1:" in printed.out
