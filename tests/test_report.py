"""`hpclm report`: plots a reader can read (axes from zero, every point visible, the legend off the data)."""
import json

import matplotlib
import pytest

from conftest import run_python
from helpers.tiny_corpus import tiny_corpus  # noqa: F401 (a fixture)
from hpclm import report

matplotlib.use("Agg")


def _train_records(n, ranks=2):
    return [{"kind": "train", "step": 10 * (i + 1), "tokens": 640 * (i + 1), "loss": 3.0 - 0.1 * i,
             "tokens_per_s": 5000.0 + 100 * i, "step_time_s": 0.02 + 0.001 * i, "ranks": ranks} for i in range(n)]


def _inside(inner, outer):
    return inner.x0 >= outer.x0 and inner.x1 <= outer.x1 and inner.y0 >= outer.y0 and inner.y1 <= outer.y1


@pytest.mark.parametrize("n", [1, 3, 200])
def test_throughput_axes_start_at_zero_and_the_legend_covers_nothing(n):
    fig = report.throughput_figure(_train_records(n), "run")
    tokens_ax, ms_ax = fig.axes
    assert tokens_ax.get_ylim()[0] == 0 and ms_ax.get_ylim()[0] == 0
    assert tokens_ax.get_ylim()[1] >= max(r["tokens_per_s"] for r in _train_records(n))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = tokens_ax.get_legend().get_window_extent(renderer)
    axes = tokens_ax.get_window_extent(renderer)
    assert legend.y1 <= axes.y0  # below the plot area
    ticks = [t.get_window_extent(renderer) for t in tokens_ax.get_xticklabels() if t.get_text()]
    assert ticks and all(not legend.overlaps(t) for t in ticks)
    assert _inside(legend, fig.bbox)  # and still on the canvas
    labels = [t.get_text() for t in tokens_ax.get_legend().get_texts()]
    assert labels == ["tokens/s (all ranks)", "ms per step"]


def test_a_single_point_is_drawn_with_a_marker():
    records = _train_records(1) + [{"kind": "eval", "step": 10, "tokens": 640, "train_loss": 2.9, "val_loss": 3.1}]
    for fig in (report.throughput_figure(records, "run"), report.loss_figure(records, "run")):
        lines = [line for ax in fig.axes for line in ax.get_lines()]
        assert lines and all(line.get_marker() not in (None, "None", "") for line in lines)


def test_report_of_an_ngram_run_writes_both_plots(tiny_corpus, tmp_path):  # noqa: F811
    data, _ = tiny_corpus
    out = tmp_path / "run"
    train = run_python(["-m", "hpclm", "train", "--set", 'model.arch="ngram"', "--set", f"data.path={json.dumps(str(data))}",
                        "--set", "data.block_size=16", "--set", "train.eval_iters=2", "--out", str(out)])
    assert train.returncode == 0, train.stderr
    proc = run_python(["-m", "hpclm", "report", str(out), "--out", str(tmp_path / "plots")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "plots" / "loss.png"), str(tmp_path / "plots" / "throughput.png")]
    for name in ("loss.png", "throughput.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_directory_without_metrics_is_one_line(tmp_path):
    proc = run_python(["-m", "hpclm", "report", str(tmp_path)])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "metrics.jsonl" in proc.stderr
