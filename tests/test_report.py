"""``evaluate.py task=report``: a sweep's comparison, offline, whose plots show exactly the runs' numbers."""

import json

import pytest
from helpers.launch import run_script
from omegaconf import OmegaConf

from cm_lightning.errors import ConfigError
from cm_lightning.tasks import report


def measured(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_report_of_a_sweep_plots_the_runs_metrics(sweep, tmp_path):
    run_script("evaluate.py", "task=report", f"runs={sweep}", f"hydra.run.dir={tmp_path}")
    for name in ("report.html", "fid_vs_nfe.png", "is_vs_nfe.png", "fid_vs_step.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    page = (tmp_path / "report.html").read_text()
    assert "model.optimizer.lr=0.001" in page and "model.optimizer.lr=0.002" in page

    runs = [report.load(p) for p in report.find_runs([sweep])]
    assert [r.path for r in runs] == [sweep / "0", sweep / "1"]
    names = report.labels(runs)
    assert names == ["model.optimizer.lr=0.001", "model.optimizer.lr=0.002"]  # only what the sweep varies
    figures = report.plots(runs, names)
    for i, name in enumerate(names):
        last = measured(sweep / str(i))["history"][-1]["results"]
        for metric in ("fid", "is"):
            (line,) = [ln for ln in figures[f"{metric}_vs_nfe"].axes[0].lines if ln.get_label() == name]
            assert list(line.get_xdata()) == [1, 2]
            assert list(line.get_ydata()) == [last["1step"][metric], last["2step"][metric]]
        history = measured(sweep / str(i))["history"]
        for sampling in ("1step", "2step"):
            (line,) = [ln for ln in figures["fid_vs_step"].axes[0].lines if ln.get_label() == f"{name} {sampling}"]
            assert list(line.get_xdata()) == [2, 4]
            assert list(line.get_ydata()) == [h["results"][sampling]["fid"] for h in history]
    best = report.best_fids(runs, names)
    assert [(r["run"], r["sampling"], r["nfe"]) for r in best] == [(n, f"{k}step", k) for n in names for k in (1, 2)]
    for row in best:
        history = measured(sweep / str(names.index(row["run"])))["history"]
        assert row["fid"] == min(h["results"][row["sampling"]]["fid"] for h in history)


def test_wandb_report_spec_is_built_offline(sweep):
    expr = pytest.importorskip("wandb_workspaces.expr")
    runs = [report.load(p) for p in report.find_runs([sweep])]
    settings = OmegaConf.create(dict(title="lr sweep", entity="someone", project=None))
    spec = report.wandb_report(runs, ["1step", "2step"], settings)
    assert (spec.entity, spec.project, spec.title) == ("someone", "cm-lightning", "lr sweep")
    (grid,) = [b for b in spec.blocks if type(b).__name__ == "PanelGrid"]
    (runset,) = grid.runsets
    parsed = expr.expr_to_filters(runset.filters)  # as W&B's API would receive it: run ids
    assert (parsed.key.name, parsed.op, parsed.value) == ("name", "IN", [r.measured["wandb"]["id"] for r in runs])
    plots = {getattr(p, "title", None): p for p in grid.panels}
    assert plots["FID during training"].y == ["metrics/fid_1step", "metrics/fid_2step"]
    assert plots["FID during training"].x == "trainer/global_step"
    for panel in grid.panels:
        panel._to_model()  # the panels' specification W&B's API would receive (the run set's needs the API)


def test_report_bad_input_says_which(sweep, tmp_path, monkeypatch):
    err = run_script(
        "evaluate.py", "task=report", f"runs=[{tmp_path}]", f"hydra.run.dir={tmp_path / 'r'}", check=False
    ).stderr
    assert err.strip().splitlines()[-1].startswith("error: runs=[") and "no training run" in err
    err = run_script(
        "evaluate.py",
        "task=report",
        f"runs=[{sweep}]",
        "report.wandb=true",
        f"hydra.run.dir={tmp_path / 'r'}",
        check=False,
    ).stderr
    assert err.strip().splitlines()[-1].startswith("error: report.wandb=true but W&B is not configured")
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps(measured(sweep / "0") | {"reference": "cifar10-50000"}))
    with pytest.raises(ConfigError, match="differ in reference"):
        report.check_comparable([report.load(sweep / "0"), report.load(other)])
