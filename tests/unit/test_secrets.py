"""No secret appears in output, files or the config's records (issue 21, cases 5-7): a canary
password in a flag or a config value is masked or refused before anything is stored."""

import pytest
import yaml

from canary import CANARY, CONFIG_URLS, config_commands, dead_port, nested
from cli_errors import error_line, run_cli
from pfedla.cli import main
from pfedla.errors import without_credentials


def test_a_password_holding_at_signs_is_masked_up_to_the_authoritys_last_at():
    """On main the mask stopped at the first '@': ``user:***@tpwXYZ@host`` showed the password's tail."""
    text = (f"MLflow at http://user:s3cr@{CANARY}@127.0.0.1:1/api failed; s3://k:a@{CANARY}@bucket/x?q=@ "
            f"and http://a@b.example:{CANARY}@host#@")
    assert without_credentials(text) == ("MLflow at http://user:***@127.0.0.1:1/api failed; "
                                         "s3://k:***@bucket/x?q=@ and http://a@b.example:***@host#@")
    assert without_credentials("http://h:5000/p@q https://user@h/") == "http://h:5000/p@q https://user@h/"


def test_submit_with_a_password_in_the_host_is_one_line_without_it_or_any_warning():
    """On main: the password in the error line, kfp's FutureWarning and three urllib3 retry warnings."""
    port = dead_port()
    result = run_cli("pipeline", "submit", "--host", f"http://user:s3cr@{CANARY}@127.0.0.1:{port}/",
                     "--set", "pipeline.data_root=s3://pfedla")
    line = error_line(result.returncode, result.stderr)  # exactly one line: no warning before it
    assert line.startswith(f"pfedla: error: cannot reach the Kubeflow Pipelines API at "
                           f"http://user:***@127.0.0.1:{port}/: ")
    assert CANARY not in result.stdout + result.stderr


@pytest.mark.parametrize("key", list(CONFIG_URLS))
def test_a_config_value_with_credentials_is_refused_before_anything_is_stored(key, tmp_path, capsys,
                                                                              monkeypatch):
    """On main ``pipeline.mlflow_tracking_uri=http://user:pw@...`` was stored whole in run.json, the
    MLflow params and the compiled pipeline's parameters."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(nested(key, CONFIG_URLS[key])))
    for name, command in config_commands(tmp_path, key).items():
        for source in (["--set", f"{key}={CONFIG_URLS[key]}"], ["--config", str(tmp_path / "config.yaml")]):
            code = main([*command, *source])
            printed = capsys.readouterr()
            line = error_line(code, printed.err)
            assert f"config key '{key}': holds a URL with a user name or password" in line, (name, line)
            assert "credentials come from" in line
            assert CANARY not in printed.out + printed.err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.yaml"]  # nothing written
    if key == "pipeline.mlflow_tracking_uri":
        assert "pipeline.mlflow_secret" in line
