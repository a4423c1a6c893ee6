"""``evaluate.py task=report runs=<sweep dir or run dirs>``: a comparison of training runs, offline.

Every run directory holds the ``metrics.json`` its metrics callback writes (each measurement: step and, per
sampling, NFE, FID, IS, ...), Hydra's ``.hydra/overrides.yaml`` and its sample grids. From them the report
writes, in ``out_dir``: ``fid_vs_nfe.png`` (and ``is_vs_nfe.png``) at each run's last measurement, one line
per run labelled by the overrides that tell the runs apart; ``fid_vs_step.png``; ``samples.png``, each run's
latest grids side by side; and ``report.html`` with these and the table of each run's best FID per NFE.
``report.wandb=true`` also saves the same comparison as a W&B Report in the runs' project (wandb-workspaces).
"""

import html
import logging
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from omegaconf import DictConfig
from PIL import Image

from cm_lightning.errors import ConfigError
from cm_lightning.runtime import atomic
from cm_lightning.tasks import run_records
from cm_lightning.wandb_runs import wandb_mode

log = logging.getLogger(__name__)

COMPARABLE = ("reference", "feature_extractor", "num")  # what must match for numbers to be comparable


@dataclass
class Run:
    path: Path
    overrides: list[str]
    measured: dict  # metrics.json

    @property
    def history(self) -> list[dict]:
        return self.measured["history"]

    @property
    def last(self) -> dict[str, dict]:
        """Per sampling ({"1step": {"nfe": 1, "fid": ...}}), the latest measurement."""
        return self.history[-1]["results"]


def find_runs(paths) -> list[Path]:
    """Run directories (those with a metrics.json) among ``paths`` and their sub-directories (a sweep's jobs)."""
    found = []
    for path in map(Path, paths):
        if (path / "metrics.json").is_file():
            found.append(path)
        elif path.is_dir():
            jobs = [p.parent for p in path.glob("*/metrics.json")]
            found += sorted(jobs, key=lambda p: (len(p.name), p.name))  # 0, 1, ..., 10 in sweep order
    return found


def load(path: Path) -> Run:
    return Run(path, run_records.overrides_of(path), run_records.measured(path))


def check_comparable(runs: list[Run]) -> None:
    """Runs measured against another dataset's statistics, with another feature extractor or sample count
    give numbers that cannot share a plot."""
    first = runs[0]
    for run in runs[1:]:
        for key in COMPARABLE:
            if run.measured[key] != first.measured[key]:
                raise ConfigError(
                    f"runs: {first.path} and {run.path} differ in {key} ({first.measured[key]} vs "
                    f"{run.measured[key]}); report runs of one dataset measured the same way"
                )


def labels(runs: list[Run]) -> list[str]:
    """Each run's overrides that not every run shares (a sweep's swept values), else its directory name."""
    shared = set.intersection(*(set(r.overrides) for r in runs))
    return [",".join(o for o in r.overrides if o not in shared) or r.path.name for r in runs]


def metric_vs_nfe(runs: list[Run], names: list[str], metric: str) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for run, name in zip(runs, names):
        points = sorted((r["nfe"], r[metric]) for r in run.last.values() if metric in r)
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="NFE", ylabel=metric.upper(), title=f"{metric.upper()} at each run's last measurement")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # NFE counts network evaluations
    ax.legend(fontsize="small")
    return fig


