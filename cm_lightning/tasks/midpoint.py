"""``task=search_midpoint``: the two-step plan ts=(0, p, ts_num_scales - 1) with the lowest FID, by the authors'
ternary search over p (``metrics/midpoint_search.py``), ``num`` samples per candidate."""

from pathlib import Path

from omegaconf import DictConfig

from cm_lightning.diffusion.sampling import sigmas_from_indices
from cm_lightning.errors import ConfigError
from cm_lightning.metrics.midpoint_search import ternary_search
from cm_lightning.metrics.sharding import share
from cm_lightning.tasks.common import Scorer


def search_midpoint_task(cfg: DictConfig) -> list[Path]:
    last = cfg.ts_num_scales - 1
    if last < 2:
        raise ConfigError(f"ts_num_scales={cfg.ts_num_scales} leaves no midpoint; the authors search a grid of 40")
    max_evals = None if cfg.search_budget is None else cfg.search_budget // cfg.num
    if max_evals is not None and max_evals < 1:
        raise ConfigError(
            f"search_budget={cfg.search_budget} is less than num={cfg.num}, the samples of one "
            "candidate; raise search_budget or lower num"
        )
    if not cfg.metrics.fid:
        raise ConfigError("task=search_midpoint ranks candidates by FID; set metrics.fid=true")
    scorer = Scorer(cfg)
    if not scorer.sampler.parameterisation.few_step:
        raise ConfigError(f"ckpt={cfg.ckpt} is an EDM model; the midpoint search is for consistency models")
    scorer.start()
    candidates = {}

    def fid(p: int) -> float:
        sigmas = sigmas_from_indices([0, p, last], cfg.ts_num_scales, **scorer.sampler.parameterisation.grid)
        result = scorer.score(scorer.sampler.at_sigmas(sigmas))
        if result is not None:
            candidates[p] = {"ts": [0, p, last], "sigmas": sigmas, **result}
        return share(None if result is None else result["fid"])

    best, _ = ternary_search(fid, 1, last - 1, max_evals)
    if not scorer.fabric.is_global_zero:
        return []
    rows = [candidates[p] for p in sorted(candidates)]
    logger = scorer.wandb()
    if logger is not None:
        columns = [k for k in rows[0] if k not in ("ts", "sigmas")]
        logger.log_table(
            "search/fid_vs_midpoint",
            ["midpoint", "sigma", *columns],
            [[r["ts"][1], r["sigmas"][1], *(r[c] for c in columns)] for r in rows],
        )
        logger.log_metrics({"search/best_midpoint": best, "search/best_fid": candidates[best]["fid"]})
    payload = {"best": candidates[best], "samples_used": cfg.num * len(rows), "candidates": rows}
    return [scorer.report("search_midpoint", payload)]
