"""NPAS phase 1, torch side: replace mobile-unfriendly activations by cheap ones.

Mobile CPUs have no fast ``exp``: a sigmoid costs an exponential and a division per
element, and swish (SiLU, ``x * sigmoid(x)``) or GELU (an erf or a tanh) as much or
more, in layers that otherwise run a few multiply-adds per element. NPAS (Li et al.,
CVPR'21, phase 1) swaps them for piecewise-linear versions before pruning, and the
short fine-tune of the later phases absorbs the difference. The choices:

* ``SiLU`` / swish -> ``Hardswish`` (``x * relu6(x + 3) / 6``, MobileNetV3's): the same
  shape (smooth-ish, slightly negative below zero, identity-like for large x), within
  0.15 of swish everywhere; a clip, an add and two multiplies.
* ``Sigmoid`` (squeeze-excite gates, gated units) -> ``Hardsigmoid``
  (``clip(x / 6 + 0.5, 0, 1)``): the gate keeps its [0, 1] range and its midpoint;
  within 0.1 of the sigmoid.
* ``GELU`` -> ``ReLU`` by default: GELU (``x * Phi(x)``) bends less than swish, and
  ReLU is the closest of the standard activations (within 0.17; hard-swish is 0.30 off
  near x = 1.5), exports to one ``Relu`` that fuses into the conv's epilogue, and is the
  cheapest op there is. ``gelu="hardswish"`` keeps a smooth negative dip instead.
* ``Mish`` (``x * tanh(softplus(x))``) -> ``Hardswish``, for the same reason as swish.
* ``Tanh`` and ``Softplus`` are left alone (rare in the conv trunks NPAS targets).

Only modules are replaced (``nn.SiLU``, ``nn.Sigmoid``, ``nn.GELU``, ``nn.Mish``); a model
calling ``torch.sigmoid`` inside its ``forward`` keeps it (the Relax pass
``relay_passes.ReplaceMobileUnfriendlyOps`` rewrites the compiled graph either way)::

    model, replaced = replace_mobile_unfriendly(model)
    # replaced == [Replacement("features.1.act", "SiLU", "Hardswish"), ...]
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Replacement:
    """One replaced module: where, what it was, what it became."""

    path: str
    old: str
    new: str


def _replacement_for(module, gelu: str):
    from torch import nn

    if isinstance(module, (nn.SiLU, nn.Mish)):
        return nn.Hardswish(inplace=getattr(module, "inplace", False))
    if isinstance(module, nn.Sigmoid):
        return nn.Hardsigmoid()
    if isinstance(module, nn.GELU):
        return nn.Hardswish() if gelu == "hardswish" else nn.ReLU()
    return None


def replace_mobile_unfriendly(module, *, gelu: str = "relu"):
    """Replace swish/SiLU and Mish modules by hard-swish, GELU by ReLU (hard-swish with
    ``gelu="hardswish"``) and sigmoid modules by hard-sigmoid, in place.

    Returns ``(module, replacements)``: the same module, and one :class:`Replacement`
    per module swapped, in ``named_modules`` order."""
    if gelu not in ("hardswish", "relu"):
        raise ValueError(f"gelu={gelu!r}: choose 'hardswish' or 'relu'")
    replaced: list[Replacement] = []
    for path, parent in list(module.named_modules()):
        for name, child in list(parent.named_children()):
            new = _replacement_for(child, gelu)
            if new is None:
                continue
            setattr(parent, name, new)
            full = f"{path}.{name}" if path else name
            replaced.append(Replacement(full, type(child).__name__, type(new).__name__))
    return module, replaced