def fid_vs_step(runs: list[Run], names: list[str]) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for run, name in zip(runs, names):
        for sampling in run.last:
            points = [
                (h["step"], h["results"][sampling]["fid"])
                for h in run.history
                if "fid" in h["results"].get(sampling, {})
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{name} {sampling}")
    ax.set(xlabel="optimiser step", ylabel="FID", title="FID during training")
    ax.legend(fontsize="small")
    return fig


def latest_grid(run: Run, sampling: str) -> Path | None:
    """The run's last sample grid of this sampling: ``final_*`` or the highest step."""
    grids = sorted((run.path / "samples").glob(f"*_{sampling}.png"))
    final = run.path / "samples" / f"final_{sampling}.png"
    return final if final.is_file() else (grids[-1] if grids else None)


def samples(runs: list[Run], names: list[str]) -> Figure:
    samplings = list(dict.fromkeys(s for run in runs for s in run.last))
    fig = Figure(figsize=(2.5 * len(samplings), 2.5 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), len(samplings), squeeze=False)
    for row, run, name in zip(axes, runs, names):
        for ax, sampling in zip(row, samplings):
            grid = latest_grid(run, sampling)
            if grid is not None:
                ax.imshow(Image.open(grid), cmap="gray")
            ax.set_axis_off()
            ax.set_title(f"{name}\n{sampling}", fontsize="small")
    return fig


def best_fids(runs: list[Run], names: list[str]) -> list[dict]:
    """Per run and sampling: the lowest FID measured and its step."""
    rows = []
    for run, name in zip(runs, names):
        for sampling, result in run.last.items():
            measured = [
                (h["results"][sampling]["fid"], h["step"])
                for h in run.history
                if "fid" in h["results"].get(sampling, {})
            ]
            if measured:
                fid, step = min(measured)
                rows.append(dict(run=name, sampling=sampling, nfe=result["nfe"], fid=fid, step=step))
    return rows


def plots(runs: list[Run], names: list[str]) -> dict[str, Figure]:
    figures = {"fid_vs_nfe": metric_vs_nfe(runs, names, "fid"), "fid_vs_step": fid_vs_step(runs, names)}
    if any("is" in r for run in runs for r in run.last.values()):
        figures["is_vs_nfe"] = metric_vs_nfe(runs, names, "is")
    figures["samples"] = samples(runs, names)
    return figures


def write_html(out: Path, title: str, runs: list[Run], pngs: list[Path], table: list[dict]) -> Path:
    def e(value) -> str:  # every value written into the page, whatever its type: the runs' files are data
        return html.escape(str(value), quote=True)

    head = "".join(f"<th>{k}</th>" for k in ("run", "sampling", "NFE", "best FID", "at step"))
    body = "".join(
        f"<tr><td>{e(r['run'])}</td><td>{e(r['sampling'])}</td><td>{e(r['nfe'])}</td>"
        f"<td>{e(format(r['fid'], '.3f'))}</td><td>{e(r['step'])}</td></tr>"
        for r in table
    )
    listed = "".join(f"<li>{e(run.path)}</li>" for run in runs)
    images = "".join(f'<p><img src="{e(p.name)}" alt="{e(p.stem)}"></p>' for p in pngs)
    m = runs[0].measured
    title = e(title)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body>"
        f"<h1>{title}</h1><p>{len(runs)} runs; reference {e(m['reference'])}, "
        f"{e(m['feature_extractor'])} features of {e(m['num'])} samples.</p><ul>{listed}</ul>"
        f"<h2>Best FID per run and NFE</h2><table border='1'><tr>{head}</tr>{body}</table>{images}"
        f"</body></html>"
    )
    path = out / "report.html"
    atomic.write_text(path, page)
    return path


def check_wandb(cfg: DictConfig) -> None:
    if cfg.report.wandb and wandb_mode() != "online":
        raise ConfigError(
            "report.wandb=true but W&B is not configured (or WANDB_MODE is not online); run "
            "`wandb login` or set WANDB_API_KEY, or leave report.wandb=false for the offline report"
        )


def wandb_report(runs: list[Run], samplings: list[str], settings: DictConfig):
    """The W&B Report of these runs (not saved): FID and IS against the step, the best FID per run (the FID
    summaries are minima), the sample grids and the FID-vs-NFE tables, over a run set of exactly these runs."""
    try:  # the report extra: only this option needs it
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        raise ConfigError("report.wandb=true needs wandb-workspaces: pip install 'cm-lightning[report]'") from None
    runs_wandb = [r.measured.get("wandb") for r in runs]
    if None in runs_wandb:
        missing = runs[runs_wandb.index(None)].path
        raise ConfigError(f"runs: {missing} logged to no W&B run (logger=csv?); report.wandb needs W&B runs")
    where = {
        k: settings.get(k) or runs_wandb[0][k] for k in ("entity", "project") if settings.get(k) or runs_wandb[0][k]
    }  # an empty entity: the user's default entity, looked up on saving
    fids, iss = [f"metrics/fid_{s}" for s in samplings], [f"metrics/is_{s}" for s in samplings]
    panels = [
        wr.LinePlot(title="FID during training", x="trainer/global_step", y=fids),
        wr.LinePlot(title="IS during training", x="trainer/global_step", y=iss),
        wr.BarPlot(title="Best FID per run", metrics=fids),
        wr.MediaBrowser(title="Samples", media_keys=[f"samples/{s}" for s in samplings]),
        wr.WeavePanelSummaryTable(table_name="metrics/fid_vs_nfe"),
    ]
    ids = ", ".join(repr(r["id"]) for r in runs_wandb)
    runset = wr.Runset(**where, name="runs", filters=f"ID in [{ids}]")
    return wr.Report(
        **where,
        title=settings.title,
        description=f"{len(runs)} runs: FID and IS against the step and the number of network evaluations",
        blocks=[wr.H1(text=settings.title), wr.PanelGrid(runsets=[runset], panels=panels)],
    )


def report_task(cfg: DictConfig) -> list[Path]:
    check_wandb(cfg)
    given = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs or [])  # runs=<dir> or runs=[<dir>,...]
    paths = find_runs(given)
    if not paths:
        raise ConfigError(
            f"runs={given} holds no training run with a metrics.json; pass a sweep directory or run "
            "directories whose metrics callback measured at least once"
        )
    runs = [load(p) for p in paths]
    check_comparable(runs)
    names = labels(runs)
    samplings = list(dict.fromkeys(s for run in runs for s in run.last))
    report = wandb_report(runs, samplings, cfg.report) if cfg.report.wandb else None  # its errors come first
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    for name, fig in plots(runs, names).items():
        with atomic.replacing(out / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        pngs.append(out / f"{name}.png")
    written = [write_html(out, cfg.report.title, runs, pngs, best_fids(runs, names)), *pngs]
    if report is not None:
        report.save()
        log.info("W&B report: %s", report.url)
    return written
