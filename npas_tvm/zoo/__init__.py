"""The model zoo: built-in models with a fixed random initialization.

``npas-tvm zoo list`` / ``npas-tvm zoo export NAME -o x.onnx``. Weights are random
(seeded), BatchNorm statistics included, so numerics are meaningful without any
download; BatchNorm is exported in eval mode (folded into the convolutions).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

from npas_tvm.errors import NpasError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    factory: Callable[..., "object"]  # -> torch.nn.Module
    input_shape: tuple[int, int, int, int]
    num_classes: int


def _entries() -> dict[str, ZooEntry]:
    from npas_tvm.zoo import models

    rows = [
        ZooEntry("mobilenet_v2", "MobileNetV2 1.0, 224x224, ImageNet head",
                 models.MobileNetV2, (1, 3, 224, 224), 1000),
        ZooEntry("mobilenet_v3_large", "MobileNetV3-Large, 224x224, hard-swish + squeeze-excite",
                 models.MobileNetV3Large, (1, 3, 224, 224), 1000),
        ZooEntry("resnet18", "ResNet-18, 224x224, ImageNet head",
                 models.ResNet18, (1, 3, 224, 224), 1000),
        ZooEntry("vgg_cifar", "small CIFAR-style VGG (8 conv 3x3), 32x32, 10 classes",
                 models.CifarVGG, (1, 3, 32, 32), 10),
    ]
    return {row.name: row for row in rows}


ZOO_NAMES = ("mobilenet_v2", "mobilenet_v3_large", "resnet18", "vgg_cifar")
DEFAULT_MODEL = "mobilenet_v2"


def zoo_entry(name: str) -> ZooEntry:
    entries = _entries()
    if name not in entries:
        raise NpasError(f"zoo model {name!r} unknown; choose one of {', '.join(entries)}")
    return entries[name]


def build_model(name: str, seed: int = 0, num_classes: int | None = None):
    """A zoo model in eval mode with a seeded init (He-normal conv, random BN stats)."""
    import torch
    from torch import nn

    entry = zoo_entry(name)
    torch.manual_seed(seed)
    model = entry.factory(num_classes=num_classes or entry.num_classes)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu",
                                    generator=generator)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.05, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                n = module.num_features
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                del n
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01, generator=generator)
            nn.init.zeros_(module.bias)
    return model.eval()


def export_onnx(model, path: str, input_shape: tuple[int, ...], opset: int = 17,
                dynamic_batch: bool = False) -> str:
    """Export a torch module to ONNX with stable, readable weight names.

    BatchNorm folding renames conv weights to ``onnx::Conv_N``; those are renamed after
    the module that owns them (``features.0.0.weight``) so plans keyed by initializer
    name stay readable and stable across exports.
    """
    import onnx
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    example = torch.randn(*input_shape)
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), path, input_names=["input"],
                          output_names=["output"], opset_version=opset, dynamo=False,
                          do_constant_folding=True, dynamic_axes=axes)
    proto = onnx.load(path)
    _rename_folded_weights(proto)
    onnx.save(proto, path)
    return path


def _module_path(node_name: str) -> str:
    """``/features/features.1/conv/conv.0/Conv`` -> ``features.1.conv.0``.

    The exporter's scope lists each module by its name in its parent, where a
    Sequential child repeats the parent's name with ``.index`` appended.
    """
    parts = [part for part in node_name.split("/") if part][:-1]
    path, last = "", ""
    for part in parts:
        if last and part.startswith(last + "."):
            path = path[: len(path) - len(last)] + part
        else:
            path = f"{path}.{part}" if path else part
        last = part
    return path


def _rename_folded_weights(proto) -> None:
    initializers = {init.name: init for init in proto.graph.initializer}
    taken = set(initializers)
    renames: dict[str, str] = {}
    for node in proto.graph.node:
        module = _module_path(node.name)
        if not module:
            continue
        for index, role in ((1, "weight"), (2, "bias")):
            if index < len(node.input):
                old = node.input[index]
                new = f"{module}.{role}"
                if old.startswith("onnx::") and old in initializers and new not in taken:
                    renames[old] = new
                    taken.add(new)
    for old, new in renames.items():
        initializers[old].name = new
    for node in proto.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    for value in proto.graph.input:
        if value.name in renames:
            value.name = renames[value.name]


def export_zoo_model(name: str, path: str, seed: int = 0, opset: int = 17,
                     dynamic_batch: bool = False) -> str:
    entry = zoo_entry(name)
    return export_onnx(build_model(name, seed), path, entry.input_shape, opset, dynamic_batch)
