"""Prune the annotated constant weights in the graph, one shot, by magnitude."""

from __future__ import annotations

import numpy as np
import tvm

from npas_tvm.schemes import make_mask
from relay_passes.weights import (attached_params, pruning_annotations, update_main,
                                  weight_uses, with_attached_params)


@tvm.transform.module_pass(opt_level=0, name="ApplyPruning")
class ApplyPruning:
    """Zero each annotated weight outside its scheme's mask.

    The masks come from the schemes' shared mask functions (``npas_tvm.schemes.make_mask``,
    the same ones ``npas-tvm prune`` and a torch training loop use), so compiling a dense
    model with ``--npas`` gives exactly the weights of the pruned ONNX written beside the
    library. A weight that already follows its spec keeps its zeros (they score lowest).
    ``filter`` pruning also zeroes the removed filters' biases, as ``npas-tvm prune``
    does, so a removed channel is exactly zero and can be cut out of the graph
    (:func:`~relay_passes.remove_filters.RemoveFilters`).

    Example::

        mod = tvm.transform.Sequential([AnnotatePruning(plan), ApplyPruning()])(mod)
        # main.attrs["params"]: the annotated weights now hold the scheme's zeros
    """

    def transform_module(self, mod, ctx):
        def prune(func):
            specs = pruning_annotations(func)
            if not specs:
                return func
            values = attached_params(func)
            pruned = {}
            for use in weight_uses(func):
                spec = specs.get(use.name)
                if spec is None or use.name in pruned:
                    continue
                weight = use.to_scheme_layout(values[use.name])
                mask = make_mask(weight, spec)
                pruned[use.name] = use.from_scheme_layout(
                    np.where(mask, weight, 0).astype(weight.dtype))
                if spec.scheme == "filter":  # a removed filter outputs exactly zero
                    from relay_passes.remove_filters import filter_biases, kept_filters

                    kept = kept_filters(mask)
                    for bias in filter_biases(func, use):
                        pruned[bias] = np.where(kept, values[bias], 0).astype(values[bias].dtype)
            return with_attached_params(func, pruned)

        return update_main(mod, prune)
