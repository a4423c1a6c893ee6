"""A Hydra sweep as a W&B user sees it: read back from the offline runs' files."""

import pytest
from helpers.launch import run_script
from helpers.wandb_records import OfflineRun


def offline_run(run_dir) -> OfflineRun:
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    return OfflineRun(wandb_dir)


def test_sweep_runs_share_a_group_with_distinct_names_and_tags(sweep):
    runs = [offline_run(sweep / str(i)) for i in (0, 1)]
    assert runs[0].run.run_group == runs[1].run.run_group == f"digits_ict/{sweep.name}"
    assert {r.run.job_type for r in runs} == {"train"}
    names = [r.run.display_name for r in runs]
    assert names[0] != names[1] and all(n.startswith("digits_ict ") for n in names)
    assert "model.optimizer.lr=0.001" in names[0] and "model.optimizer.lr=0.002" in names[1]
    tags = [set(r.run.tags) for r in runs]
    assert {"digits_ict", "ict", "digits", "adm_tiny"} <= tags[0] & tags[1]
    assert "model.optimizer.lr=0.001" in tags[0] - tags[1] and "model.optimizer.lr=0.002" in tags[1] - tags[0]


def test_sweep_runs_log_what_a_w_and_b_user_compares(sweep):
    for i in (0, 1):
        run = offline_run(sweep / str(i))
        metrics = run.metrics
        for k in ("1step", "2step"):
            assert metrics[f"metrics/fid_{k}"].summary.min and metrics[f"metrics/is_{k}"].summary.max
            assert metrics[f"metrics/fid_{k}"].step_metric == "trainer/global_step"
        assert metrics["*"].step_metric == "trainer/global_step"  # every other key against the optimiser step
        rows = run.history
        logged = lambda key, rows=rows: [r[key] for r in rows if key in r]  # noqa: E731
        assert [r["trainer/global_step"] for r in rows if "metrics/fid_1step" in r] == [2, 4]
        assert logged("lr-RAdam")[0] == pytest.approx((1e-3, 2e-3)[i])
        assert logged("train/grad_norm") and all(g > 0 for g in logged("train/grad_norm"))
        assert logged("train/device/samples_per_sec") and all(v > 0 for v in logged("train/device/samples_per_sec"))
        assert logged("train/sec_per_step") and all(v > 0 for v in logged("train/sec_per_step"))


@pytest.mark.parametrize("task, outputs", [("fid", {"metrics.json"}), ("sample", {"samples_1step.npz"})])
def test_evaluation_run_joins_the_training_group_and_keeps_its_outputs(sweep, tmp_path, task, outputs):
    trained = offline_run(sweep / "0")
    ckpt = sweep / "0/checkpoints/last.ckpt"
    run_script(
        "evaluate.py",
        f"task={task}",
        f"ckpt={ckpt}",
        "num=50",
        "steps=[1]",
        "wandb.log=true",
        f"hydra.run.dir={tmp_path}",
    )
    run = offline_run(tmp_path)
    assert run.run.job_type == "evaluate" and run.run.run_group == trained.run.run_group
    assert run.run.display_name == f"{task} {trained.run.display_name}" and task in run.run.tags
    assert run.config["checkpoint"] == str(ckpt) and run.config["checkpoint_run_id"] == trained.run.run_id
    (artifact,) = [a for a in run.of("artifact") if a.type == "evaluation"]
    assert outputs <= {m.path for m in artifact.manifest.contents}
    if task == "fid":
        assert run.metrics["metrics/fid_1step"].summary.min
        (row,) = [r for r in run.history if "metrics/fid_1step" in r]
        assert row["trainer/global_step"] == 4


@pytest.mark.parametrize("task", ["fid", "sample"])
def test_an_evaluation_reads_its_checkpoint_once(sweep, tmp_path, monkeypatch, task):
    """The task, its scorer and its W&B record share one read of ``ckpt=``."""
    from helpers.launch import evaluate_here

    import cm_lightning.loading as loading

    ckpt, reads, real = sweep / "0/checkpoints/last.ckpt", [], loading.load_file
    loading._read_once.cache_clear()
    monkeypatch.setattr(
        loading, "load_file", lambda path, *args, **kwargs: reads.append(str(path)) or real(path, *args, **kwargs)
    )
    evaluate_here([f"task={task}", f"ckpt={ckpt}", "num=50", "steps=[1]", "wandb.log=true"], tmp_path)
    assert reads == [str(ckpt)] and list(tmp_path.glob("wandb/offline-run-*"))
