"""Speed options: precision, channels-last memory format, torch.compile and fused optimisers.

Each is one config value (``model.speed.*``, ``trainer.precision``, ``speed.*`` in conf/evaluate/device.yaml). ``auto``
turns an option on where it pays, a CUDA device, and off on the CPU, where the tests and the default run use
fp32 and eager kernels. None of them changes the model: the loss with and without them agrees to the
tolerance of the precision (tests/test_speed.py).
"""

import contextlib
import inspect
from dataclasses import dataclass, replace

import torch
from torch import nn

from cm_lightning.errors import ConfigError

AMP_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "32-true": None,
    "64-true": None,
}


def auto_precision(accelerator="auto") -> str:
    """The precision ``auto`` means on ``accelerator`` (Lightning's name or a device: auto, gpu, cuda, cpu):
    bf16 autocast where it runs on a GPU that has bf16 (Ampere and newer), else fp32."""
    on_gpu = str(accelerator).split(":")[0] in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def amp_dtype(precision) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision string (None: full fp32)."""
    key = str(precision)
    if key not in AMP_DTYPES:
        raise ConfigError(f"precision={key!r} is not supported here; use one of {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[key]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _flag(name: str, value) -> bool | str:
    if value in (True, False, "auto"):
        return value
    raise ConfigError(f"{name}={value!r} must be true, false or auto")


@dataclass
class Speed:
    """channels_last: convolution weights (and so activations) in NHWC, which tensor cores prefer.
    compile: ``torch.compile`` every network in place (state-dict keys stay as they are), in ``compile_mode``.
    sample_compile_mode: the mode for sampling; ``reduce-overhead`` replays CUDA graphs, which pays there
    because sampling runs the same shapes again and again without autograd.
    fused_optimizer: the optimiser's fused CUDA kernel where it has one (Adam, AdamW), else its foreach
    kernel (RAdam has no fused kernel in torch 2.14).
    frozen_dtype: the dtype of the frozen teacher's weights: auto stores them in the autocast dtype, which
    halves their memory and removes a cast per call; ``float32`` keeps them as trained."""

    channels_last: bool | str = "auto"
    compile: bool | str = "auto"
    compile_mode: str | None = None
    sample_compile_mode: str | None = "reduce-overhead"
    fused_optimizer: bool | str = "auto"
    frozen_dtype: str = "auto"

    def __post_init__(self):
        for name in ("channels_last", "compile", "fused_optimizer"):
            _flag(f"speed.{name}", getattr(self, name))
        if self.frozen_dtype not in ("auto", "float32"):
            raise ConfigError(f"speed.frozen_dtype={self.frozen_dtype!r} must be auto or float32")

    def resolved(self, device: torch.device) -> "Speed":
        """``auto`` replaced by on (CUDA) or off (any other device)."""
        on = torch.device(device).type == "cuda"
        pick = lambda v: on if v == "auto" else v  # noqa: E731
        return replace(
            self,
            channels_last=pick(self.channels_last),
            compile=pick(self.compile),
            fused_optimizer=pick(self.fused_optimizer),
        )

    def prepare(self, net: nn.Module, mode: str | None = None) -> nn.Module:
        """Applies the memory format and compilation to ``net`` in place (call ``resolved`` first)."""
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        if self.compile:
            if any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules()):
                # Inductor's own dropout RNG ignores torch.manual_seed, and the student and the target must
                # draw the same masks (seeded before each forward): eager-equivalent randomness keeps that.
                torch._inductor.config.fallback_random = True
            net.compile(mode=mode or self.compile_mode)
        return net

    def optimizer(self, factory, params, device: torch.device):
        """The optimiser from its partial, with the fused (else foreach) kernel on CUDA when enabled."""
        func = getattr(factory, "func", factory)
        accepted = inspect.signature(func).parameters
        extra = {}
        if self.fused_optimizer and torch.device(device).type == "cuda":
            extra = {"fused": True} if "fused" in accepted else {"foreach": True} if "foreach" in accepted else {}
        return factory(params=params, **extra)

    def frozen(self, net: nn.Module, precision) -> nn.Module:
        """A frozen network (the teacher) in the autocast dtype unless ``frozen_dtype`` says float32."""
        dtype = amp_dtype(precision)
        if self.frozen_dtype == "auto" and dtype is not None:
            net.to(dtype)
        return net
