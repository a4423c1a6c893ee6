"""Forward-mode derivatives of a network without an autograd graph (sCM's dF/dt, MeanFlow's du/dt).

``torch.func.jvp`` pushes a tangent through the network in one extra forward pass. Under ``no_grad`` no
graph is kept for the weights, so the result is a constant of the loss (the stop-gradient the methods ask
for) and costs no backward memory; the gradient then comes from a separate ordinary forward of the student.
PyTorch's flash and memory-efficient attention kernels (and the CPU's fused one) have no forward-mode AD, so
attention runs through the math kernel inside the JVP, whose attention matrix is O(N^2) in the tokens.

``mode="finite_difference"`` (FastGen's ``use_jvp_finite_diff``) takes the central difference
(f(x + h v) - f(x - h v)) / 2h instead: two ordinary forwards, so any kernel works (flash attention, fused or
compiled layers) at the memory of a forward. Its error is O(h^2) truncation plus O(eps / h) rounding; h = 5e-3,
about the cube root of fp32's epsilon, balances the two. Autocast is off inside it, because at bf16 precision
(1e-2 relative) a difference over 2h = 1e-2 would be noise.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm_lightning.errors import ConfigError

JVP_MODES = ("autograd", "finite_difference")
FD_STEP = 5e-3


def check_mode(mode: str, step: float = FD_STEP) -> None:
    if mode not in JVP_MODES:
        raise ConfigError(f"model.objective.jvp={mode!r} is unknown; use one of {', '.join(JVP_MODES)}")
    if not step > 0:
        raise ConfigError(f"model.objective.jvp_step={step} must be positive (default {FD_STEP})")


def jvp(fn, primals: tuple, tangents: tuple, mode: str = "autograd", step: float = FD_STEP):
    """(fn(*primals), the directional derivative of fn at primals along tangents), both without a graph."""
    if mode == "finite_difference":
        return finite_difference_jvp(fn, primals, tangents, step)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, primals, tangents)
    except NotImplementedError as e:
        op = str(e).split(" that does not support it")[0].replace("Trying to use forward AD with ", "")
        raise ConfigError(
            f"the network uses {op}, which has no forward-mode AD, so the JVP of this objective "
            "cannot run; set model.objective.jvp=finite_difference (or use a net whose layers all support it, "
            "with model.speed.compile=false)"
        ) from None


def finite_difference_jvp(fn, primals: tuple, tangents: tuple, step: float = FD_STEP):
    """(fn(*primals), (fn(primals + h tangents) - fn(primals - h tangents)) / 2h), without a graph. Each of the
    three evaluations starts from the same random state, so dropout draws the same masks in all of them (as in
    the one pass of the forward-mode JVP) and the caller's random stream moves on as after one evaluation."""
    device = primals[0].device
    state = torch.random.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def at(h: float):
        torch.random.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        return fn(*(p + h * v if h else p for p, v in zip(primals, tangents)))

    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        plus, minus, out = at(step), at(-step), at(0.0)
    return out, (plus - minus) / (2 * step)


def eager(net: torch.nn.Module):
    """The network's forward without ``torch.compile``'s wrapper (``Module.compile`` compiles ``__call__``):
    compiled graphs do not take forward-mode tangents."""
    return net.forward


def probe(net: torch.nn.Module, fn) -> None:
    """Calls ``fn(eager_net, x, labels, t)`` once, in eval mode, on a single zero image (with class 0 for a
    conditional net) at t = 1: an objective's ``check`` runs its JVP there, so that a layer without forward-mode
    AD stops when the run is built rather than at its first step."""
    x = torch.zeros(1, net.in_channels, net.image_size, net.image_size, device=next(net.parameters()).device)
    labels = torch.zeros(1, dtype=torch.long, device=x.device) if getattr(net, "num_classes", 0) else None
    was_training = net.training
    net.eval()
    try:
        fn(eager(net), x, labels, torch.ones(1, device=x.device))
    finally:
        net.train(was_training)
