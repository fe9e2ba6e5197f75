"""The report: report.md and its figures from a finished run, the figure functions' curves, the
similarity order of the α heatmaps, and that the Markdown tables say what summary.json says."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from pfedla import report
from pfedla.cli import main
from pfedla.config import config_from_dict
from pfedla.errors import PfedlaError
from pfedla.simulation import run_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIB = 2**20


def history(rounds, accuracy, eval_every=1, alpha=False, sent=1000.0):
    """Per-round metrics as a run records them: accuracies every ``eval_every`` rounds and the last."""
    entries = []
    for r in range(rounds):
        entry = {"bytes_down": sent, "bytes_up": sent / 2}
        if (r + 1) % eval_every == 0 or r == rounds - 1:
            entry |= {"accuracy_mean": accuracy + 0.01 * r, "accuracy_client_mean": accuracy + 0.02 * r}
        if alpha:
            entry |= {"alpha_self_weight": 0.2 + 0.1 * r, "alpha_entropy": 1.0 - 0.1 * r}
        entries.append(entry)
    return entries


def curves(ax):
    """(lines, bands) drawn on ``ax``: Line2D objects and filled collections."""
    return len(ax.lines), len(ax.collections)


@pytest.mark.parametrize("seeds", [1, 3])
def test_each_algorithm_is_one_line_per_axes_with_a_band_only_over_several_seeds(seeds):
    histories = {name: {s: history(6, 0.5 + 0.1 * s + shift, eval_every=2, alpha=name.startswith("pfedla"))
                        for s in range(seeds)}
                 for name, shift in (("pfedla", 0.1), ("fedavg", 0.0), ("pfedla_frozen", 0.05), ("x", 0.2))}
    bands = 4 if seeds > 1 else 0
    for figure in (report.accuracy_figure(histories), report.bytes_figure(histories)):
        assert [curves(ax) for ax in figure.axes] == [(4, bands), (4, bands)]
    alpha = report.alpha_training_figure(histories)
    assert [curves(ax) for ax in alpha.axes] == [(2, bands // 2)] * 2  # the two pFedLA variants only
    (line, *_) = report.accuracy_figure(histories).axes[0].lines
    rounds, values = report.seed_series(histories["pfedla"], "accuracy_mean")
    assert list(rounds) == [2, 4, 6]  # the evaluated rounds, counted from 1
    np.testing.assert_allclose(line.get_ydata(), values.mean(axis=0))
    assert report.alpha_training_figure({"local": histories["fedavg"]}) is None


def test_accuracy_is_drawn_against_the_bytes_sent_so_far():
    histories = {"fedavg": {seed: history(4, accuracy, eval_every=2, sent=MIB)
                            for seed, accuracy in ((0, 0.5), (1, 0.6))}}
    (line,) = report.bytes_figure(histories).axes[0].lines
    np.testing.assert_allclose(line.get_xdata(), [3.0, 6.0])  # 1.5 MiB a round; evaluated after rounds 2, 4
    np.testing.assert_allclose(line.get_ydata(), [0.56, 0.58])


def test_the_client_figure_shows_every_client_of_every_seed_and_the_client_mean():
    summary = {name: {"client_mean_accuracy": mean,
                      "seeds": {"0": {"client_accuracies": [mean - 0.1, mean, mean + 0.1]},
                                "4": {"client_accuracies": [mean, mean, mean - 0.05]}}}
               for name, mean in (("pfedla", 0.8), ("local", 0.7))}
    (ax,) = report.client_accuracy_figure(summary).axes
    assert curves(ax) == (2, 2)
    assert [len(points.get_offsets()) for points in ax.collections] == [6, 6]
    assert [line.get_ydata()[0] for line in ax.lines] == [0.8, 0.7]


def test_similarity_order_puts_clients_with_alike_data_side_by_side():
    # clients 0, 3, 5 hold classes 0-1; 1, 4 classes 2-3; 2 classes 4-5 and a little of 2
    counts = np.zeros((6, 6))
    counts[[0, 3, 5], 0:2] = [[30, 10], [25, 12], [28, 9]]
    counts[[1, 4], 2:4] = [[5, 40], [6, 35]]
    counts[2, 4:6], counts[2, 2] = [20, 20], 3
    order = report.similarity_order(counts)
    assert sorted(order) == list(range(6))
    position = {client: order.index(client) for client in range(6)}
    for group in ([0, 3, 5], [1, 4]):
        spots = sorted(position[c] for c in group)
        assert spots == list(range(spots[0], spots[0] + len(group))), order
    assert abs(position[2] - position[1]) == 1 or abs(position[2] - position[4]) == 1  # shares class 2
    assert report.similarity_order(np.ones((1, 3))) == [0] and report.similarity_order(np.zeros((0, 3))) == []


def test_the_heatmap_figure_draws_each_layer_in_the_given_order():
    alpha = np.random.default_rng(0).dirichlet(np.ones(5), size=(5, 3))  # [client, layer, source]
    order = [3, 0, 4, 1, 2]
    figure = report.alpha_heatmap_figure(alpha, order, ["a", "b", "c"], "t")
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["a", "b", "c"]
    for layer, ax in enumerate(panels):
        np.testing.assert_array_equal(ax.images[0].get_array(), alpha[:, layer, :][np.ix_(order, order)])
    assert report.layer_names("cnn", 4) == ["conv1", "conv2", "fc1", "fc2"]
    assert report.layer_names("mlp", 3) == ["fc1", "fc2", "fc3"]
    assert report.layer_names("cnn", 5) == [f"layer {i}" for i in range(5)]


# -- a real run's report ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    config = config_from_dict({"clients": 4, "rounds": 2, "seeds": [0, 1], "algorithms": ["pfedla", "local"],
                               "device": "cpu", "output_dir": str(out)})
    run_experiment(config, progress=False, track=False)
    return out


def markdown_tables(text):
    """Every Markdown table in ``text`` as a list of {header: cell} rows."""
    tables, rows = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            header, _, *body = rows
            tables.append([dict(zip(header, row, strict=True)) for row in body])
            rows = []
    return tables


def number(cell):
    return None if cell == "–" else float(cell)


def assert_close(cell, value):
    """A table cell holds ``value`` as written with 4 decimals (– for none)."""
    assert (number(cell) is None) == (value is None), (cell, value)
    if value is not None:
        assert number(cell) == pytest.approx(value, abs=5e-5), (cell, value)


def assert_tables_match_the_summary(text, summary):
    final, per_seed = markdown_tables(text)
    assert [row["algorithm"] for row in final] == list(summary)
    for row in final:
        entry = summary[row["algorithm"]]
        for column, key in (("sample acc", "mean_accuracy"), ("client acc", "client_mean_accuracy")):
            mean, _, std = row[column].partition(" ± ")  # "mean ± std", or the mean alone for one seed
            assert_close(mean, entry[key])
            assert_close(std or "–", entry[f"{key}_std"])
        for column, key in (("min acc", "min_accuracy"), ("max acc", "max_accuracy")):
            assert_close(row[column], entry[key])
        assert (int(row["seeds"]), int(row["rounds"])) == (len(entry["seeds"]), entry["rounds"])
    assert [(row["algorithm"], row["seed"]) for row in per_seed] == [
        (name, seed) for name, entry in summary.items() for seed in entry["seeds"]]
    for row in per_seed:
        entry = summary[row["algorithm"]]["seeds"][row["seed"]]
        for column, key in (("sample acc", "mean_accuracy"), ("client acc", "client_mean_accuracy"),
                            ("min acc", "min_accuracy"), ("max acc", "max_accuracy")):
            assert_close(row[column], entry[key])


def assert_valid_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"))
    assert min(pixels.shape) >= 300 and pixels.std() > 10, path  # drawn on, not a blank canvas


def test_a_finished_run_has_its_report_with_valid_figures_and_the_summary_in_its_tables(seeded_run):
    out = seeded_run
    summary = json.loads((out / "summary.json").read_text())
    figures = {p.name for p in (out / "figures").iterdir()}
    assert figures == {"accuracy.png", "client_accuracy.png", "accuracy_vs_bytes.png", "alpha_training.png",
                       "alpha_pfedla_seed_0.png", "alpha_pfedla_seed_1.png"}
    for name in figures:
        assert_valid_png(out / "figures" / name)
    text = (out / "report.md").read_text()
    assert_tables_match_the_summary(text, summary)
    linked = set(re.findall(r"!\[[^\]]*\]\((figures/[^)]+)\)", text))
    assert linked == {f"figures/{name}" for name in figures}
    assert "weighted by each client's test size" in text and "unweighted mean" in text
    assert summary["pfedla"]["mean_accuracy_std"] is not None  # two seeds: a spread in the tables
    # what the figures were drawn from has the expected curves: 2 algorithms, bands over 2 seeds
    data = report.load_run(out)
    assert data.seeds == [0, 1] and set(data.alphas) == {"pfedla"}
    assert [curves(ax) for ax in report.accuracy_figure(data.histories).axes] == [(2, 2), (2, 2)]
    assert [curves(ax) for ax in report.alpha_training_figure(data.histories).axes] == [(1, 1), (1, 1)]


def test_pfedla_report_rewrites_the_same_report(seeded_run, capsys):
    out = seeded_run
    before = (out / "report.md").read_bytes()
    for png in (out / "figures").iterdir():
        png.unlink()
    assert main(["report", str(out)]) == 0
    assert f"wrote {out / 'report.md'} and 6 figures" in capsys.readouterr().out
    assert (out / "report.md").read_bytes() == before
    assert len(list((out / "figures").glob("*.png"))) == 6


def test_heurpfedla_heatmaps_show_the_alpha_the_hypernetworks_learned(seeded_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(seeded_run, out)
    masked = np.load(out / "seed_1" / "layer_weights.npy")
    raw = np.random.default_rng(1).dirichlet(np.ones(masked.shape[0]), size=masked.shape[:2])
    np.save(out / "seed_1" / "layer_weights_raw.npy", raw)  # what a run with heur_k > 0 writes beside it
    data = report.load_run(out)
    np.testing.assert_array_equal(data.alphas["pfedla"][1][0], raw)
    assert data.alphas["pfedla"][1][1] and not data.alphas["pfedla"][0][1]
    report.write_report(out)
    assert "seed 1: final α per layer before HeurpFedLA's one-hot rows" in (out / "report.md").read_text()


def test_a_report_without_pfedla_and_with_one_seed(tmp_path):
    out = tmp_path / "out"
    config = config_from_dict({"clients": 3, "rounds": 2, "algorithms": ["fedavg", "local"], "seed": 7,
                               "device": "cpu", "output_dir": str(out), "eval_every": 2})
    run_experiment(config, progress=False, track=False)
    summary = json.loads((out / "summary.json").read_text())
    assert {p.name for p in (out / "figures").iterdir()} == {"accuracy.png", "client_accuracy.png",
                                                             "accuracy_vs_bytes.png"}
    text = (out / "report.md").read_text()
    assert_tables_match_the_summary(text, summary)
    assert "α" not in text and "seeds 7." in text
    final, _ = markdown_tables(text)
    assert not any("±" in row["sample acc"] or "±" in row["client acc"] for row in final)
    accuracy = report.accuracy_figure(report.load_run(out).histories)
    assert [curves(ax) for ax in accuracy.axes] == [(2, 0), (2, 0)]  # one seed: no bands
    assert [len(line.get_xdata()) for line in accuracy.axes[0].lines] == [1, 1]  # evaluated once


def test_a_directory_without_a_finished_run_or_with_an_old_summary_is_one_error_line(seeded_run, tmp_path,
                                                                                    capsys):
    with pytest.raises(PfedlaError, match="holds no finished pfedla run"):
        report.write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pfedla: error: ") and "pfedla run --resume" in line
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_bytes((seeded_run / "run.json").read_bytes())
    flat = {name: {"mean_accuracy": 0.9, "client_accuracies": [0.9]} for name in ("pfedla", "local")}
    (old / "summary.json").write_text(json.dumps(flat))  # as written before seed folders
    assert main(["report", str(old)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "summary.json is damaged or from an older pfedla: 'pfedla.client_mean_accuracy' must be" in line
    assert not (old / "report.md").exists()


@pytest.mark.parametrize(("model", "names"), [("cnn_bn", ["conv1", "bn1", "conv2", "bn2", "fc1", "fc2"]),
                                              ("mlp_bn", ["fc1", "bn1", "fc2", "bn2", "fc3"])])
def test_heatmap_panels_are_named_after_every_models_layers(model, names):
    assert report.layer_names(model, len(names)) == names
    assert report.layer_names(model, 2) == ["layer 0", "layer 1"]  # another architecture: numbered
