"""Which of this project's networks holds one of NVlabs EDM's released backbones, and whether a configured
net is that one.

EDM's pickles (``edm-cifar10-32x32-*.pkl``, ``edm-ffhq-64x64-*.pkl``, ``edm-imagenet-64x64-cond-adm.pkl`` ...)
hold ``EDMPrecond`` whose ``model`` is a ``SongUNet`` (DDPM++, NCSN++) or a ``DhariwalUNet`` (ADM), recorded with
its constructor keywords. ``net_config`` gives the config of our ``NCSNpp`` or ``ADMUNet`` that computes the same
function from those keywords (``edm_layout.py`` moves the weights into it). ``EDMState`` carries it with the
converted weights, so that a net the user configured is checked against it before any weight is copied, and a
user who names no net gets it.
"""

from __future__ import annotations

import math

import torch
from hydra.utils import instantiate

from cm_lightning.errors import ConfigError

NCSNPP, ADM = "cm_lightning.nets.ncsnpp.NCSNpp", "cm_lightning.nets.adm.ADMUNet"

# The constructor defaults of EDM's two backbones (networks.py), for the keywords a pickle does not record.
SONG_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.10, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
)  # fmt: skip
DHARIWAL_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
    attn_resolutions=[32, 16, 8], dropout=0.10,
)  # fmt: skip

# EDM's published presets (train.py --arch, CIFAR-10 and ImageNet 64) and the conf/net config equal to each.
PRESETS = {
    "ddpmpp": ("ddpmpp_cifar10", "SongUNet", dict(img_resolution=32, model_channels=128, channel_mult=[2, 2, 2])),
    "ncsnpp": (
        "ncsnpp_cifar10",
        "SongUNet",
        dict(
            img_resolution=32,
            model_channels=128,
            channel_mult=[2, 2, 2],
            embedding_type="fourier",
            channel_mult_noise=2,
            encoder_type="residual",
            resample_filter=[1, 3, 3, 1],
        ),  # fmt: skip
    ),
    "adm": ("adm_imagenet64", "DhariwalUNet", dict(img_resolution=64, label_dim=1000)),
}


# The keywords read, by type: a pickle is untrusted data, so a value of another type stops in one line.
TYPES = dict(
    img_resolution=int, in_channels=int, out_channels=int, label_dim=int, augment_dim=int, model_channels=int,
    channel_mult_emb=int, num_blocks=int, channel_mult_noise=int, channel_mult=list, attn_resolutions=list,
    resample_filter=list, dropout=float, embedding_type=str, encoder_type=str, decoder_type=str,
)  # fmt: skip


def typed(value, kind) -> bool:
    if kind is list:
        return isinstance(value, list | tuple) and all(typed(v, int) or typed(v, float) for v in value)
    return isinstance(value, kind) and not isinstance(value, bool) or (kind is float and typed(value, int))


def full_kwargs(class_name: str, kwargs: dict, source: str = "the file") -> dict:
    """EDM's keywords of a backbone that its structure depends on, its defaults filled in, channels given
    (EDMPrecond passes them)."""
    defaults = SONG_DEFAULTS if class_name == "SongUNet" else DHARIWAL_DEFAULTS
    kw = {"in_channels": 3, "out_channels": 3, **defaults, **kwargs}
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items() if k in TYPES}
    wrong = [f"{k}={v!r}" for k, v in kw.items() if not typed(v, TYPES[k])]
    if wrong:
        raise ConfigError(
            f"{source}: its {class_name} records {', '.join(wrong)}, not EDM's types; the file is damaged"
        )
    return kw


def song_config(kw: dict, source: str) -> dict:
    """Our NCSNpp config computing EDM's SongUNet with keywords ``kw``."""
    if kw["encoder_type"] not in ("standard", "residual") or kw["decoder_type"] != "standard":
        raise ConfigError(
            f"{source}: EDM's SongUNet with encoder_type={kw['encoder_type']}, decoder_type={kw['decoder_type']} "
            "is not among the nets here; the released DDPM++ (standard) and NCSN++ (residual) ones are"
        )
    positional = kw["embedding_type"] == "positional"
    return dict(
        _target_=NCSNPP, image_size=kw["img_resolution"], in_channels=kw["in_channels"],
        out_channels=kw["out_channels"], model_channels=kw["model_channels"], channel_mult=list(kw["channel_mult"]),
        num_res_blocks=kw["num_blocks"], attention_resolutions=list(kw["attn_resolutions"]), dropout=kw["dropout"],
        num_classes=kw["label_dim"], embedding=kw["embedding_type"], embedding_scale=1.0 if positional else 16.0,
        noise_channel_mult=kw["channel_mult_noise"], emb_channel_mult=kw["channel_mult_emb"],
        encoder=kw["encoder_type"], resample_filter=list(kw["resample_filter"]), num_times=1, noise_kind="edm",
        embedding_endpoint=positional, aux_conv_first=kw["encoder_type"] == "residual",
    )  # fmt: skip


