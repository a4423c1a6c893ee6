"""FID/IS/KID/precision-recall: agreement with torch-fidelity, the reference cache, the training
callback and evaluate.py (task=fid, task=search_midpoint), W&B/CSV logging and bad input. Offline:
Inception weights are made here, random but well scaled, in torch-fidelity's format."""

import csv
import json
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity
from helpers import ROOT, TINY
from helpers.launch import run_script
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity import feature_extractor_inceptionv3 as inception

from cm_lightning.callbacks.metrics import Metrics
from cm_lightning.cli import register_resolvers
from cm_lightning.data.digits import DigitsDataModule, digits_tensor
from cm_lightning.diffusion.precond import consistency_function, edm_denoiser
from cm_lightning.errors import ConfigError
from cm_lightning.loading import sampler_from_checkpoint
from cm_lightning.metrics.fidelity import INCEPTION, Fidelity, resolve_weights, to_uint8
from cm_lightning.metrics.midpoint_search import ternary_search
from cm_lightning.metrics.reference import ReferenceSource
from cm_lightning.metrics.sharding import sample_shard, shard_chunks
from cm_lightning.sampler import Sampler
from cm_lightning.tasks import common
from cm_lightning.tasks.dispatch import evaluate

DIGITS = "digits-classifier"


