"""Forward-mode derivatives of a network without an autograd graph (sCM's dF/dt, MeanFlow's du/dt).

``torch.func.jvp`` pushes a tangent through the network in one extra forward pass. Under ``no_grad`` no
graph is kept for the weights, so the result is a constant of the loss (the stop-gradient the methods ask
for) and costs no backward memory; the gradient then comes from a separate ordinary forward of the student.
PyTorch's flash and memory-efficient attention kernels (and the CPU's fused one) have no forward-mode AD, so
attention runs through the math kernel inside the JVP.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cm_lightning.errors import ConfigError


def jvp(fn, primals: tuple, tangents: tuple):
    """(fn(*primals), the directional derivative of fn at primals along tangents), both without a graph."""
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, primals, tangents)
    except NotImplementedError as e:
        op = str(e).split(" that does not support it")[0].replace("Trying to use forward AD with ", "")
        raise ConfigError(
            f"the network uses {op}, which has no forward-mode AD, so the JVP of this objective "
            "cannot run; use a net whose layers all support it (net=adm_*) with model.speed.compile=false"
        ) from None


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