def dhariwal_config(kw: dict, source: str) -> dict:
    """Our ADMUNet config computing EDM's DhariwalUNet with keywords ``kw``: its scale-shift residual blocks,
    resampling inside them, 64 channels per head, fed c_noise = ln(sigma) / 4."""
    widths = [kw["model_channels"] * m for m in kw["channel_mult"]]
    odd = [c for c in widths if min(32, c // 4) != math.gcd(32, c)]  # EDM's and ADM's group counts
    if kw["channel_mult_emb"] != 4 or odd:
        raise ConfigError(
            f"{source}: EDM's DhariwalUNet with channel_mult_emb={kw['channel_mult_emb']} and widths {widths} "
            "has no ADMUNet twin here (it needs channel_mult_emb 4 and widths that are multiples of 32, >= 128)"
        )
    return dict(
        _target_=ADM, image_size=kw["img_resolution"], in_channels=kw["in_channels"],
        out_channels=kw["out_channels"], model_channels=kw["model_channels"], channel_mult=list(kw["channel_mult"]),
        num_res_blocks=kw["num_blocks"], attention_resolutions=list(kw["attn_resolutions"]), num_head_channels=64,
        dropout=kw["dropout"], num_classes=kw["label_dim"], use_scale_shift_norm=True, resblock_updown=True,
        norm_groups=32, noise_kind="edm",
    )  # fmt: skip


def net_config(class_name: str, kwargs: dict, source: str) -> dict:
    """The config (``_target_`` and keywords) of our net that holds EDM's ``class_name`` backbone."""
    make = {"SongUNet": song_config, "DhariwalUNet": dhariwal_config}[class_name]
    return make(full_kwargs(class_name, kwargs, source), source)


def preset_name(class_name: str, kw: dict) -> str:
    if class_name == "DhariwalUNet":
        return "adm"
    return "ncsnpp" if kw.get("embedding_type") == "fourier" else "ddpmpp"


def hint(class_name: str, kwargs: dict, source: str) -> str:
    """``net=<config>`` plus the overrides that turn that config into the net of ``kwargs``."""
    base, _, preset = PRESETS[preset_name(class_name, kwargs)]
    mine, published = net_config(class_name, kwargs, source), net_config(class_name, preset, source)
    extra = [f"net.{k}={v}".replace(" ", "") for k, v in mine.items() if k != "dropout" and published[k] != v]
    return " ".join([f"net={base}", *extra])


# What a net computes beyond its weights' names and shapes: the module attributes its config sets.
STRUCTURE = (
    "image_size", "in_channels", "num_classes", "num_times", "null_class", "num_groups", "eps", "num_heads", "taps",
    "up", "down", "endpoint", "scale", "conv_first", "use_scale_shift_norm", "double_norm",
)  # fmt: skip


def signature(net: torch.nn.Module) -> tuple:
    """The net's class, its modules' structural attributes and its weights' shapes: nets of equal signatures
    compute the same function of the same weights (dropout rates and noise_kind left out: the file sets the one
    that matters, and dropout is off when a teacher or a sampler runs)."""
    modules = [
        (name, type(m).__name__, *(getattr(m, a) for a in STRUCTURE if hasattr(m, a)))
        for name, m in net.named_modules()
    ]
    return type(net).__name__, modules, [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


LABELS = {"ddpmpp": "DDPM++ U-Net (SongUNet)", "ncsnpp": "NCSN++ U-Net (SongUNet)", "adm": "ADM U-Net (DhariwalUNet)"}


class EDMState(dict):
    """The weights of an EDM backbone in our net's layout, with the config of that net (``net_config``)."""

    noise_kind = "edm"  # EDMPrecond feeds its backbone c_noise = ln(sigma) / 4

    def __init__(self, state: dict, class_name: str, kwargs: dict, source: str):
        super().__init__(state)
        self.class_name, self.kwargs = class_name, dict(kwargs)
        self.net_config = net_config(class_name, kwargs, source)
        self.label = LABELS[preset_name(class_name, kwargs)]

    def check(self, net: torch.nn.Module, source: str) -> None:
        """Stops in one line, naming the net= to use, unless ``net`` computes what the EDM backbone computed."""
        with torch.device("meta"):
            expected = instantiate(self.net_config)
        if signature(net) != signature(expected):
            how = "computes it differently" if type(net) is type(expected) else "is another family"
            raise ConfigError(
                f"{source} holds EDM's {self.label}; the configured net ({type(net).__name__}) {how}: use "
                f"{hint(self.class_name, self.kwargs, source)}"
            )
