"""Attach a pruning scheme to each prunable layer: from a plan, or from the weights' zeros.

The annotation is data on ``main`` (attribute ``npas_pruning``: weight name -> spec as
JSON), keyed like the plan, by the weight's ONNX initializer name. Later passes read it:
:class:`~relay_passes.apply_pruning.ApplyPruning` masks the weights, the layout pass gives
a sparse layer its kernel's output block, and
:class:`~relay_passes.lower_sparse.LowerToSparseKernels` rewrites the layer.
"""

from __future__ import annotations

import logging
from typing import Mapping

import tvm

from npas_tvm.schemes import SchemeSpec, detect_spec, get_scheme
from relay_passes.weights import (attached_params, pruning_annotations, update_main,
                                  weight_uses, with_annotations)

_log = logging.getLogger("npas_tvm")


@tvm.transform.module_pass(opt_level=0, name="AnnotatePruning")
class AnnotatePruning:
    """Annotate each conv2d/matmul with a constant weight with its spec from ``plan``.

    ``plan`` is a :class:`~npas_tvm.plan.Plan` (its ``default`` covers unlisted layers)
    or a mapping weight name -> spec. Dense specs are not recorded; a spec that does
    not fit its layer (a pattern on a 1x1 conv, a block larger than the weight) is
    skipped with a warning naming the layer, and the layer stays dense.

    Example::

        plan = Plan(layers={"conv2.weight": BlockPunchedSpec(rate=5, block=(16, 4))})
        mod = AnnotatePruning(plan)(mod)
        # main.attrs["npas_pruning"] == {"conv2.weight": '{"scheme": "block_punched", ...}'}
    """

    def __init__(self, plan):
        self.plan = plan

    def _spec_for(self, name: str) -> SchemeSpec | None:
        if isinstance(self.plan, Mapping):
            return self.plan.get(name)
        return self.plan.spec_for(name)

    def transform_module(self, mod, ctx):
        def annotate(func):
            specs = pruning_annotations(func)
            for use in weight_uses(func):
                spec = self._spec_for(use.name)
                if spec is None or spec.scheme == "dense":
                    continue
                problem = get_scheme(spec.scheme).fit_error(use.kind, use.weight_shape, spec)
                if problem:
                    _log.warning("layer %r: %s; it stays dense", use.name, problem)
                    continue
                specs[use.name] = spec
            return with_annotations(func, specs)

        return update_main(mod, annotate)


@tvm.transform.module_pass(opt_level=0, name="DetectSparsity")
class DetectSparsity:
    """Annotate each not-yet-annotated layer with the strongest scheme its zeros follow.

    For a model pruned elsewhere (by ``npas-tvm prune``, a training script, another
    tool): the weights already hold the zeros, and this pass finds, per weight, the most
    structured spec that explains them exactly (``npas_tvm.schemes.detect_spec``), so
    the model compiles sparse without a plan. Layers with fewer than 2% zeros stay dense.

    Example::

        mod = DetectSparsity()(mod)   # a 1x1 conv whose 8-row blocks share kept columns
        # npas_pruning: {"conv3.weight": {"scheme": "block_based", "block": [8, 4], ...}}
    """

    def transform_module(self, mod, ctx):
        def detect(func):
            specs = pruning_annotations(func)
            values = attached_params(func)
            for use in weight_uses(func):
                if use.name in specs:
                    continue
                spec = detect_spec(use.to_scheme_layout(values[use.name]), use.kind)
                if spec.scheme != "dense":
                    specs[use.name] = spec
            return with_annotations(func, specs)

        return update_main(mod, detect)