class Images(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def direct(generated, reference, extractor=DIGITS, weights=None, **metrics):
    """torch-fidelity on its own, the way its README calls it."""
    layer = "2048" if extractor == INCEPTION else "features"
    return torch_fidelity.calculate_metrics(
        input1=Images(generated),
        input2=Images(reference),
        feature_extractor=extractor,
        feature_layer_fid=layer,
        feature_layer_kid=layer,
        feature_layer_prc=layer,
        feature_extractor_weights_path=None if weights is None else str(weights),
        cuda=False,
        verbose=False,
        cache=False,
        save_cpu_ram=True,
        **metrics,
    )


def make_inception_weights(path):
    """torch-fidelity's Inception with He-initialised weights: PyTorch's default init shrinks the pooled
    features to ~1e-8 (and every FID to 0); this keeps them O(1). Saved as its state dict."""
    with (
        mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        net = inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
    torch.save(net.state_dict(), path)
    return path


def digits_uint8():
    return to_uint8(digits_tensor(16)[0])


def write_npz(path, images_nchw):
    np.savez(path, arr_0=images_nchw.permute(0, 2, 3, 1).numpy())
    return path


def eval_cfg(*overrides):
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


# --- the math: torch-fidelity's numbers, the search, the sharding --------------------------------------
def test_metrics_equal_a_direct_torch_fidelity_call(tmp_path):
    real = digits_uint8()
    generated, reference = real[:300].flip(-1), real[300:700]
    fidelity = Fidelity(DIGITS, fid=True, isc=True, kid=True, prc=True, kid_subset_size=100)
    source = ReferenceSource.from_npz(write_npz(tmp_path / "ref.npz", reference))
    ours = fidelity.compute(fidelity.features(generated, "cpu"), source.load(fidelity, tmp_path, "cpu"))
    theirs = direct(generated, reference, isc=True, fid=True, kid=True, prc=True, kid_subset_size=100)
    assert ours["fid"] > 1 and ours["is"] > 1
    for key, name in [
        ("frechet_inception_distance", "fid"),
        ("inception_score_mean", "is"),
        ("kernel_inception_distance_mean", "kid"),
        ("precision", "precision"),
        ("recall", "recall"),
    ]:
        assert ours[name] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), name


def test_reference_statistics_are_cached_by_dataset_resolution_and_extractor(tmp_path):
    fidelity = Fidelity(DIGITS)
    source = ReferenceSource.from_npz(write_npz(tmp_path / "ref.npz", digits_uint8()[:50]))
    first = source.load(fidelity, tmp_path / "cache", "cpu")
    (path,) = (tmp_path / "cache").glob("*.npz")
    assert "-16px-1ch-digits-classifier-" in path.name and path.name.startswith("cm-ref-")
    with mock.patch.object(Fidelity, "features", side_effect=AssertionError("recomputed")):
        again = source.load(fidelity, tmp_path / "cache", "cpu")
    torch.testing.assert_close(again.features, first.features)
    assert np.array_equal(again.statistics["sigma"], first.statistics["sigma"])


def test_training_set_reference_is_a_fixed_subset_of_at_most_reference_num(tmp_path):
    fidelity = Fidelity(DIGITS, kid=True, kid_subset_size=50)
    source = ReferenceSource.from_datamodule(DigitsDataModule(), limit=100)
    assert (source.name, source.count, source.image_shape) == ("digits-100", 100, (1, 16, 16))
    reference = source.load(fidelity, tmp_path, "cpu")
    assert reference.features.shape == (100, 64)
    assert torch.equal(ReferenceSource.from_datamodule(DigitsDataModule(), limit=100)._images(), source._images())
    source.check((1, 16, 16), Fidelity(DIGITS), "the model")  # IS concerns the samples, not the reference
    with pytest.raises(ConfigError, match=r"the reference \(digits-100\) image count=100 is smaller than kid_subset"):
        source.check((1, 16, 16), Fidelity(DIGITS, kid=True), "the model")


def test_ternary_search_finds_the_minimum_within_budget():
    calls = []

    def score(p):
        calls.append(p)
        return (p - 22) ** 2

    best, scores = ternary_search(score, 1, 38)
    # By hand: [1, 38] -> third-points 13, 26 (81 > 16: keep [13, 38]) -> 21, 30 (1 < 64: keep [13, 30]) ...
    assert calls[:4] == [13, 26, 21, 30]
    assert best == 22 and len(calls) == len(set(calls)) == len(scores) < 20
    best, scores = ternary_search(lambda p: abs(p - 30), 1, 38, max_evals=4)
    assert len(scores) == 4 and scores[best] == min(scores.values())


@pytest.mark.parametrize("num,batch", [(13, 4), (8, 8), (3, 5), (100, 7)])
def test_shards_cover_every_chunk_once_for_any_world_size(num, batch):
    for world in (1, 2, 3, 8):
        chunks = [c for rank in range(world) for c in shard_chunks(num, batch, rank, world)]
        assert chunks == list(range(-(-num // batch)))


@pytest.mark.parametrize(
    "every,last,measured,expected",
    [(10, 12, 10, True), (10, 4, None, False), (10, 10, 10, False), (None, 4, None, True)],
)
def test_measured_at_the_end_unless_shorter_than_one_interval(every, last, measured, expected):
    callback = Metrics(every_n_steps=every, at_end=True)
    callback.measured_step = measured
    with mock.patch.object(Metrics, "measure") as measure:
        callback.on_train_end(mock.Mock(global_step=last), None)
    assert measure.called == expected


def test_samples_match_evaluate_sample_and_nfe_counts(edm_run):
    sampler = sampler_from_checkpoint(edm_run / "checkpoints/last.ckpt")
    images = sample_shard(sampler, 5, 2, 3, "cpu", steps=2)
    reference, _ = common.sample_batched(sampler, 5, 2, 3, "cpu", steps=2)
    assert torch.equal(images, to_uint8(reference))
    teacher, student = Sampler(None, edm_denoiser()), Sampler(None, consistency_function())
    assert teacher.nfe(dict(steps=18)) == 35 and teacher.nfe(dict(steps=18, solver="euler")) == 18
    assert student.nfe(dict(steps=2)) == 2 and student.nfe(dict(sigmas=[80.0, 0.8])) == 2


def test_sampling_plans_default_to_the_kind_of_model_and_keep_what_is_asked():
    teacher, student = Sampler(None, edm_denoiser()), Sampler(None, consistency_function())
    default, asked = eval_cfg("ckpt=x"), eval_cfg("ckpt=x", "steps=[1,2]")
    assert teacher.requested(**common.plan_options(default)) == {"18step": dict(steps=18, solver="heun")}
    assert student.requested(**common.plan_options(default)) == {"1step": dict(steps=1), "2step": dict(steps=2)}
    assert teacher.requested(**common.plan_options(asked)) == {
        k: dict(steps=int(k[0]), solver="heun") for k in ("1step", "2step")
    }
    assert list(student.requested(**common.plan_options(eval_cfg("ckpt=x", "ts=[0,22,39]")))) == ["ts0-22-39"]
    # the training callbacks sample from the same plans
    assert student.plans([1], {"sigmas0": [80.0, 0.8]}) == {"1step": dict(steps=1), "sigmas0": dict(sigmas=[80.0, 0.8])}


def test_training_and_evaluate_share_one_metrics_config():
    register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        training = compose("train", overrides=["callbacks.metrics.feature_extractor=inception-v3-compat"])
    scoring = eval_cfg("task=fid", "metrics.feature_extractor=inception-v3-compat").metrics
    assert {k: training.callbacks.metrics[k] for k in scoring} == scoring


# --- the user's paths ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    """CT, tiny, with the metrics callback forced (every 2 steps, and at the end after
    step 5) and W&B + CSV."""
    out = tmp_path_factory.mktemp("ct_metrics")
    run_script(
        "train.py",
        "experiment=digits_ct",
        *TINY,
        "trainer.max_steps=5",
        "callbacks.metrics.every_n_steps=2",
        "callbacks.metrics.num=20",
        "callbacks.metrics.batch_size=8",
        f"callbacks.metrics.cache_dir={out / 'cache'}",
        "logger.wandb.log_model=true",
        f"hydra.run.dir={out}",
    )
    return out


def test_default_run_logs_fid_and_is_to_csv_and_wandb(ct_run):
    rows = [r for r in csv.DictReader(open(ct_run / "csv/metrics.csv")) if r.get("metrics/fid_1step")]
    assert [int(r["step"]) for r in rows] == [2, 4, 5]
    for r in rows:
        for key in ("metrics/fid_1step", "metrics/fid_2step", "metrics/is_1step", "metrics/is_2step"):
            assert float(r[key]) > 0, key
    hparams = (ct_run / "csv/hparams.yaml").read_text()  # the resolved run config
    assert "run_name: digits_ct" in hparams and "CTPairRule" in hparams
    (run,) = (ct_run / "wandb").glob("offline-run-*")
    record = next(run.glob("run-*.wandb")).read_bytes()
    for needle in (b"metrics/fid_1step", b"metrics/is_2step", b"CTPairRule", b"last.ckpt"):
        assert needle in record, needle  # metrics, the resolved config, the checkpoint artifact
    tables = [json.loads(p.read_text()) for p in (run / "files/media/table/metrics").glob("fid_vs_nfe_*.json")]
    table = max(tables, key=lambda t: len(t["data"]))  # the table grows with every measurement
    assert table["columns"][:4] == ["step", "sampling", "nfe", "fid"]
    assert [row[:3] for row in table["data"]] == [[s, f"{k}step", k] for s in (2, 4, 5) for k in (1, 2)]


def test_inception_fid_of_callback_and_evaluate_equal_torch_fidelity(tmp_path):
    weights = make_inception_weights(tmp_path / "inception.pth")
    real = digits_uint8()[:6]  # Inception runs at 299x299 whatever the input: a few images keep this fast
    ref = write_npz(tmp_path / "ref.npz", real)
    common = [
        f"feature_extractor={INCEPTION}",
        f"feature_extractor_weights_path={weights}",
        f"reference={ref}",
        f"cache_dir={tmp_path / 'cache'}",
        "isc=false",
    ]
    # On the CPU, like the direct call: a GPU's TF32 convolutions would differ in the fourth digit.
    run_script(
        "train.py",
        "experiment=digits_ct",
        *TINY,
        "trainer.accelerator=cpu",
        "logger=csv",
        "callbacks.metrics.every_n_steps=null",
        "callbacks.metrics.at_end=true",
        "callbacks.metrics.num=6",
        "callbacks.metrics.steps=[1]",
        "callbacks.metrics.batch_size=4",
        *[f"callbacks.metrics.{o}" for o in common],
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    run_script(
        "evaluate.py",
        "task=fid",
        f"ckpt={ckpt}",
        "num=6",
        "steps=[1]",
        "batch_size=4",
        "device=cpu",
        *[f"metrics.{o}" for o in common],
        f"hydra.run.dir={tmp_path / 'eval'}",
    )

    generated = sample_shard(sampler_from_checkpoint(ckpt), 6, 4, 0, "cpu", steps=1)
    expected = direct(generated.expand(-1, 3, -1, -1), real.expand(-1, 3, -1, -1), INCEPTION, weights, fid=True)
    expected = expected["frechet_inception_distance"]
    assert expected > 1e-3  # well-scaled features: not the degenerate 0 of PyTorch's default init
    (row,) = [r for r in csv.DictReader(open(tmp_path / "run/csv/metrics.csv")) if r.get("metrics/fid_1step")]
    results = json.loads((tmp_path / "eval/metrics.json").read_text())["results"]["1step"]
    assert float(row["metrics/fid_1step"]) == pytest.approx(expected, rel=1e-4)
    assert results["fid"] == pytest.approx(expected, rel=1e-4) and results["nfe"] == 1


def test_search_midpoint_and_fid_into_wandb(ct_run, tmp_path):
    ckpt = ct_run / "checkpoints/last.ckpt"
    cache = f"metrics.cache_dir={ct_run / 'cache'}"
    run_script(
        "evaluate.py",
        "task=search_midpoint",
        f"ckpt={ckpt}",
        "num=12",
        "ts_num_scales=8",
        "search_budget=60",
        cache,
        "wandb.id=search0",
        f"hydra.run.dir={tmp_path}",
    )
    found = json.loads((tmp_path / "search_midpoint.json").read_text())
    fids = {c["ts"][1]: c["fid"] for c in found["candidates"]}
    assert len(fids) <= 5 and found["samples_used"] == 12 * len(fids) and set(fids) <= set(range(1, 7))
    assert found["best"]["fid"] == min(fids.values()) and found["best"]["ts"] == [0, found["best"]["ts"][1], 7]
    assert list((tmp_path / "wandb").glob("offline-run-*-search0"))


# --- bad input: one message, before any sampling ------------------------------------------------------------
@pytest.fixture()
def no_sampling(monkeypatch):
    monkeypatch.setattr(common, "launch", mock.Mock(side_effect=AssertionError("sampling started")))


def test_weights_path_that_does_not_exist(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="feature_extractor_weights_path=/no/such.pth does not exist"):
        Fidelity(INCEPTION, "/no/such.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    with pytest.raises(ConfigError, match=f"not found at {tmp_path}/hub/checkpoints/weights-inception.*Download"):
        resolve_weights(INCEPTION, None)


def test_fewer_samples_than_the_kid_subset(edm_run, no_sampling):
    with pytest.raises(ConfigError, match="num=50 is smaller than kid_subset_size=1000"):
        evaluate(
            eval_cfg(
                "task=fid", f"ckpt={edm_run / 'checkpoints/last.ckpt'}", "num=50", "metrics.kid=true", "out_dir=unused"
            )
        )
    with pytest.raises(ConfigError, match="callbacks.metrics.num=50 is smaller than kid_subset_size=100"):
        Metrics(num=50, kid=True, kid_subset_size=100)


def test_checkpoint_for_another_image_size_than_the_reference(edm_run, tmp_path, no_sampling):
    ref = write_npz(tmp_path / "ref32.npz", torch.zeros(20, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ConfigError, match=r"makes 16x16 images .* reference statistics .* of 32x32 images"):
        evaluate(
            eval_cfg(
                "task=fid",
                f"ckpt={edm_run / 'checkpoints/last.ckpt'}",
                "num=20",
                f"metrics.reference={ref}",
                "out_dir=unused",
            )
        )


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros((20, 16, 16, 1), np.float32), "arr_0 has dtype float32; expected uint8"),
        (np.zeros((20, 1, 16, 16), np.uint8), r"arr_0 has shape \(20, 1, 16, 16\); expected N x H x W x C"),
        (np.zeros((16, 16), np.uint8), r"arr_0 has shape \(16, 16\)"),
    ],
)
def test_reference_npz_with_the_wrong_dtype_or_shape(edm_run, tmp_path, no_sampling, array, message):
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(ConfigError, match=message):
        evaluate(
            eval_cfg(
                "task=fid",
                f"ckpt={edm_run / 'checkpoints/last.ckpt'}",
                "num=20",
                f"metrics.reference={tmp_path / 'bad.npz'}",
                "out_dir=unused",
            )
        )


def test_reference_that_is_not_an_npz_archive(tmp_path):
    with pytest.raises(ConfigError, match="reference=/no/such.npz does not exist"):
        ReferenceSource.from_npz("/no/such.npz")
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, np.zeros((20, 16, 16, 1), np.uint8))
    with pytest.raises(ConfigError, match="holds a single array, not an .npz archive"):
        ReferenceSource.from_npz(tmp_path / "single.npz")
    np.savez(tmp_path / "other.npz", images=np.zeros((20, 16, 16, 1), np.uint8))
    with pytest.raises(ConfigError, match=r"has no 'arr_0' array \(it holds \['images'\]\)"):
        ReferenceSource.from_npz(tmp_path / "other.npz")


def test_bad_input_is_one_line_from_the_command_line(edm_run, tmp_path):
    proc = run_script(
        "evaluate.py",
        "task=fid",
        f"ckpt={edm_run / 'checkpoints/last.ckpt'}",
        "metrics.feature_extractor_weights_path=/no/such.pth",
        f"hydra.run.dir={tmp_path}",
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: feature_extractor_weights_path=/no/such.pth does not exist" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()
