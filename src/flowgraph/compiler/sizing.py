"""Parameter counts for the cost model: from config, or measured on the meta device.

``measure_params(module)`` runs the module's ``setup()`` under ``torch.device("meta")``:
tensors get shapes but no storage, so even a 70B model is sized in milliseconds with no
memory. The module is left exactly as it was.

Example::

    >>> from flowgraph import TorchModule
    >>> class Big(TorchModule):
    ...     def setup(self):
    ...         self.model = torch.nn.Linear(50_000, 50_000)
    >>> measure_params(Big("big"))
    2500050000
"""

from __future__ import annotations

import copy

import torch

from flowgraph.errors import PlanError


def meta_parameters(module: object, config: object = None) -> dict[str, torch.Tensor]:
    """``module.model``'s parameters as meta tensors (shape and dtype, no storage), from
    running ``setup()`` on the meta device; empty when setup builds no ``nn.Module``.
    ``config`` is the run's config that ``setup()`` reads (``models.<name>.args``) when the
    module has none yet, as under ``flowc compile``."""
    saved = copy.copy(vars(module))
    try:
        if config is not None and getattr(module, "config", None) is None:
            module.config = config
        with torch.device("meta"):
            module.setup()
        network = getattr(module, "model", None)
        if not isinstance(network, torch.nn.Module):
            return {}
        network = getattr(network, "module", network)
        return dict(network.named_parameters())
    except Exception as err:
        name = getattr(module, "name", type(module).__name__)
        raise PlanError(
            f"could not size model {name!r}: its setup() failed on the meta device "
            f"({type(err).__name__}: {err}); set models.{name}.params (e.g. 7B) in the config"
        ) from None
    finally:
        vars(module).clear()
        vars(module).update(saved)


def measure_params(module: object, config: object = None) -> int:
    """Parameters of ``module.model`` after ``setup()`` on the meta device (0 without one)."""
    return sum(p.numel() for p in meta_parameters(module, config).values())
