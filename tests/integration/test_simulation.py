"""The in-process round loop: output contracts, tracking to the default sqlite store, determinism,
and the default experiment's headline result."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pfedla import storage
from pfedla.cli import main
from pfedla.config import config_from_dict
from pfedla.data.federated import class_overlap
from pfedla.results import format_table
from pfedla.rounds import RunAborted, participants
from pfedla.simulation import run_experiment

SIM = {"heatmap_every": 2}  # α heatmaps every other round of the tiny experiment


def test_default_experiment_pfedla_beats_baselines_and_trusts_class_sharing_clients(tmp_path):
    """The README's headline table: pathological 2 classes per client on digits."""
    config = config_from_dict({"output_dir": str(tmp_path / "default"), "device": "cpu"})
    outcome = run_experiment(config, progress=False, track=False)
    accuracy = {name: r.mean_accuracy for name, r in outcome.results.items()}
    assert accuracy["pfedla"] >= accuracy["local"]
    assert accuracy["pfedla"] > accuracy["fedavg"] + 0.05
    counts = json.loads((tmp_path / "default" / "seed_0" / "partition.json").read_text())["clients"]
    share = class_overlap(counts)
    others = ~np.eye(len(counts), dtype=bool)
    alpha = outcome.results["pfedla"].layer_weights
    preferred = [alpha[:, layer][share & others].mean() > alpha[:, layer][~share].mean()
                 for layer in range(alpha.shape[1])]
    assert sum(preferred) > len(preferred) / 2


def comparable(summary: dict) -> dict:
    """summary.json without what legitimately differs between runs (time, MLflow ids)."""
    def kept(entry: dict) -> dict:
        return {k: v for k, v in entry.items() if k not in ("wall_seconds", "mlflow_run_id")}
    return {name: {**kept(entry), "seeds": {seed: kept(run) for seed, run in entry["seeds"].items()}}
            for name, entry in summary.items()}


def wait_for(path_glob, root, timeout=240):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(root.glob(path_glob)):
            return
        time.sleep(0.02)
    raise AssertionError(f"{path_glob} never appeared under {root}")


