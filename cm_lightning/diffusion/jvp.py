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
        raise ConfigError(f"the network uses {op}, which has no forward-mode AD, so the JVP of this objective "
                          "cannot run; use a net whose layers all support it (net=adm_*) with model.speed.compile=false"
                          ) from None


def eager(net: torch.nn.Module):
    """The network's forward without ``torch.compile``'s wrapper (``Module.compile`` compiles ``__call__``):
    compiled graphs do not take forward-mode tangents."""
    return net.forward
