"""What a parameterisation is: how noise is added to an image and how a backbone F becomes a denoised image or a
consistency output. Samplers, editing, metrics and evaluate.py talk to this interface, never to a method:

    __call__(net, x, t, labels)  the denoiser D(x_t, t) or the consistency function f(x_t, t)
    few_step                     True: a consistency function (CM Algorithm 1); False: a denoiser (ODE sampler)
    add_noise(x0, z, t)          x_t from a clean image and standard normal noise z
    renoise(x, t, z)             a clean estimate taken back to level t (the re-noising of CM Algorithm 1)
    levels(steps)                the default noise levels of a ``steps``-step sampler, decreasing
    from_sigma(sigma)            the level whose noise equals EDM's sigma (user-given sigmas, the ts grids)
    from_edm(x_sigma, t)         an image x0 + sigma z in EDM's scaling, as this parameterisation's x_t
    t_min, t_max                 the range of levels the model is defined on

Each is a frozen dataclass stored in checkpoints by ``name`` with its fields (``to_meta``) and rebuilt by
``checkpoint.from_meta``. The classes: ``precond.Precond`` (EDM and the CM boundary, in sigma),
``trigflow.TrigFlow`` (sCM, in t) and ``meanflow_param.MeanFlowParam`` (MeanFlow, in t).
"""

import abc
from dataclasses import asdict

import torch
from torch import nn

from cm_lightning.errors import ConfigError
from cm_lightning.inputs import real


def c_noise(sigma: torch.Tensor, kind: str = "adm") -> torch.Tensor:
    """Noise conditioning fed to the backbone (the network never sees raw sigma)."""
    if kind == "adm":
        return 1000 * 0.25 * torch.log(sigma + 1e-44)
    if kind == "edm":
        return 0.25 * torch.log(sigma)
    raise ConfigError(f"noise_kind={kind!r} is unknown; use 'adm' or 'edm'")


def working(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs (the preconditioning's arithmetic stays in fp32 under autocast), float64 kept."""
    return x if x.dtype == torch.float64 else x.to(torch.float32)


def check_fields(p) -> None:
    """The grid (and sigma_data, time_scale where there is one) as finite numbers in range, named as the config
    names them, so that a bad one stops here rather than as NaNs or as a complaint about another field."""
    key = "model.objective.parameterisation"
    for field in ("sigma_data", "time_scale", "rho"):
        if hasattr(p, field):
            real(getattr(p, field), f"{key}.{field}", example=str(getattr(type(p), field)), above=0)
    real(p.sigma_min, f"{key}.sigma_min", example="0.002", above=0)
    real(p.sigma_max, f"{key}.sigma_max", example="80.0", above=0)
    if not p.sigma_min < p.sigma_max:
        raise ConfigError(
            f"{key}.sigma_min={p.sigma_min} must be below {key}.sigma_max={p.sigma_max} (published: 0.002 and 80)"
        )


class Parameterisation(abc.ABC):
    """The interface above, with the pieces every parameterisation shares: the Karras grid of its fields
    ``sigma_min``, ``sigma_max``, ``rho``; the step-count guard of ``levels``; re-noising as noising afresh;
    the checkpoint record."""

    name: str
    few_step: bool

    @abc.abstractmethod
    def __call__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor: ...

    @abc.abstractmethod
    def add_noise(self, x0: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor: ...

    @abc.abstractmethod
    def level_plan(self, steps: int) -> list[float]:
        """``levels`` for a valid step count."""

    @abc.abstractmethod
    def from_sigma(self, sigma: float) -> float: ...

    @abc.abstractmethod
    def from_edm(self, x_sigma: torch.Tensor, t) -> torch.Tensor: ...

    @property
    @abc.abstractmethod
    def t_max(self) -> float: ...

    @property
    def grid(self) -> dict:
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)

    def renoise(self, x: torch.Tensor, t, z: torch.Tensor) -> torch.Tensor:
        return self.add_noise(x, z, t)

    def levels(self, steps: int) -> list[float]:
        if steps < 1:
            raise ConfigError(f"steps={steps}: sampling needs at least one step")
        return self.level_plan(steps)

    def to_meta(self) -> dict:
        return {"name": self.name, **asdict(self)}