# Runs the CLI with an audit hook that SIGKILLs the process at the first event whose path matches
# the glob ``*<needle>*``: e.g. a checkpoint's temporary file ``<name>.<random>.partial`` about to be
# opened (write started, nothing on disk yet) or renamed (all bytes written, not yet committed), so
# the kill provably lands inside that write. pfedla opens and renames a temporary file relative to
# its folder's descriptor: a rename's folder is read back from that descriptor, an open's is not
# given (needles for an open name the file alone).
KILL_AT_EVENT = """
import fnmatch, os, signal, sys
event_name, needle = sys.argv.pop(1), sys.argv.pop(1)
def kill_at(event, args):
    if event != event_name:
        return
    where = str(args[0])
    if event == "os.rename" and isinstance(args[2], int) and args[2] >= 0:
        where = os.readlink(f"/proc/self/fd/{args[2]}") + "/" + where
    if fnmatch.fnmatchcase(where, f"*{needle}*"):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(kill_at)
from pfedla.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_round_and_inside_checkpoint_writes_then_resume_gives_the_uninterrupted_summary(
        tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"clients": 4, "rounds": 6, "algorithms": ["pfedla", "local"], "device": "cpu",
           "pfedla": {"heur_k": 1}, "participation": 0.75}
    # Same thread count for both runs: float reductions depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pfedla.cli", "run", "--quiet"]
    for name in ("ref", "killed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / name)}))
    subprocess.run(command + ["--config", str(tmp_path / "ref.yaml")], env=env, check=True, timeout=600,
                   capture_output=True)
    out = tmp_path / "killed"
    resume = ["run", "--quiet", "--resume", str(out)]

    def kill_when_written(args, checkpoint):
        process = subprocess.Popen(command + args, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        wait_for(f"*/seed_0/{checkpoint}", out / "checkpoints" / "rounds")
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL

    def kill_inside_write(event, file):
        # an open does not name the folder: pfedla (first in algorithms) writes each round first
        needle = f"{file if event == 'os.rename' else file.rpartition('/')[2]}.*.partial"
        killed = subprocess.run([sys.executable, "-c", KILL_AT_EVENT, event, needle, *resume],
                                env=env, capture_output=True, timeout=600)
        assert killed.returncode == -signal.SIGKILL
        assert bool(list(rounds_dir.glob(f"{file}.*.partial"))) == (event == "os.rename")
        assert not (rounds_dir / file).exists() or file.endswith("LATEST")

    kill_when_written(["--config", str(tmp_path / "killed.yaml")], "pfedla/round_00002.safetensors")
    identity = json.loads((out / "run.json").read_text())["identity"]
    rounds_dir = out / "checkpoints" / "rounds" / identity / "seed_0"
    kill_inside_write("open", "pfedla/round_00004.safetensors")  # the file has just been created
    kill_inside_write("os.rename", "pfedla/round_00005.safetensors")  # written, not yet renamed
    kill_when_written(["--resume", str(out)], "local/round_00003.safetensors")
    kill_inside_write("os.rename", "local/LATEST")  # checkpoint stored, pointer not yet updated
    assert not (out / "summary.json").exists()
    # What a kill during a non-atomic write would leave: a torn newest file and a partial one.
    newest = sorted((rounds_dir / "local").glob("round_*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (rounds_dir / "local" / "round_00009.safetensors.partial").write_bytes(b"torn")
    finished = subprocess.run(command + ["--resume", str(out)], env=env, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "is unusable" in finished.stderr and "falling back" in finished.stderr
    resumed = json.loads((out / "summary.json").read_text())
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert comparable(resumed) == comparable(expected)
    np.testing.assert_array_equal(np.load(out / "seed_0" / "layer_weights.npy"),
                                  np.load(tmp_path / "ref" / "seed_0" / "layer_weights.npy"))
    # The MLflow runs continued: every round logged exactly once.
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    for name in ("pfedla", "local"):
        run_id = resumed[name]["seeds"]["0"]["mlflow_run_id"]
        steps = [m.step for m in client.get_metric_history(run_id, "round_seconds")]
        assert sorted(steps) == list(range(6)), name


def interrupted_run(config, monkeypatch, after_calls):
    """Run ``config`` until the client training call number ``after_calls``, where a Ctrl-C lands."""
    from pfedla import simulation

    real_fit, calls = simulation.fit_client, []

    def fit(*args):
        calls.append(1)
        if len(calls) == after_calls:
            raise KeyboardInterrupt
        return real_fit(*args)

    with monkeypatch.context() as patch:
        patch.setattr(simulation, "fit_client", fit)
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config, progress=False)


def resumed(output_dir):
    from pfedla.simulation import load_run_config

    return run_experiment(load_run_config(output_dir), progress=False, resume=True)


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pfedla.lock"}


def test_resume_continues_its_own_state_wherever_the_directory_is(tmp_path, monkeypatch):
    """On the old main: a resumed copy wrote into the original directory, a relative output_dir
    resumed from elsewhere failed (leaving an empty directory), and a fresh run sharing the
    checkpoint_dir deleted the interrupted run's checkpoints, or was resumed from."""
    import os
    import shutil

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"clients": 3, "rounds": 3, "algorithms": ["pfedla", "local"], "device": "cpu",
           "checkpoint_dir": str(tmp_path / "shared-checkpoints")}
    reference = run_experiment(config_from_dict({**raw, "output_dir": str(tmp_path / "ref"),
                                                 "checkpoint_dir": None}), progress=False)
    expected = comparable(reference.summary)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    interrupted_run(config_from_dict({**raw, "output_dir": "orig"}), monkeypatch, after_calls=9 + 4)
    orig = tmp_path / "a" / "orig"
    # another run with the same checkpoint_dir, started and finished meanwhile
    other = run_experiment(config_from_dict({**raw, "seed": 5, "output_dir": str(tmp_path / "other")}),
                           progress=False)
    assert len(os.listdir(tmp_path / "shared-checkpoints")) == 2
    shutil.copytree(orig, tmp_path / "copy")
    before = files_of(orig)

    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    copy = resumed("../copy")
    assert comparable(copy.summary) == expected
    assert files_of(orig) == before  # the original was not touched
    assert not (tmp_path / "b" / "orig").exists() and not (tmp_path / "b" / "copy").exists()

    moved = tmp_path / "moved"
    os.rename(orig, moved)
    from_moved = resumed(moved)
    assert comparable(from_moved.summary) == expected
    assert not orig.exists()  # nothing was recreated at the old place (MLflow artifacts included)
    store = MlflowClient(f"sqlite:///{moved}/mlflow.db")
    for result in from_moved.results.values():
        run = store.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith(moved.as_uri())
        assert run.data.tags["pfedla.run"] == json.loads((moved / "run.json").read_text())["identity"]
    # the other run's checkpoints are intact and still its own
    assert other.results["pfedla"].summary()["client_accuracies"] == json.loads(
        (tmp_path / "other" / "summary.json").read_text())["pfedla"]["seeds"]["5"]["client_accuracies"]
    assert len(os.listdir(tmp_path / "shared-checkpoints")) == 2


