"""`pfedla pipeline submit` to multi-user Kubeflow: a profile namespace and a bearer token.

No Kubeflow can run here: ``kfp_api_multi_user`` (tests/kfp_api.py) stands in for the cluster's
Pipelines API. It refuses every request without its bearer token and everything outside its
profile namespace, as multi-user Kubeflow does.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import kfp.client
import pytest

from pfedla.cli import main
from pfedla_pipelines.fl_pipeline import PipelineError
from pfedla_pipelines.runner import submit

ARGS = ["--no-wait", "--set", "rounds=2", "--set", "clients=3", "--set", "pipeline.rounds_per_run=1",
        "--set", "pipeline.data_root=s3://pfedla"]


# Submitted: two one-round segments, the data plane on S3.
TEAM_RUN = {"clients": 3, "rounds": 2, "experiment_name": "team-run",
            "pipeline": {"rounds_per_run": 1, "data_root": "s3://pfedla"}}


def _token_file(folder: Path, token: str) -> Path:
    path = folder / f"token-{uuid.uuid4().hex[:8]}"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def _files_holding(root: Path, secret: str, skip: set[Path]) -> list[Path]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path not in skip and path.is_file() and secret.encode() in path.read_bytes():
                found.append(path)
    return found


def test_submit_creates_the_experiment_and_runs_in_the_namespace_with_the_token_on_every_request(
        tmp_path, kfp_api_multi_user, capsys, caplog):
    api = kfp_api_multi_user
    token_file = _token_file(tmp_path, api.token)
    code = main(["pipeline", "submit", "--host", api.url, "--namespace", "team-a", "--token-file",
                 str(token_file), *ARGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (run,) = api.runs
    assert api.experiment_namespaces[run.experiment_id] == "team-a"
    assert api.experiments[run.experiment_id] == "pfedla"
    assert api.requests and all(auth == f"Bearer {api.token}" for _, _, auth in api.requests)
    assert run.body["service_account"] == "pfedla-pipeline-runner"  # `pfedla deploy --profile-namespace`
    # the token is nowhere but in its file: not in output, logs or any file written
    assert api.token not in captured.out + captured.err + caplog.text
    assert _files_holding(tmp_path, api.token, skip={token_file}) == []
    # a second submit finds the experiment and the run in the namespace instead of making new ones
    assert main(["pipeline", "submit", "--host", api.url, "--namespace", "team-a", "--token-file",
                 str(token_file), *ARGS]) == 0
    assert len(api.experiments) == 1 and [r.display_name for r in api.runs].count(run.display_name) == 1


def test_without_the_namespace_or_the_token_submit_fails_with_one_line_that_never_shows_a_token(
        tmp_path, kfp_api_multi_user, capsys):
    api = kfp_api_multi_user
    token_file = _token_file(tmp_path, api.token)
    assert main(["pipeline", "submit", "--host", api.url, "--token-file", str(token_file), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "failed to create the experiment" in err and "namespace is required" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["pipeline", "submit", "--host", api.url, "--namespace", "team-a", *ARGS]) == 2
    assert "Unauthenticated" in capsys.readouterr().err
    api.echo_auth = True  # a refusal that quotes the header it got: the token sent is scrubbed
    wrong = _token_file(tmp_path, f"kfp-TEST-wrong-{uuid.uuid4().hex}")
    assert main(["pipeline", "submit", "--host", api.url, "--namespace", "team-a", "--token-file", str(wrong),
                 *ARGS]) == 2
    err = capsys.readouterr().err
    assert "Unauthenticated" in err and "Bearer ***" in err
    assert wrong.read_text().strip() not in err and api.token not in err
    assert api.runs == []


@pytest.mark.parametrize("content, message", [(None, "No such file"), ("", "one token on one line"),
                                              ("two words", "one token on one line")])
def test_a_bad_token_file_is_refused_before_any_request(tmp_path, tiny_config, kfp_api_multi_user, content,
                                                         message):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PipelineError, match=f"{path}.*{message}|{message}.*{path}|{path}: {message}"):
        submit(tiny_config(TEAM_RUN), kfp_api_multi_user.url, namespace="team-a", token_file=path)
    assert kfp_api_multi_user.requests == []


def test_an_invalid_namespace_is_refused_before_any_request(tiny_config, kfp_api_multi_user):
    with pytest.raises(PipelineError, match="invalid namespace 'Team_A'"):
        submit(tiny_config(TEAM_RUN), kfp_api_multi_user.url, namespace="Team_A")
    assert kfp_api_multi_user.requests == []


def test_in_a_pod_the_token_comes_from_kf_pipelines_sa_token_path_and_is_read_before_every_request(
        tmp_path, tiny_config, kfp_api_multi_user, monkeypatch):
    """Kubeflow mounts a projected service account token in notebook and pipeline pods and names it
    in $KF_PIPELINES_SA_TOKEN_PATH; the kubelet rotates it, so it is read again before each request."""
    api = kfp_api_multi_user
    token_file = _token_file(tmp_path, api.token)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))

    def rotate_when_submitted(name):  # the kubelet rotates the token while the run is followed
        api.token = f"kfp-TEST-rotated-{uuid.uuid4().hex}"
        token_file.write_text(api.token)
        return ["PENDING", "RUNNING", "SUCCEEDED"]

    api.script = rotate_when_submitted
    config = tiny_config(clients=3, rounds=1, pipeline={"data_root": "s3://pfedla"})
    (run_id,) = submit(config, api.url, wait=True, poll_seconds=0.01, namespace="team-a",
                       log=lambda line: None)
    assert api.run(run_id).state == "SUCCEEDED"
    after = [auth for method, path, auth in api.requests if path.startswith("/runs/")]
    assert after and all(auth == f"Bearer {api.token}" for auth in after)  # the rotated token


def test_without_the_variable_kfps_default_token_path_is_used_when_it_exists(
        tmp_path, tiny_config, kfp_api_multi_user, monkeypatch):
    api = kfp_api_multi_user
    monkeypatch.setattr(kfp.client, "KF_PIPELINES_SA_TOKEN_PATH", str(_token_file(tmp_path, api.token)))
    assert submit(tiny_config(TEAM_RUN), api.url, wait=False, namespace="team-a", log=lambda line: None)
    monkeypatch.setattr(kfp.client, "KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(PipelineError, match="Unauthenticated"):  # no token at all: the API refuses
        submit(tiny_config(TEAM_RUN), api.url, wait=False, namespace="team-a", log=lambda line: None)
