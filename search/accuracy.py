"""The fast accuracy evaluator: plan -> accuracy after one-shot pruning and a short masked
fine-tune of the torch model (NPAS phase 3, the accuracy half of a search step).

::

    data = load_dataset("digits", (3, 32, 32))
    model, names = torch_model_for("vgg_cifar", data.num_classes)
    evaluator = AccuracyEvaluator(model, names, data, method="magnitude", threads=2,
                                  **fast_settings("vgg_cifar"))
    evaluator.train_dense(epochs=8, checkpoint="vgg.dense.pt")   # once; resumed after
    result = evaluator.evaluate(plan)          # EvalResult(accuracy, epochs, seconds, ...)
    evaluator.export_onnx(result.state_dict, "vgg.pruned.onnx", (1, 3, 32, 32))

Every ``evaluate`` starts from the same dense model (trained from scratch here: nothing
is downloaded). Masks are the shared scheme masks (``npas_tvm.schemes.make_mask``) on each
planned layer's weight in the schemes' layout, so the compiler, ``npas-tvm prune`` and
this fine-tune agree on what a scheme keeps.

Pruning algorithms (``method``):

* ``magnitude``: one-shot magnitude pruning with the scheme's mask, BatchNorm statistics
  re-estimated on a few batches (they alone recover most of the prune's loss), then masked
  fine-tuning (the masks are re-applied after every step, gradients of removed weights
  are zeroed so momentum cannot revive them).
* ``admm``: ADMM-regularized training first (Zhang et al., ECCV'18; NPAS phase 3): the
  loss gets ``rho/2 * ||W - Z + U||^2`` per planned layer, where ``Z`` is the projection
  of ``W + U`` onto the scheme (its mask applied) and ``U`` the scaled dual, both updated
  twice an epoch; the weights drift toward a structure that loses less when cut. Then
  the hard prune (mask of the trained weights) and the same masked fine-tune.

Fine-tuning stops early when validation accuracy has not improved for ``patience``
epochs; the best epoch's weights are returned.

For speed the evaluator trains at the dataset's resolution (the zoo models are fully
convolutional with global pooling, so a search can train at 32x32 and compile the same
weights at the ONNX model's own input size), uses channels-last memory for models with
depthwise convolutions (about twice as fast on CPU), and can cap the batches per
fine-tune epoch (``steps_per_epoch``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass, field

import numpy as np

from npas_tvm.errors import ModelError, NpasError
from npas_tvm.schemes import FC, get_scheme, make_mask

_log = logging.getLogger("npas_tvm")

METHODS = ("magnitude", "admm")


# ---------------------------------------------------------------- models


def torch_model_for(model: str, num_classes: int, *, seed: int = 0):
    """The torch module for a zoo name or an ONNX file, and ``{plan weight name -> torch
    parameter name}`` for its prunable layers.

    Zoo models are built from scratch (seeded), with a ``num_classes`` head; their plan
    names are their parameter names. An ONNX file is converted with ``onnx2torch``
    (its weights kept; ``num_classes`` must not exceed the model's outputs).
    """
    from npas_tvm.zoo import ZOO_NAMES, build_model

    if model in ZOO_NAMES:
        module = build_model(model, seed, num_classes)
        names = {}
        for path, sub in module.named_modules():
            if _is_prunable(sub):
                names[f"{path}.weight"] = f"{path}.weight"
        return module, names
    if not os.path.exists(model):
        raise ModelError(f"{model}: neither a zoo model ({', '.join(ZOO_NAMES)}) nor an "
                         "existing ONNX file")
    return _onnx_to_torch(model, num_classes)


def _is_prunable(module) -> bool:
    from torch import nn

    return (isinstance(module, nn.Conv2d) and module.weight.dim() == 4) or \
        isinstance(module, nn.Linear)


def _import_onnx2torch(path: str):
    """onnx2torch, which imports torchvision for its NMS and RoiAlign converters only; a
    missing (or broken) torchvision is replaced by a stub during the import, so every
    other op converts and those two fail with a clear message if met."""
    try:
        import onnx2torch
        return onnx2torch
    except ImportError as err:
        if "onnx2torch" in str(err) and "torchvision" not in str(err):
            raise ModelError(f"{path}: converting an ONNX model to torch needs onnx2torch "
                             "(pip install --no-deps onnx2torch)") from None
    except RuntimeError:
        pass  # a torchvision built for another torch
    for name in [n for n in sys.modules if n == "onnx2torch" or n.startswith("onnx2torch.")]:
        del sys.modules[name]
    saved = {n: sys.modules.pop(n) for n in list(sys.modules)
             if n == "torchvision" or n.startswith("torchvision.")}

    def missing(*_args, **_kwargs):
        raise ModelError(f"{path}: this model needs torchvision (NMS / RoiAlign), which is "
                         "not usable here")

    stub = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.roi_align = ops.nms = ops.batched_nms = missing
    stub.ops = ops
    sys.modules.update({"torchvision": stub, "torchvision.ops": ops})
    try:
        import onnx2torch
    except ImportError:
        raise ModelError(f"{path}: converting an ONNX model to torch needs onnx2torch "
                         "(pip install --no-deps onnx2torch)") from None
    finally:
        for name in ("torchvision", "torchvision.ops"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return onnx2torch


def _onnx_to_torch(path: str, num_classes: int):
    from npas_tvm.layers import load_model_layers
    from onnx import numpy_helper

    onnx2torch = _import_onnx2torch(path)
    loaded, layers = load_model_layers(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = onnx2torch.convert(loaded.proto)
    except NpasError:
        raise
    except Exception as err:  # noqa: BLE001 - any converter failure is the model's
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{path}: onnx2torch cannot convert this model ({message})") from None
    values = {init.name: numpy_helper.to_array(init) for init in loaded.proto.graph.initializer}
    params = {name: p.detach().numpy() for name, p in module.named_parameters()}
    # onnx2torch keeps a MatMul's constant operand as a buffer: candidates too (made
    # trainable parameters below when matched).
    buffers = {name: b.detach().numpy() for name, b in module.named_buffers()
               if b.dtype.is_floating_point and b.dim() >= 2}
    params.update(buffers)
    names, transposed, taken = {}, set(), set()
    for layer in layers:
        stored = values[layer.name]
        for name, value in params.items():
            if name in taken:
                continue
            if value.shape == stored.shape and np.array_equal(value, stored):
                names[layer.name] = name
            elif value.ndim == 2 and value.shape == stored.shape[::-1] and \
                    np.array_equal(value.T, stored):
                names[layer.name] = name
                transposed.add(name)  # converted MatMul weights may be stored [out, in]
            else:
                continue
            if layer.transposed:  # the ONNX weight is [in, out]: the scheme layout is .T
                transposed ^= {name}
            taken.add(name)
            break
        else:
            _log.warning("%s: layer %r has no matching torch parameter; it is not pruned",
                         path, layer.name)
    for name in set(names.values()) & set(buffers):
        _buffer_to_parameter(module, name)
    module._npas_transposed = transposed
    module._npas_onnx_layers = {layer.name: layer for layer in layers}
    outputs = loaded.proto.graph.output[0].type.tensor_type.shape.dim
    if outputs and outputs[-1].HasField("dim_value") and outputs[-1].dim_value < num_classes:
        raise ModelError(f"{path}: the model has {outputs[-1].dim_value} outputs, fewer than "
                         f"the dataset's {num_classes} classes")
    return module, names


def _buffer_to_parameter(module, name: str) -> None:
    import torch

    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    value = owner._buffers.pop(leaf)
    owner.register_parameter(leaf, torch.nn.Parameter(value.detach().clone()))


# ---------------------------------------------------------------- the evaluator

FAST_SETTINGS = {
    # 0.45 s per 64-image step at 32x32 on 2 cores: 3 x 8 steps, about 10 s a plan.
    "vgg_cifar": {"epochs": 3, "steps_per_epoch": 8, "lr": 0.03, "patience": 1},
    # 0.1 s per step at 32x32 (channels-last), but one-shot pruning hurts the thin
    # projections badly: whole epochs and a gentler rate, about 18 s a plan.
    "mobilenet_v2": {"epochs": 8, "steps_per_epoch": None, "lr": 0.01, "patience": 2},
}
"""Per zoo model, fine-tune settings measured on digits at 32x32 with 2 threads (a search's
budget: a plan within about a point of dense at 3x; see the module docstring)."""


def fast_settings(model: str) -> dict:
    """Evaluator keyword arguments for a search's budget on ``model`` (a zoo name);
    ``{}`` (the evaluator's defaults) for other models."""
    return dict(FAST_SETTINGS.get(model, {}))



@dataclass
class EvalResult:
    accuracy: float
    epochs: int
    seconds: float
    state_dict: dict = field(repr=False)
    history: list = field(default_factory=list)
    """Validation accuracy after each fine-tune epoch."""
    skipped: list = field(default_factory=list)
    """Plan layers left dense because their scheme does not fit them."""


@dataclass
class _Target:
    """One planned layer: its torch parameter and how to reach the schemes' layout."""

    name: str
    param: "object"
    spec: "object"
    transposed: bool

    def to_scheme(self, array: np.ndarray) -> np.ndarray:
        return array.T if self.transposed else array

    def mask_for(self, weight_tensor) -> "object":
        import torch

        weight = self.to_scheme(weight_tensor.detach().cpu().numpy())
        mask = make_mask(weight, self.spec)
        mask = mask.T if self.transposed else mask
        return torch.from_numpy(np.ascontiguousarray(mask)).to(weight_tensor.dtype)


class AccuracyEvaluator:
    """Accuracy of a pruning plan after one-shot pruning and a short masked fine-tune.

    ``model`` / ``weight_names``: from :func:`torch_model_for`. ``data``: a
    ``search.data.Dataset``. ``method``: ``magnitude`` or ``admm``. A fine-tune runs
    ``epochs`` epochs of ``steps_per_epoch`` batches (``None``: whole passes over the
    training split) with SGD (Nesterov momentum, cosine decay from ``lr``), stopping after
    ``patience`` epochs without a better validation accuracy. ADMM adds ``admm_epochs``
    epochs with penalty ``rho`` before the hard prune. ``bn_batches`` forward batches
    re-estimate BatchNorm statistics right after the prune. ``threads`` sets torch's
    intra-op threads; ``progress`` shows tqdm bars; ``seed`` fixes data order,
    augmentation (random shifts, ``augment``) and initialization.

    The defaults aim at a search's budget: on 2 cores, vgg_cifar on digits at 32x32
    evaluates a plan in about 10 s (3 x 8 steps) within a point or two of dense at 3x;
    :func:`fast_settings` gives each zoo model's measured settings, and a final plan
    deserves ``evaluate(plan, epochs=10, steps_per_epoch=0)``.
    """

    def __init__(self, model, weight_names: dict[str, str], data, *, method: str = "magnitude",
                 epochs: int = 3, patience: int = 1, batch_size: int = 64, lr: float = 0.03,
                 threads: int | None = None, progress: bool = True, seed: int = 0,
                 admm_epochs: int = 2, rho: float = 0.01, steps_per_epoch: int | None = 8,
                 dense_lr: float = 0.05, weight_decay: float = 5e-4, augment: bool = True,
                 bn_batches: int = 4):
        import torch

        if method not in METHODS:
            raise NpasError(f"pruning method {method!r} unknown; choose one of "
                            f"{', '.join(METHODS)}")
        if threads:
            torch.set_num_threads(int(threads))
        self.model, self.weight_names, self.data = model, dict(weight_names), data
        self.method, self.epochs, self.patience = method, int(epochs), int(patience)
        self.batch_size, self.lr, self.dense_lr = int(batch_size), float(lr), float(dense_lr)
        self.weight_decay, self.augment = float(weight_decay), augment
        self.progress, self.seed = progress, int(seed)
        self.admm_epochs, self.rho = int(admm_epochs), float(rho)
        self.steps_per_epoch = steps_per_epoch
        self.bn_batches = int(bn_batches)
        self.dense_accuracy: float | None = None
        self._base: dict | None = None
        params = dict(model.named_parameters())
        missing = [p for p in self.weight_names.values() if p not in params]
        if missing:
            raise NpasError(f"weight_names: torch parameter {missing[0]!r} is not in the model")
        self._params = params
        modules = dict(model.named_modules())
        self._owner = {p: modules.get(p.rsplit(".", 1)[0]) for p in self.weight_names.values()}
        self._channels_last = any(getattr(m, "groups", 1) > 1 for m in model.modules())
        if self._channels_last:
            self.model.to(memory_format=torch.channels_last)

    # ------------------------------------------------------------ dense

    def train_dense(self, epochs: int = 10, checkpoint: str | None = None) -> float:
        """Train the dense model from its current weights (from scratch for a zoo model)
        and keep it as every evaluation's starting point; returns validation accuracy.
        With ``checkpoint``: load it instead when it exists, else save it after training."""
        import torch

        if checkpoint and os.path.exists(checkpoint):
            self._load_checkpoint(checkpoint)
            return self.dense_accuracy
        torch.manual_seed(self.seed)
        optimizer = self._optimizer(self.dense_lr)
        steps = max(self._steps(None) * epochs, 1)
        warmup = max(steps // 4, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(  # one cycle: warm up, cosine down
            optimizer, lambda step: (step + 1) / warmup if step < warmup else
            0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(steps - warmup, 1), 1.0))))
        generator = torch.Generator().manual_seed(self.seed)
        for epoch in range(epochs):
            self._train_epoch(optimizer, schedule, generator, None, f"dense {epoch + 1}/{epochs}")
        self.dense_accuracy = self.accuracy()
        self._base = _clone(self.model.state_dict())
        if checkpoint:
            os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
            torch.save({"state_dict": self._base, "accuracy": self.dense_accuracy,
                        "data": self.data.name, "input_shape": tuple(self.data.x_train.shape[1:]),
                        "epochs": epochs}, checkpoint)
        return self.dense_accuracy

    def _load_checkpoint(self, path: str) -> None:
        import torch

        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(saved["state_dict"])
        except Exception as err:  # noqa: BLE001 - a foreign or truncated file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NpasError(f"{path}: not a dense checkpoint of this model ({first})") from None
        self._base = _clone(self.model.state_dict())
        self.dense_accuracy = self.accuracy()

    def use_current_as_dense(self) -> float:
        """Take the model's current weights as the dense starting point (no training)."""
        self._base = _clone(self.model.state_dict())
        self.dense_accuracy = self.accuracy()
        return self.dense_accuracy

    # ------------------------------------------------------------ evaluate

    def evaluate(self, plan, *, epochs: int | None = None,
                 steps_per_epoch: int | None = None) -> EvalResult:
        """Prune a copy of the dense model by ``plan`` and fine-tune it (masked, early
        stopping on validation accuracy); the best epoch's accuracy and weights.
        ``epochs`` / ``steps_per_epoch`` override the evaluator's (0 steps: whole epochs)."""
        import torch

        if self._base is None:
            raise NpasError("evaluate: no dense model yet; call train_dense() first")
        start = time.perf_counter()
        epochs = self.epochs if epochs is None else int(epochs)
        cap = self.steps_per_epoch if steps_per_epoch is None else (steps_per_epoch or None)
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed + 1)
        self.model.load_state_dict(self._base)
        targets, skipped = self._targets(plan)
        if self.method == "admm" and targets:
            self._admm(targets, generator, cap)
        masks = {t.name: t.mask_for(t.param) for t in targets}
        self._apply(targets, masks)
        if targets:
            self._recalibrate_batchnorm()
        history: list[float] = []
        best, best_state = -1.0, None
        if targets and epochs > 0:
            optimizer = self._optimizer(self.lr)
            steps = self._steps(cap) * epochs
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))))
            stale = 0
            for epoch in range(epochs):
                self._train_epoch(optimizer, schedule, generator, (targets, masks),
                                  f"fine-tune {epoch + 1}/{epochs}", cap)
                accuracy = self.accuracy()
                history.append(accuracy)
                if accuracy > best:
                    best, best_state, stale = accuracy, _clone(self.model.state_dict()), 0
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
        else:
            best, best_state = self.accuracy(), _clone(self.model.state_dict())
        return EvalResult(best, len(history), time.perf_counter() - start, best_state, history,
                          skipped)

    def _targets(self, plan):
        from npas_tvm.layers import conv_kind

        targets, skipped = [], []
        transposed = getattr(self.model, "_npas_transposed", set())
        onnx_layers = getattr(self.model, "_npas_onnx_layers", {})
        for name, param_name in self.weight_names.items():
            spec = plan.spec_for(name)
            if spec is None or spec.scheme == "dense":
                continue
            param = self._params[param_name]
            is_t = param_name in transposed
            shape = tuple(param.shape[::-1]) if is_t else tuple(param.shape)
            if name in onnx_layers:
                kind = onnx_layers[name].kind
            elif param.dim() == 4:
                kind = conv_kind(shape, getattr(self._owner[param_name], "groups", 1))
            else:
                kind = FC
            problem = get_scheme(spec.scheme).fit_error(kind, shape, spec)
            if problem:
                _log.warning("layer %r: %s; it stays dense", name, problem)
                skipped.append(name)
                continue
            targets.append(_Target(name, param, spec, is_t))
        return targets, skipped

    def _admm(self, targets, generator, cap: int | None) -> None:
        """ADMM-regularized training toward each layer's scheme projection."""
        import torch

        with torch.no_grad():
            u = {t.name: torch.zeros_like(t.param) for t in targets}
            z = {t.name: t.param * t.mask_for(t.param) for t in targets}
        optimizer = self._optimizer(self.lr)
        steps = self._steps(cap)
        update_every = max(1, steps // 2)
        state = {"step": 0}

        def regularizer():
            return sum((t.param - z[t.name] + u[t.name]).pow(2).sum() for t in targets) * \
                (self.rho / 2)

        def after_step():
            state["step"] += 1
            if state["step"] % update_every:
                return
            with torch.no_grad():
                for t in targets:
                    moved = t.param + u[t.name]
                    z[t.name] = moved * t.mask_for(moved)
                    u[t.name] += t.param - z[t.name]

        for epoch in range(self.admm_epochs):
            self._train_epoch(optimizer, None, generator, None,
                              f"admm {epoch + 1}/{self.admm_epochs}", cap,
                              regularizer, after_step)

    # ------------------------------------------------------------ training pieces

    def _optimizer(self, lr: float):
        import torch

        return torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=self.weight_decay)

    def _steps(self, cap: int | None) -> int:
        steps = math.ceil(len(self.data.y_train) / self.batch_size)
        return min(steps, cap) if cap else steps

    def _batch(self, x):
        if self._channels_last:
            import torch

            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _shift(self, x, generator):
        """Random translation by up to 1/8 of the image (zero padded), per sample."""
        import torch

        pad = max(1, x.shape[-1] // 8)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (x.shape[0],), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (x.shape[0],), generator=generator)
        height, width = x.shape[-2:]
        return torch.stack([padded[i, :, dy[i]:dy[i] + height, dx[i]:dx[i] + width]
                            for i in range(x.shape[0])])

    def _train_epoch(self, optimizer, schedule, generator, masked, label: str,
                     cap: int | None = None, regularizer=None, after_step=None) -> float:
        import torch
        from torch.nn import functional

        self.model.train()
        x_all, y_all = self.data.x_train, self.data.y_train
        order = torch.randperm(len(y_all), generator=generator)
        steps = self._steps(cap)
        total = 0.0
        bar = _progress(range(steps), label, self.progress)
        for step in bar:
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            if len(index) == 0:
                break
            x = x_all[index]
            if self.augment:
                x = self._shift(x, generator)
            loss = functional.cross_entropy(self.model(self._batch(x)), y_all[index])
            if regularizer is not None:
                loss = loss + regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if masked is not None:
                targets, masks = masked
                for t in targets:
                    if t.param.grad is not None:
                        t.param.grad.mul_(masks[t.name])
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if masked is not None:
                self._apply(*masked)
            if after_step is not None:
                after_step()
            total += float(loss.detach())
            if self.progress:
                bar.set_postfix(loss=f"{total / (step + 1):.3f}")
        return total / max(steps, 1)

    def _recalibrate_batchnorm(self) -> None:
        """Re-estimate BatchNorm statistics on ``bn_batches`` training batches (no
        gradients): pruning shifts every later layer's activation statistics, and fresh
        statistics alone recover most of a one-shot prune's loss (vgg_cifar, rule plan
        at 3x: from chance to within a few points of dense) for a few forward passes."""
        import torch

        norms = [m for m in self.model.modules()
                 if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms or self.bn_batches <= 0:
            return
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        self.model.train()
        generator = torch.Generator().manual_seed(self.seed + 2)
        order = torch.randperm(len(self.data.y_train), generator=generator)
        with torch.no_grad():
            for step in range(self.bn_batches):
                index = order[step * self.batch_size:(step + 1) * self.batch_size]
                if len(index):
                    self.model(self._batch(self.data.x_train[index]))
        for m, momentum in zip(norms, saved):
            m.momentum = momentum

    @staticmethod
    def _apply(targets, masks) -> None:
        import torch

        with torch.no_grad():
            for t in targets:
                t.param.mul_(masks[t.name])

    def accuracy(self, batch_size: int = 256) -> float:
        """Validation accuracy (a fraction, 0..1) of the model's current weights."""
        import torch

        self.model.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(self.data.y_val), batch_size):
                x = self._batch(self.data.x_val[start:start + batch_size])
                prediction = self.model(x).argmax(dim=1)
                correct += int((prediction == self.data.y_val[start:start + batch_size]).sum())
        return correct / max(len(self.data.y_val), 1)

    # ------------------------------------------------------------ export

    def export_onnx(self, state_dict, path: str, input_shape: tuple[int, ...]) -> str:
        """Write the model with ``state_dict`` as ONNX, named like the zoo's exports (BN
        folded into the convolutions, weights named by module path); the plan's masks
        hold in the written weights. ``input_shape`` is the full shape, e.g. (1, 3, 224, 224)."""
        import onnx
        import torch

        from npas_tvm.zoo import export_onnx

        model = copy.deepcopy(self.model)
        model.load_state_dict(state_dict)
        model.to(memory_format=torch.contiguous_format).eval()
        for param in model.parameters():
            param.data = param.data.contiguous()
        export_onnx(model, path, tuple(input_shape))
        inverse = {p: n for n, p in self.weight_names.items() if p != n}
        if inverse:
            proto = onnx.load(path)
            renames = {init.name: inverse[init.name] for init in proto.graph.initializer
                       if init.name in inverse}
            for init in proto.graph.initializer:
                init.name = renames.get(init.name, init.name)
            for node in proto.graph.node:
                node.input[:] = [renames.get(name, name) for name in node.input]
            onnx.save(proto, path)
        return path


def _clone(state: dict) -> dict:
    return {key: value.detach().clone() for key, value in state.items()}


def _progress(iterable, label: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=label, leave=False, dynamic_ncols=True)