def test_a_full_disk_mid_run_is_one_error_line_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    """RLIMIT_FSIZE stands in for a full disk: the first file past 1 MB (a round-1 checkpoint) fails
    with EFBIG, as ENOSPC would. On the old main that was an OSError traceback."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "pfedla.cli", "run", "--quiet", "--set", "clients=10", "--set", "rounds=3",
            "--set", "algorithms=[pfedla]"]

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # stays ignored across exec: writes fail instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    out = tmp_path / "out"
    full = subprocess.run(args + ["--set", f"output_dir={out}"], env=env, capture_output=True, text=True,
                          timeout=600, preexec_fn=small_disk)
    assert full.returncode == 2, full.stderr
    (line,) = [line for line in full.stderr.splitlines() if not line.startswith("20")]  # MLflow's INFO
    assert line.startswith("pfedla: error: checkpoint after round 1 could not be stored: cannot write ")
    assert "File too large" in line and "--resume" in line
    finished = subprocess.run([sys.executable, "-m", "pfedla.cli", "run", "--quiet", "--resume", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    subprocess.run(args + ["--set", f"output_dir={tmp_path / 'ref'}"], env=env, check=True, timeout=600,
                   capture_output=True)
    assert comparable(json.loads((out / "summary.json").read_text())) == \
        comparable(json.loads((tmp_path / "ref" / "summary.json").read_text()))


def test_checkpoint_every_n_rounds_resumes_to_the_same_numbers_without_duplicate_metrics(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {"clients": 3, "rounds": 7, "algorithms": ["pfedla"], "device": "cpu", "checkpoint_every": 3,
           "keep_checkpoints": 5}
    reference = run_experiment(config_from_dict({**raw, "output_dir": str(tmp_path / "ref")}), progress=False)
    out = tmp_path / "out"
    interrupted_run(config_from_dict({**raw, "output_dir": str(out)}), monkeypatch, after_calls=3 * 4 + 2)
    identity = json.loads((out / "run.json").read_text())["identity"]
    folder = out / "checkpoints" / "rounds" / identity / "seed_0" / "pfedla"
    saved = sorted(p.name for p in folder.glob("round_*"))
    assert saved == ["round_00003.safetensors"]  # round 4 was done, but not checkpointed
    finished = resumed(out)
    assert sorted(p.name for p in folder.glob("round_*")) == [
        "round_00003.safetensors", "round_00006.safetensors", "round_00007.safetensors"]
    assert finished.results["pfedla"].client_accuracies == reference.results["pfedla"].client_accuracies
    store = MlflowClient(f"sqlite:///{out}/mlflow.db")
    steps = [m.step for m in store.get_metric_history(finished.results["pfedla"].run_id, "clients")]
    assert sorted(steps) == list(range(7))


SEEDED = {"clients": 3, "rounds": 2, "algorithms": ["pfedla", "local"], "device": "cpu", "seeds": [0, 1]}


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """The uninterrupted, untracked run of SEEDED: the reference of the tests below."""
    out = tmp_path_factory.mktemp("seeds") / "ref"
    return run_experiment(config_from_dict({**SEEDED, "output_dir": str(out)}), progress=False, track=False)


def test_each_seed_is_its_own_experiment_and_the_summary_has_mean_and_std_over_seeds(two_seeds, tmp_path):
    out = two_seeds.output_dir
    summary = json.loads((out / "summary.json").read_text())
    assert summary == two_seeds.summary and list(summary) == ["pfedla", "local"]
    for name, entry in summary.items():
        assert list(entry["seeds"]) == ["0", "1"]
        runs = list(entry["seeds"].values())
        for key in ("mean_accuracy", "client_mean_accuracy"):
            values = [run[key] for run in runs]
            assert entry[key] == pytest.approx(np.mean(values)), (name, key)
            assert entry[f"{key}_std"] == pytest.approx(np.std(values, ddof=1)), (name, key)
        everyone = [a for run in runs for a in run["client_accuracies"]]
        assert (entry["min_accuracy"], entry["max_accuracy"]) == (min(everyone), max(everyone))
        assert entry["wall_seconds"] == pytest.approx(sum(run["wall_seconds"] for run in runs))
    partitions = [json.loads((out / f"seed_{s}" / "partition.json").read_text()) for s in (0, 1)]
    assert partitions[0] != partitions[1]  # each seed draws its own partition
    # seed 1's part is exactly the single-seed experiment with seed 1
    alone = config_from_dict({**SEEDED, "seeds": None, "seed": 1, "output_dir": str(tmp_path / "single")})
    single = run_experiment(alone, progress=False, track=False)
    for name in SEEDED["algorithms"]:  # tolerance: exact equality
        assert single.results[name].client_accuracies == two_seeds.runs[1][name].client_accuracies
    assert (tmp_path / "single" / "seed_1" / "partition.json").read_text() == \
        (out / "seed_1" / "partition.json").read_text()
    np.testing.assert_array_equal(np.load(tmp_path / "single" / "seed_1" / "layer_weights.npy"),
                                  np.load(out / "seed_1" / "layer_weights.npy"))
    with pytest.raises(ValueError, match="ran 2 seeds"):
        two_seeds.results  # noqa: B018 - the property refuses to pick one


def test_a_run_over_seeds_resumes_per_algorithm_and_seed_under_one_mlflow_parent_run(two_seeds, tmp_path,
                                                                                      monkeypatch):
    from pfedla import simulation
    from pfedla.config import experiment_key, seed_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    config = config_from_dict({**SEEDED, "output_dir": str(out)})
    # a seed trains 2 algorithms x 2 rounds x 3 clients: stop in seed 1's pfedla, round 1, client 1
    interrupted_run(config, monkeypatch, after_calls=12 + 3 + 2)
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert (out / "seed_0" / "results" / "local.json").is_file()
    assert not (out / "seed_1" / "results" / "pfedla.json").exists() and not (out / "summary.json").exists()
    saved = out / "checkpoints" / "rounds" / identity / "seed_1" / "pfedla"
    assert [p.name for p in saved.glob("round_*")] == ["round_00001.safetensors"]
    trained, real_fit = [], simulation.fit_client
    monkeypatch.setattr(simulation, "fit_client", lambda *args: trained.append(args[4:]) or real_fit(*args))
    finished = resumed(out)
    assert len(trained) == 3 + 6  # seed 1's pfedla round 1, then its local; seed 0 was read back
    assert comparable(finished.summary) == comparable(two_seeds.summary)

    store = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = store.search_runs([store.get_experiment_by_name("pfedla").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get("pfedla.role") == "experiment"]
    assert parent.info.status == "FINISHED" and parent.data.tags["pfedla.run"] == identity
    assert parent.data.tags["pfedla.experiment_key"] == experiment_key(config)
    children = {(run.data.tags["pfedla.algorithm"], run.data.tags["pfedla.seed"]): run
                for run in runs if run is not parent}
    assert set(children) == {(name, seed) for name in SEEDED["algorithms"] for seed in ("0", "1")}
    for (name, seed), run in children.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_name == f"{name} seed {seed}"
        assert run.info.run_id == finished.summary[name]["seeds"][seed]["mlflow_run_id"]
        assert run.data.tags["pfedla.experiment_key"] == experiment_key(seed_config(config, int(seed)))
        assert sorted(m.step for m in store.get_metric_history(run.info.run_id, "clients")) == [0, 1]
    shared = {a.path for a in store.list_artifacts(parent.info.run_id)}
    assert shared == {"report.md", "summary.json", "figures"}
    assert {a.path for a in store.list_artifacts(parent.info.run_id, "figures")} == {
        f"figures/{p.name}" for p in (out / "figures").iterdir()}
    report_copy = store.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))
    assert Path(report_copy).read_text() == (out / "report.md").read_text()
    for name, entry in finished.summary.items():
        for metric, key in (("final_accuracy_mean", "mean_accuracy"),
                            ("final_accuracy_client_mean", "client_mean_accuracy")):
            for suffix in ("", "_std"):
                (logged,) = store.get_metric_history(parent.info.run_id, f"{name}/{metric}{suffix}")
                assert logged.value == entry[f"{key}{suffix}"]


# Kills the CLI at the first `open` of a path matching the needle (see KILL_AT_EVENT).
@pytest.mark.parametrize("needle", [
    "round_00001.safetensors.*.partial",  # round 0 done and tracked, no checkpoint yet: an orphan run
    "artifacts/models/.artifact.uploading",  # outputs being logged to MLflow, run not ended
    "local.json.*.partial",  # results/local.json: MLflow run ended, result not yet written
])
def test_mlflow_is_consistent_after_a_kill_at_any_point_of_the_finish(tmp_path, monkeypatch, needle):
    """On the old main results/<alg>.json was written before the MLflow run ended: a kill there left
    the run RUNNING without its final metrics, and a resume took the algorithm as finished; a resume
    without a checkpoint left the first run RUNNING for good."""
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    args = ["run", "--quiet", "--set", "clients=3", "--set", "rounds=2", "--set", "algorithms=[local]",
            "--set", "heatmap_every=1"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_EVENT, "open", needle, *args,
                             "--set", f"output_dir={out}"], env=env, capture_output=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    finished = subprocess.run([sys.executable, "-m", "pfedla.cli", "run", "--quiet", "--resume", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    reference = subprocess.run([sys.executable, "-m", "pfedla.cli", *args, "--set",
                                f"output_dir={tmp_path / 'ref'}"], env=env, capture_output=True, timeout=600)
    assert reference.returncode == 0
    assert comparable(json.loads((out / "summary.json").read_text())) == \
        comparable(json.loads((tmp_path / "ref" / "summary.json").read_text()))
    store = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = store.search_runs([store.get_experiment_by_name("pfedla").experiment_id],
                             "tags.`pfedla.algorithm` = 'local'")  # not the parent run
    final_id = json.loads((out / "summary.json").read_text())["local"]["seeds"]["0"]["mlflow_run_id"]
    statuses = {run.info.run_id: run.info.status for run in runs}
    assert statuses.pop(final_id) == "FINISHED"
    assert set(statuses.values()) <= {"KILLED"}  # an orphan is closed, never left RUNNING
    assert bool(statuses) == needle.startswith("round_"), statuses
    for metric in ("final_accuracy_mean", "final_accuracy_client_mean", "clients", "accuracy_mean"):
        steps = [m.step for m in store.get_metric_history(final_id, metric)]
        assert sorted(steps) == ([2] if metric.startswith("final") else [0, 1]), metric
    assert (store.get_metric_history(final_id, "final_accuracy_mean")[0].value
            == json.loads((out / "summary.json").read_text())["local"]["mean_accuracy"])


def test_outputs_follow_the_contract_and_are_tracked(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tiny_config(SIM)
    outcome = run_experiment(config, progress=False)
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["pfedla", "fedavg", "local"]
    for entry in summary.values():
        (seed_entry,) = entry["seeds"].values()  # one seed: the experiment's numbers are that seed's
        assert list(entry["seeds"]) == ["0"] and entry["mean_accuracy_std"] is None
        assert len(seed_entry["client_accuracies"]) == 4 and entry["rounds"] == 3
        assert entry["wall_seconds"] == seed_entry["wall_seconds"] > 0
        assert 0.0 <= entry["mean_accuracy"] == seed_entry["mean_accuracy"] <= 1.0
        assert entry["client_mean_accuracy"] == pytest.approx(np.mean(seed_entry["client_accuracies"]))
    seed = out / "seed_0"
    partition = json.loads((seed / "partition.json").read_text())["clients"]
    assert len(partition) == 4 and all(len(c["train"]) == 10 for c in partition)
    alpha = np.load(seed / "layer_weights.npy")
    assert alpha.shape == (4, 4, 4)  # client, layer (conv1, conv2, fc1, fc2), source client
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
    assert not (seed / "layer_weights_raw.npy").exists()  # heur_k = 0: nothing masked, no second copy
    models, meta = storage.load_tensors(seed / "models" / "pfedla.safetensors")
    assert meta["algorithm"] == "pfedla" and "client3.fc2.bias" in models
    assert (out / "report.md").is_file() and (out / "figures" / "accuracy.png").is_file()

    assert outcome.tracking_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(summary["pfedla"]["seeds"]["0"]["mlflow_run_id"])
    assert run.data.params["clients"] == "4" and run.data.params["partition.kind"] == "pathological"
    history = client.get_metric_history(run.info.run_id, "accuracy_mean")
    assert [m.step for m in history] == [0, 1, 2]
    for name in ("bytes_down", "bytes_up", "round_seconds", "alpha_entropy", "alpha_self_weight",
                 "failed_clients", "accuracy_client_mean", "accuracy_min", "accuracy_max", "loss_mean"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 3, name
    for metric, key in (("final_accuracy_mean", "mean_accuracy"),
                        ("final_accuracy_client_mean", "client_mean_accuracy")):
        (final_metric,) = client.get_metric_history(run.info.run_id, metric)
        assert (final_metric.step, final_metric.value) == (3, summary["pfedla"][key]), metric
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "layer_weights")}
    assert artifacts == {"layer_weights/round_0002", "layer_weights/round_0003"}
    final = {a.path for a in client.list_artifacts(run.info.run_id, "layer_weights/round_0003")}
    assert "layer_weights/round_0003/layer_weights.npy" in final
    assert "layer_weights/round_0003/layer_weights_raw.npy" not in final
    assert sum(p.endswith(".png") for p in final) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id, "models")} == {"models/pfedla.safetensors"}
    assert "pfedla" in format_table(outcome.summary)


def test_same_seed_same_numbers_and_shared_client_schedule(tiny_config, tmp_path):
    config = tiny_config(SIM, participation=0.5, rounds=4)
    first = run_experiment(config, progress=False, track=False)
    second = run_experiment(config, progress=False, track=False, overwrite=True)
    for name in config.algorithms:
        assert first.results[name].client_accuracies == second.results[name].client_accuracies
    schedule = [participants(config, r) for r in range(4)]
    assert all(len(s) == 2 for s in schedule) and len({tuple(s) for s in schedule}) > 1


def test_heurpfedla_sends_fewer_bytes(tiny_config, tmp_path):
    plain = run_experiment(tiny_config(SIM, algorithms=["pfedla"]), progress=False, track=False)
    heur = run_experiment(tiny_config(SIM, algorithms=["pfedla"], pfedla={"heur_k": 2}), progress=False,
                          track=False, overwrite=True)
    down_plain = plain.results["pfedla"].history[0]["bytes_down"]
    down_heur = heur.results["pfedla"].history[0]["bytes_down"]
    assert 0 < down_heur < down_plain
    assert heur.results["pfedla"].history[0]["bytes_up"] == plain.results["pfedla"].history[0]["bytes_up"]


def test_heurpfedla_records_the_hypernetworks_alpha_beside_the_masked_one(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outcome = run_experiment(tiny_config(SIM, algorithms=["pfedla"], pfedla={"heur_k": 1}, rounds=2),
                             progress=False)
    result, out = outcome.results["pfedla"], tmp_path / "out"
    masked, raw = (np.load(out / "seed_0" / name) for name in ("layer_weights.npy", "layer_weights_raw.npy"))
    np.testing.assert_array_equal(masked, result.layer_weights)
    np.testing.assert_array_equal(raw, result.raw_layer_weights)
    assert raw.shape == masked.shape == (4, 4, 4)
    np.testing.assert_allclose(raw.sum(-1), 1.0, rtol=1e-5)
    differs = (raw != masked).any(-1)  # [client, layer]: exactly the one layer each client kept local
    assert (differs.sum(1) == 1).all()
    kept = differs.argmax(1)
    np.testing.assert_array_equal(masked[np.arange(4), kept], np.eye(4))
    client = MlflowClient(outcome.tracking_uri)
    stored = client.download_artifacts(result.run_id, "layer_weights/round_0002/layer_weights_raw.npy",
                                       str(tmp_path))
    np.testing.assert_array_equal(np.load(stored), raw)


def test_failing_and_hostile_clients_are_left_out_without_touching_honest_ones(tmp_path, monkeypatch, caplog):
    """Fault injection: a wrapper around the real client training misbehaves for chosen clients."""
    import logging

    from pfedla import simulation

    real_fit = simulation.fit_client

    def misbehaving(kinds):
        def fit(*args):
            update, state = real_fit(*args)
            kind = kinds.get(update.client_id)
            if kind == "raise":
                raise RuntimeError("client 1 lost its GPU")
            if kind == "nan":
                update.delta[0][0] = float("nan")
            if kind == "huge":
                update.delta = [d * 1e6 for d in update.delta]
            return update, state
        return fit

    raw = {"clients": 6, "rounds": 3, "device": "cpu", "algorithms": ["pfedla", "fedavg"],
           "max_update_norm": 1000.0, "output_dir": str(tmp_path / "out")}
    monkeypatch.setattr(simulation, "fit_client", misbehaving({1: "raise", 2: "nan", 3: "huge"}))
    with caplog.at_level(logging.WARNING, logger="pfedla"):
        hostile = run_experiment(config_from_dict(raw), progress=False, track=False)
    assert "client 1 left out: training raised RuntimeError: client 1 lost its GPU" in caplog.text
    assert "client 2 left out: update has NaN or Inf values" in caplog.text
    assert "client 3 left out: update L2 norm" in caplog.text and "exceeds max_update_norm" in caplog.text
    for result in hostile.results.values():
        assert [h["failed_clients"] for h in result.history] == [3.0, 3.0, 3.0]
        assert all(np.isfinite(result.client_accuracies))
    # The same clients simply absent (every attempt raises): honest clients see exactly the same.
    monkeypatch.setattr(simulation, "fit_client", misbehaving({1: "raise", 2: "raise", 3: "raise"}))
    absent = run_experiment(config_from_dict(raw), progress=False, track=False, overwrite=True)
    honest = [0, 4, 5]
    for name in raw["algorithms"]:  # tolerance: exact equality
        assert [hostile.results[name].client_accuracies[i] for i in honest] == \
            [absent.results[name].client_accuracies[i] for i in honest]
    # With both norm limits off the huge update gets through and poisons the global model: the next
    # round's clients diverge (their NaN updates are left out, or all of them and the run stops) or
    # train from a ruined model; either way nothing better than chance is left.
    monkeypatch.setattr(simulation, "fit_client", misbehaving({3: "huge"}))
    unguarded = config_from_dict({**raw, "max_update_norm": None, "update_norm_ratio": None,
                                  "algorithms": ["fedavg"]})
    try:
        poisoned = run_experiment(unguarded, progress=False, track=False, overwrite=True).results["fedavg"]
        assert poisoned.client_mean_accuracy < 0.2
    except RunAborted as aborted:
        assert re.search(r"round 1: 6 of 6 clients failed.*NaN or Inf", str(aborted)), aborted
    # With the defaults (no absolute limit, the relative one on) it is left out every round and
    # the run ends as if client 3 had been absent.
    defaults = {k: v for k, v in raw.items() if k != "max_update_norm"} | {"algorithms": ["fedavg"]}
    with caplog.at_level(logging.WARNING, logger="pfedla"):
        guarded = run_experiment(config_from_dict(defaults), progress=False, track=False,
                                 overwrite=True).results["fedavg"]
    assert "client 3 left out: update L2 norm" in caplog.text and "update_norm_ratio=100" in caplog.text
    assert [h["failed_clients"] for h in guarded.history] == [1.0, 1.0, 1.0]
    monkeypatch.setattr(simulation, "fit_client", misbehaving({3: "raise"}))
    without_3 = run_experiment(config_from_dict(defaults), progress=False, track=False,
                               overwrite=True).results["fedavg"]
    assert guarded.client_accuracies == without_3.client_accuracies  # tolerance: exact equality
    assert guarded.client_mean_accuracy > 0.5  # the same run with the relative limit on learns


def test_a_client_past_client_timeout_is_left_out_like_an_absent_one(tmp_path, monkeypatch, caplog):
    """Fault injection: a forward hook makes every batch of client 2 take 7 s; the limit is 6 s, so
    honest clients (18 batches in well under a second alone) keep a wide margin on a loaded machine
    (one took 3.1 s while other test suites shared the 2 cores)."""
    import logging
    import time

    from pfedla import simulation

    real_fit = simulation.fit_client

    def fit(slow_or_absent):
        def fit_client(rule, trainer, *args):
            if args[-1] != 2:
                return real_fit(rule, trainer, *args)
            if slow_or_absent == "absent":
                raise RuntimeError("absent")
            hook = trainer.model.register_forward_pre_hook(lambda *_: time.sleep(7.0))
            try:
                return real_fit(rule, trainer, *args)
            finally:
                hook.remove()
        return fit_client

    raw = {"clients": 4, "rounds": 2, "device": "cpu", "algorithms": ["pfedla"], "client_timeout": 6.0,
           "output_dir": str(tmp_path / "out")}
    monkeypatch.setattr(simulation, "fit_client", fit("slow"))
    with caplog.at_level(logging.WARNING, logger="pfedla"):
        slow = run_experiment(config_from_dict(raw), progress=False, track=False).results["pfedla"]
    assert re.search(r"client 2 left out: timed out: \d of 18 batches done when client_timeout=6 s ran out",
                     caplog.text)
    assert [h["failed_clients"] for h in slow.history] == [1.0, 1.0]
    monkeypatch.setattr(simulation, "fit_client", fit("absent"))
    absent = run_experiment(config_from_dict(raw), progress=False, track=False,
                            overwrite=True).results["pfedla"]
    assert slow.client_accuracies == absent.client_accuracies  # tolerance: exact equality


@pytest.mark.parametrize(("algorithm", "step_size"), [("ditto", "ditto.lam=1.0e+30"),
                                                      ("pfedla", "pfedla.hn_lr=1.0e+30")])
def test_a_diverging_run_stops_naming_algorithm_seed_and_round_and_keeps_no_diverged_checkpoint(
        algorithm, step_size, tmp_path, capsys, monkeypatch):
    """Issue 21, case 9: on 42ac5ca every personal model (Ditto) or personalized model (pFedLA) became
    NaN, every accuracy was 0.0000 and the run ended with exit 0."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "out"
    code = main(["run", "--quiet", "--set", "clients=3", "--set", "rounds=2", "--set", "model=mlp", "--set",
                 "device=cpu", "--set", f"algorithms=[{algorithm}]", "--set", step_size, "--set",
                 f"output_dir={out}"])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("pfedla: error:")]
    assert code == 2 and "Traceback" not in stderr and len(errors) == 1, stderr
    assert re.fullmatch(rf"pfedla: error: {algorithm}, seed 0, round [01]: .+ became non-finite "
                        r"\(NaN or Inf\), first at \S+: the run diverged; lower lr .*", errors[0]), errors[0]
    assert not (out / "summary.json").exists() and not (out / "seed_0" / "results").exists()
    for path in (out / "checkpoints").rglob("*.safetensors"):  # what a resume would continue from
        tensors, _ = storage.load_tensors(path)
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), path


