"""The in-process round loop: output contracts, tracking to the default sqlite store, determinism,
and the default experiment's headline result."""

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pfedla.config import config_from_dict
from pfedla.data.federated import class_overlap
from pfedla.simulation import run_experiment


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
