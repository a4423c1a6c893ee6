"""Parameterisations: how noise is added to an image and how a backbone F becomes a denoised image or a
consistency output. Samplers, editing, metrics and evaluate.py talk to this interface, never to a method:

    __call__(net, x, t, labels)  the denoiser D(x_t, t) or the consistency function f(x_t, t)
    few_step                     True: a consistency function (CM Algorithm 1); False: a denoiser (ODE sampler)
    add_noise(x0, z, t)          x_t from a clean image and standard normal noise z
    renoise(x, t, z)             a clean estimate taken back to level t (the re-noising of CM Algorithm 1)
    levels(steps)                the default noise levels of a ``steps``-step sampler, decreasing
    from_sigma(sigma)            the level whose noise equals EDM's sigma (user-given sigmas, the ts grids)
    from_edm(x_sigma, t)         an image x0 + sigma z in EDM's scaling, as this parameterisation's x_t
    t_min, t_max                 the range of levels the model is defined on

Each is stored in checkpoints by ``name`` with its fields (``to_meta``) and rebuilt by ``from_meta``.
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from cm_lightning.diffusion.karras import karras_sigmas
from cm_lightning.diffusion.shapes import per_sample
from cm_lightning.errors import ConfigError
from cm_lightning.inputs import real


def c_noise(sigma: torch.Tensor, kind: str = "adm") -> torch.Tensor:
    """Noise conditioning fed to the backbone (the network never sees raw sigma)."""
    if kind == "adm":
        return 1000 * 0.25 * torch.log(sigma + 1e-44)
    if kind == "edm":
        return 0.25 * torch.log(sigma)
    raise ConfigError(f"noise_kind={kind!r} is unknown; use 'adm' or 'edm'")


def scalings(sigma: torch.Tensor, sigma_data: float, eps: float):
    """(c_skip, c_out, c_in) of the boundary-respecting parameterisation; eps = 0 gives EDM's."""
    c_skip = sigma_data**2 / ((sigma - eps) ** 2 + sigma_data**2)
    c_out = (sigma - eps) * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def _working(x: torch.Tensor) -> torch.Tensor:
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


@dataclass(frozen=True)
class Precond:
    """EDM's preconditioning and the CM consistency function (CM paper, Appendix C; EDM, Table 1 with eps = 0):

        out(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
        c_skip = sigma_data^2 / ((sigma - eps)^2 + sigma_data^2)
        c_out = (sigma - eps) sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in = 1 / sqrt(sigma^2 + sigma_data^2),  c_noise = 1000 * 0.25 ln(sigma + 1e-44) (adm) | 0.25 ln(sigma) (edm)

    With eps = sigma_min, f(x, sigma_min) = x exactly (c_skip = 1, c_out = 0): a consistency function. With
    eps = 0 it is the EDM denoiser D(x, sigma). x_sigma = x0 + sigma z; sigma_min, sigma_max and rho span the
    Karras grids of the samplers.
    """

    name = "karras"
    sigma_data: float = 0.5
    eps: float = 0.002
    noise_kind: str = "adm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        check_fields(self)

    def __call__(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        sigma = sigma.to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in = scalings(sigma, self.sigma_data, self.eps)
        x = x.to(torch.float32)
        F = net(c_in * x, c_noise(sigma.flatten(), self.noise_kind), labels)
        return c_skip * x + c_out * F.to(torch.float32)

    @property
    def few_step(self) -> bool:
        return self.eps > 0

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    @property
    def grid(self) -> dict:
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)

    def add_noise(self, x0, z, t):
        return x0 + per_sample(t, x0) * z

    def renoise(self, x, t, z):
        """CM Algorithm 1: x + sqrt(t^2 - eps^2) z."""
        t = per_sample(t, x)
        return x + (t**2 - self.sigma_min**2) ** 0.5 * z

    def levels(self, steps: int) -> list[float]:
        """The first ``steps`` levels of a descending Karras grid of steps + 1 points (1 step: [sigma_max])."""
        if steps < 1:
            raise ConfigError(f"steps={steps}: sampling needs at least one step")
        return karras_sigmas(steps + 1, **self.grid).flip(0)[:steps].tolist()

    def from_sigma(self, sigma: float) -> float:
        return float(sigma)

    def from_edm(self, x_sigma, t):
        return x_sigma

    def to_meta(self) -> dict:
        return {"name": self.name, **asdict(self)}