@pytest.mark.parametrize("algorithm", ["fedper", "ditto", "fedbn"])
def test_a_resume_never_continues_from_a_non_finite_or_absurd_client_state(algorithm, tiny_config, tmp_path,
                                                                          caplog):
    """Issue 21, case 8: on 42ac5ca a NaN in a client's checkpointed state (FedPer's head, Ditto's
    personal model, FedBN's running variance), or a private layer x 1e30, resumed with exit 0 and that
    client scored 0.0000. Now the newest checkpoint is skipped naming the tensor, and the resume from
    the one before gives the uninterrupted run's numbers."""
    config = tiny_config(algorithms=[algorithm], clients=3, rounds=2, model="mlp_bn")
    finished = run_experiment(config, progress=False, track=False).results[algorithm]
    out = Path(config.output_dir)
    (newest,) = out.glob(f"checkpoints/rounds/*/seed_0/{algorithm}/round_00002.safetensors")
    tensors, meta = storage.load_tensors(newest)
    kept = {"fedper": ".layer.", "ditto": ".personal.", "fedbn": "running_var"}[algorithm]
    name = next(key for key in sorted(tensors) if key.startswith("client.1.") and kept in key)
    with_nan = tensors[name].clone()
    with_nan.view(-1)[0] = float("nan")
    for damaged, problem in [(with_nan, "holds NaN or Inf"),
                             (tensors[name] * 1e30, "holds values beyond 1e+18 in magnitude")]:
        (out / "summary.json").unlink(missing_ok=True)
        (out / "seed_0" / "results" / f"{algorithm}.json").unlink()
        storage.save_tensors(newest, {**tensors, name: damaged}, meta)
        caplog.clear()
        resumed = run_experiment(config, progress=False, track=False, resume=True).results[algorithm]
        assert f"round_00002.safetensors is unusable (tensor '{name}' {problem}" in caplog.text
        assert resumed.client_accuracies == finished.client_accuracies
        assert [without_timing(entry) for entry in resumed.history] == \
            [without_timing(entry) for entry in finished.history]


def without_timing(entry: dict) -> dict:
    return {key: value for key, value in entry.items() if key != "round_seconds"}