def edm_denoiser(sigma_data: float = 0.5, noise_kind: str = "adm", **grid) -> Precond:
    """D_phi(x, sigma) of EDM: the consistency parameterisation with eps = 0."""
    return Precond(sigma_data=sigma_data, eps=0.0, noise_kind=noise_kind, **grid)


def consistency_function(sigma_data: float = 0.5, sigma_min: float = 0.002, noise_kind: str = "adm", **grid) -> Precond:
    """f_theta(x, sigma) of the CM paper, with f(x, sigma_min) = x by construction."""
    return Precond(sigma_data=sigma_data, eps=sigma_min, noise_kind=noise_kind, sigma_min=sigma_min, **grid)


@dataclass(frozen=True)
class TrigFlow:
    """TrigFlow (sCM, Lu & Song 2025, Section 3 and eq. 8): x_t = cos(t) x0 + sin(t) z with z ~ N(0, sigma_d^2 I),
    t in [0, pi/2], and

        f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t))

    so f(x, 0) = x exactly. The same formula is TrigFlow's denoiser, and sigma_d F is the PF-ODE velocity
    dx_t/dt. EDM's sigma corresponds to t = arctan(sigma / sigma_d), and x_t = cos(t) (x0 + sigma eps).
    Sampling starts at t_max = arctan(sigma_max / sigma_d); two steps go through ``t_mid`` (1.1, Section 5).
    ``diffusion``: the model is a TrigFlow diffusion model (sCM's pretraining), seen by samplers and distillation
    as an EDM denoiser: D(x_sigma, sigma) = f(cos(t) x_sigma, t) at t = arctan(sigma / sigma_d), since
    x_t = cos(t) x_sigma; it is then sampled with the ODE solver, not one-step.

    ``noise_kind``: ``t`` feeds c_noise(t) = time_scale * t (sCM's identity time transformation). ``adm`` or
    ``edm`` feed EDM's c_noise(sigma_d tan t) of that kind and negate the output: then F is exactly an EDM
    network's backbone (EDM's c_in x_sigma equals x_t / sigma_d, c_skip = cos^2 t and c_out = sigma_d sin t), so
    a student initialised from an EDM teacher starts as that teacher (sCD).
    """

    name = "trigflow"
    sigma_data: float = 0.5
    sigma_max: float = 80.0
    t_mid: float = 1.1
    noise_kind: str = "t"
    time_scale: float = 1.0
    sigma_min: float = 0.002  # the Karras grids of ts= indices and of k > 2 steps start here
    rho: float = 7.0
    diffusion: bool = False

    @property
    def few_step(self) -> bool:
        return not self.diffusion

    def __post_init__(self):
        check_fields(self)
        if self.noise_kind not in ("t", "adm", "edm"):
            raise ConfigError(
                f"noise_kind={self.noise_kind!r} is unknown for TrigFlow; use t (sCM), adm or edm "
                "(an EDM network's conditioning)"
            )
        if not 0 < self.t_mid < self.t_max:
            raise ConfigError(
                f"t_mid={self.t_mid} is outside (0, t_max={self.t_max:.4f}); the published two-step midpoint is 1.1"
            )

    def F(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """The backbone's output F(x_t / sigma_d, c_noise(t)) in fp32; sigma_d F is the velocity dx_t/dt."""
        x = _working(x)
        t = t.to(x.dtype).flatten()
        if self.noise_kind == "t":
            return net(x / self.sigma_data, self.time_scale * t, labels).to(x.dtype)
        return -net(x / self.sigma_data, c_noise(self.sigma_data * torch.tan(t), self.noise_kind), labels).to(x.dtype)

    def __call__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """f(x_t, t); with ``diffusion``, EDM's D(x_sigma, sigma) (the class docstring)."""
        if self.diffusion:
            sigma = torch.as_tensor(t, device=x.device).to(_working(x).dtype).flatten().expand(x.shape[0])
            t = torch.atan(sigma / self.sigma_data)
            x = per_sample(torch.cos(t), x) * _working(x)
        F = self.F(net, x, t, labels)
        x = _working(x)
        t = per_sample(t.flatten(), x)
        return torch.cos(t) * x - torch.sin(t) * self.sigma_data * F

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return math.atan(self.sigma_max / self.sigma_data)

    @property
    def grid(self) -> dict:
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)

    def add_noise(self, x0, z, t):
        t = torch.as_tensor(per_sample(t, x0), device=x0.device)
        return torch.cos(t) * x0 + torch.sin(t) * self.sigma_data * z

    def renoise(self, x, t, z):
        return self.add_noise(x, z, t)

    def levels(self, steps: int) -> list[float]:
        """1 step: [t_max]; 2 steps: [t_max, t_mid] (sCM); more: the Karras grid's levels as times."""
        if steps < 1:
            raise ConfigError(f"steps={steps}: sampling needs at least one step")
        if steps == 2:
            return [self.t_max, self.t_mid]
        return [self.from_sigma(s) for s in karras_sigmas(steps + 1, **self.grid).flip(0)[:steps].tolist()]

    def from_sigma(self, sigma: float) -> float:
        return math.atan(float(sigma) / self.sigma_data)

    def from_edm(self, x_sigma, t):
        return torch.cos(torch.as_tensor(per_sample(t, x_sigma), device=x_sigma.device)) * x_sigma

    def to_meta(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class MeanFlowParam:
    """MeanFlow (Geng et al. 2025, Sections 3-4): z_t = (1 - t) x + t e, e ~ N(0, I), t in [0, 1], and a network
    u(z_t, r, t) of the average velocity over [r, t], fed the two times (t, t - r) scaled by ``time_scale``
    (the official code feeds them as they are). The clean-image estimate is the jump to r = 0 of the paper's
    one-step sampler, z_r = z_t - (t - r) u(z_t, r, t) at r = 0:

        f(z_t, t) = z_t - t u(z_t, 0, t)

    so f(z, 0) = z, and one step from t = 1 is x = z_1 - u(z_1, 0, 1). EDM's x0 + sigma e is z_t / (1 - t) at
    t = sigma / (1 + sigma). ``chain``: how more steps go, ``flow_map`` (MeanFlow's jumps z_r = z_t - (t - r)
    u(z_t, r, t), ``jump``; the default) or ``renoise`` (f's estimate re-noised to the next level, CM Algorithm 1).
    """

    name = "meanflow"
    time_scale: float = 1.0
    sigma_min: float = 0.002  # the Karras grids behind ts= indices and the published editing sigmas
    sigma_max: float = 80.0
    rho: float = 7.0
    chain: str = "flow_map"
    few_step = True

    def __post_init__(self):
        check_fields(self)

    def u(self, net: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """The average velocity u(z_t, r, t) in fp32 (float64 kept): the net sees (t, t - r) as in the paper."""
        z = _working(z)
        t, r = t.to(z.dtype).flatten(), r.to(z.dtype).flatten()
        return net(z, self.time_scale * torch.stack([t, t - r], dim=1), labels).to(z.dtype)

    def jump(self, net: nn.Module, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        """MeanFlow's flow map z_r = z_t - (t - r) u(z_t, r, t) (eq. 4)."""
        r, t = r.flatten(), t.flatten()
        u = self.u(net, z, r, t, labels)
        return _working(z) - per_sample(t.to(u.dtype) - r.to(u.dtype), u) * u

    def __call__(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        t = t.flatten()
        return self.jump(net, x, torch.zeros_like(t), t, labels)

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return 1.0

    @property
    def grid(self) -> dict:
        return dict(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho)

    def add_noise(self, x0, z, t):
        t = per_sample(t, x0)
        return (1 - t) * x0 + t * z

    def renoise(self, x, t, z):
        return self.add_noise(x, z, t)

    def levels(self, steps: int) -> list[float]:
        """Evenly spaced times 1, (k - 1) / k, ..., 1 / k: k equal intervals of [0, 1]."""
        if steps < 1:
            raise ConfigError(f"steps={steps}: sampling needs at least one step")
        return [(steps - i) / steps for i in range(steps)]

    def from_sigma(self, sigma: float) -> float:
        return float(sigma) / (1 + float(sigma))

    def from_edm(self, x_sigma, t):
        return (1 - per_sample(t, x_sigma)) * x_sigma

    def to_meta(self) -> dict:
        return {"name": self.name, **asdict(self)}


PARAMETERISATIONS = {cls.name: cls for cls in (Precond, TrigFlow, MeanFlowParam)}


def from_meta(meta: dict):
    """The parameterisation a checkpoint's metadata (in today's layout, ``checkpoint.upgrade``) names, with its
    stored fields."""
    fields = dict(meta["parameterisation"])
    name = fields.pop("name", None)
    if name not in PARAMETERISATIONS:
        raise ConfigError(f"the checkpoint's parameterisation {name!r} is unknown; known: {sorted(PARAMETERISATIONS)}")
    return PARAMETERISATIONS[name](**fields)
