"""The search's fast latency evaluator: plan -> predicted milliseconds on a target.

A model's latency is predicted as the sum of its prunable layers' times plus a measured
remainder (``base_ms``: everything else the model runs, pooling, depthwise-free glue,
layout transforms, the VM's calls)::

    model = build_latency_model("mobilenet_v2.onnx", "host", "work/")
    model.predict_plan(layers, plan)        # ms, in microseconds of CPU time

**Records.** One record is one layer alone at its real input shape (a one-node ONNX
model with the layer's attributes and random weights), pruned with one spec of the
search space (``search.space.layer_actions``), lowered exactly as ``compile_sparse``
lowers a model for the target (``AnnotatePruning`` -> ``ApplyPruning`` -> the CPU
pipeline up to scheduling, ``npas_tvm.tuning.extract_tasks``), its kernel given the
target's default schedule (``tir_schedules.apply_template``) and timed by the tuner's
``Measurer``: meta_schedule's local runner with ``TVM_NUM_THREADS`` threads, or its RPC
runner through a tracker for a device; a record keeps the fastest of its repeats, since
interference from other work on the machine only ever adds time (with two threads on a
busy 2-core machine a 0.04 ms kernel's median was seen at 1 ms). Records are keyed by the layer's geometry, the
spec and the target, appended to a JSON-lines file as they are measured (an interrupt
loses nothing measured; re-running measures only what is missing) and can be shared by
models with the same layer shapes.

**Features.** Per (layer, spec): layer descriptors (dense and kept MACs, the scheme,
rate, block, kernel size, channels, spatial sizes, stride, the target's SIMD lanes and
threads) and TVM's ``PerStoreFeature`` of the scheduled kernel's TIR (the 164 features
per buffer store that TVM's XGBoost cost model is trained on, summed over the stores).
The sparse kernels' tap loops are data-dependent: ``finish_schedule`` bounds each block's
loop by a count read from memory, so the extractor sees the loop at its padded static
extent (the most taps of any block); the features then describe the kernel's structure
(vector width, unrolling, buffer footprints) but not the kept work, which the
descriptors carry (kept MACs from the rate). The extractor is called through
``TuneContext``'s FFI constructor: the Python constructor imports
``tvm.s_tir.tensor_intrin``, which costs ~25 s per process and is not needed here. For
OpenCL targets the TIR features are left at zero (the GPU pipeline's kernels are not
extracted) and the descriptors carry the model alone.

**Regressors.** TVM's ``XGBModel`` ranks schedules of *one* workload: it normalizes costs
per workload group, so its scores are not comparable across layers. Every build
measures each layer's dense kernel, so a sparse layer is predicted as its measured
dense time times a predicted *ratio*: XGBoost (``XGBModel``'s hyper-parameters,
``XGBConfig``) on log(sparse / dense) from the features and the dense time, constrained
to be monotone in the rate (a higher rate never predicts slower). The ratio is mostly
the kernel's efficiency at a rate and block, which transfers across layers; absolute
times do not (MobileNetV2's plans ranked at Spearman -0.4 when predicted absolutely).
A layer without a measured dense time falls back to absolute log-time: a least-squares fit of log(ms) on log-MACs (so
predictions extrapolate to layers larger or smaller than the measured ones, which trees
cannot) plus an XGBoost regressor with ``XGBModel``'s hyper-parameters (``XGBConfig``)
on the residual. Log-time makes errors relative: a 10% miss on a 0.05 ms layer counts
as much as on a 5 ms one, which is what ranking plans needs.

``base_ms`` is the measured dense model minus the *predicted* dense layers, so the dense
plan is predicted exactly and a plan's prediction differs from it only by its pruned
layers' predicted changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import tempfile
import time
from typing import Iterable, Sequence

import numpy as np

from npas_tvm.errors import NpasError
from npas_tvm.plan import Plan
from npas_tvm.schemes import DenseSpec, SchemeSpec, spec_from_json

RECORDS_FILE = "latency_records.jsonl"
MODEL_FILE = "latency_model.json"
DEFAULT_SAMPLES = 150
"""Records measured per model when ``samples`` is not given: every layer's dense record,
then sparse actions spread over layers and rates up to this count."""
SCHEMES = ("dense", "block_punched", "block_based", "pattern", "unstructured", "other")
TIR_FEATURES = 164
CHUNK = 8  # records measured (and appended) per batch
FORMAT = "npas-tvm-latency-model"
XGB_ROUNDS = 200


class LatencyError(NpasError):
    """The latency model cannot be built or used (no device, a bad records file)."""


# ------------------------------------------------------------------ layer geometry


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a layer's one-node model needs: the op, its attributes, the input shape and
    the stored weight and bias shapes (the layer's ONNX node, weights left out)."""

    op_type: str
    attrs: tuple  # sorted (name, value) pairs, lists as tuples
    input_shape: tuple[int, ...]
    weight_dims: tuple[int, ...]  # as stored in ONNX
    bias_dims: tuple[int, ...] | None
    weight_shape: tuple[int, ...]  # in the schemes' layout
    output_spatial: tuple[int, ...]
    rows: int

    def key(self) -> str:
        return json.dumps([self.op_type, [list(a) for a in self.attrs], self.input_shape,
                           self.weight_dims, self.bias_dims], separators=(",", ":"),
                          default=list)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["attrs"] = [[name, value] for name, value in self.attrs]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Geometry":
        data = dict(data)
        data["attrs"] = tuple((name, _tuple(value)) for name, value in data["attrs"])
        for name in ("input_shape", "weight_dims", "weight_shape", "output_spatial"):
            data[name] = tuple(data[name])
        data["bias_dims"] = tuple(data["bias_dims"]) if data["bias_dims"] is not None else None
        return cls(**data)

    @property
    def dense_macs(self) -> int:
        spatial = int(np.prod(self.output_spatial)) if self.output_spatial else 1
        return int(np.prod(self.weight_shape)) * spatial * self.rows

    def attr(self, name: str, default=None):
        return dict(self.attrs).get(name, default)


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


def model_geometries(proto, layers) -> dict[str, Geometry]:
    """Each layer's geometry, from the model (shape inference gives the input shapes)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # pylint: disable=broad-except
        inferred = proto
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    nodes = {(node.name or str(i)): node for i, node in enumerate(proto.graph.node)}
    inits = {init.name: tuple(int(d) for d in init.dims) for init in proto.graph.initializer}
    out = {}
    for layer in layers:
        node = nodes[layer.node]
        attrs = []
        for attribute in node.attribute:
            value = onnx.helper.get_attribute_value(attribute)
            if isinstance(value, bytes):
                value = value.decode()
            attrs.append((attribute.name, tuple(value) if isinstance(value, list) else value))
        shape = shapes.get(node.input[0])
        if shape is None:
            out[layer.name] = layer_geometry(layer)
            continue
        out[layer.name] = Geometry(
            node.op_type, tuple(sorted(attrs)), shape, inits[node.input[1]],
            inits.get(layer.bias) if layer.bias else None, tuple(layer.weight_shape),
            tuple(layer.output_spatial), int(layer.rows))
    return out


def layer_geometry(layer) -> Geometry:
    """A geometry from a ``Layer`` alone (a layer of a model not seen at build time):
    a conv with "same" padding at its strides, or a Gemm with the weight as [out, in]."""
    shape = tuple(layer.weight_shape)
    if layer.op_type == "Conv":
        strides = tuple(layer.strides) or (1, 1)
        spatial = tuple(layer.output_spatial) or (1, 1)
        kh, kw = shape[2:]
        attrs = (("group", int(layer.groups)), ("kernel_shape", (kh, kw)),
                 ("pads", (kh // 2, kw // 2, kh // 2, kw // 2)), ("strides", strides))
        size = tuple(o * s for o, s in zip(spatial, strides))
        return Geometry("Conv", attrs, (int(layer.rows), shape[1] * layer.groups, *size),
                        shape, (shape[0],), shape, spatial, int(layer.rows))
    return Geometry("Gemm", (("transB", 1),), (int(layer.rows), shape[1]), shape,
                    (shape[0],), shape, (), int(layer.rows))


def layer_onnx(geometry: Geometry, seed: int = 0):
    """The one-node ONNX model of a layer, with random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inputs = ["x", "w"] + (["b"] if geometry.bias_dims else [])
    weight = (rng.standard_normal(geometry.weight_dims) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    if geometry.bias_dims:
        inits.append(numpy_helper.from_array(np.zeros(geometry.bias_dims, np.float32), "b"))
    attrs = {name: list(value) if isinstance(value, tuple) else value
             for name, value in geometry.attrs}
    node = helper.make_node(geometry.op_type, inputs, ["y"], **attrs)
    graph = helper.make_graph(
        [node], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(geometry.input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


# ------------------------------------------------------------------ kernels and features


@dataclasses.dataclass
class LayerKernel:
    """A layer's kernel for a spec: the scheduled PrimFunc and its index arguments."""

    kernel: object  # tvm.tirx.PrimFunc, scheduled and finished
    family: str
    int_args: dict
    args_key: str


def layer_kernel(geometry: Geometry, spec: SchemeSpec, target_spec) -> LayerKernel:
    """Lower the one-node model as ``compile_sparse`` does and schedule its kernel."""
    import tvm

    from npas_tvm import tuning
    from npas_tvm.compiler import import_onnx
    from npas_tvm.model_io import LoadedModel
    from relay_passes import AnnotatePruning, ApplyPruning
    from tir_schedules import (
        apply_template, default_config, finish_schedule, prefixed_templates)
    from tvm.s_tir import meta_schedule as ms

    proto = layer_onnx(geometry)
    loaded = LoadedModel(path="<layer>", proto=proto,
                         input_shapes={"x": tuple(geometry.input_shape)},
                         input_dtypes={"x": "float32"}, opset=13)
    mod = import_onnx(loaded).mod
    if spec.scheme != "dense":
        mod = tvm.transform.Sequential([AnnotatePruning(Plan(layers={"w": spec})),
                                        ApplyPruning()])(mod)
    # every kernel of the layer, however small, pattern-like pixel kernels included
    tasks = tuning.extract_tasks(mod, target_spec, min_flops=0,
                                 families=(*tuning.TUNED_FAMILIES, *prefixed_templates()))
    if not tasks:
        raise LatencyError(f"no kernel found for {geometry.op_type} {geometry.weight_shape}")
    task = tasks[0]  # the layer's conv / matmul (the heaviest kernel)
    applied = apply_template(task.func, default_config(target_spec))
    if applied is None:
        kernel, family = task.func, task.family
    else:
        sch, family = applied
        kernel = finish_schedule(sch.mod["main"], family)
    info = ms.arg_info.ArgInfo.from_prim_func(task.func)
    return LayerKernel(kernel, family, dict(task.int_args), tuning._args_key(info))


_EXTRACTOR = None


def tir_features(kernel, target) -> np.ndarray:
    """TVM's PerStoreFeature of a scheduled kernel, summed over its stores."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import _ffi_api
    from tvm.s_tir.meta_schedule.logging import get_logger, get_logging_func

    global _EXTRACTOR  # pylint: disable=global-statement
    if _EXTRACTOR is None:
        _EXTRACTOR = ms.feature_extractor.PerStoreFeature()
    mod = tvm.IRModule({"main": kernel})
    context = ms.TuneContext.__new__(ms.TuneContext)
    # the FFI constructor: TuneContext.__init__ imports tvm.s_tir.tensor_intrin (~25 s)
    context.__init_handle_by_constructor__(  # pylint: disable=no-member
        _ffi_api.TuneContext, mod, target, None, None, "main", 1, -1,
        get_logging_func(get_logger(__name__)))
    candidate = ms.MeasureCandidate(tvm.s_tir.Schedule(kernel),
                                    ms.arg_info.ArgInfo.from_prim_func(kernel))
    per_store = _EXTRACTOR.extract_from(context, [candidate])[0].numpy()
    out = np.zeros(TIR_FEATURES + 1)
    out[:TIR_FEATURES] = per_store.sum(axis=0)[:TIR_FEATURES]
    out[TIR_FEATURES] = per_store.shape[0]
    return out


def descriptor_features(geometry: Geometry, spec: SchemeSpec, lanes: int,
                        threads: int) -> np.ndarray:
    """Layer and spec descriptors (see the module's docstring)."""
    shape = geometry.weight_shape
    out_channels, in_channels = shape[0], shape[1]
    kh, kw = (shape[2], shape[3]) if len(shape) == 4 else (1, 1)
    dense = max(geometry.dense_macs, 1)
    rate = float(spec.rate)
    kept = dense / rate
    block = getattr(spec, "block", None) or (0, 0)
    block = tuple(block) if isinstance(block, (tuple, list)) else (block, 0)
    onehot = [float(spec.scheme == name) for name in SCHEMES[:-1]]
    onehot.append(float(spec.scheme not in SCHEMES[:-1]))
    spatial = int(np.prod(geometry.output_spatial)) if geometry.output_spatial else 1
    strides = geometry.attr("strides", (1, 1)) or (1, 1)
    return np.array([
        math.log2(dense), math.log2(kept), rate, 1.0 / rate, *onehot,
        float(block[0]), float(block[1] if len(block) > 1 else 0), kh, kw,
        math.log2(in_channels), math.log2(out_channels), math.log2(spatial),
        math.log2(max(int(np.prod(geometry.input_shape)), 1)), float(strides[0]),
        float(geometry.attr("group", 1)), float(geometry.op_type != "Conv"),
        float(lanes), float(threads)])


def _linear_basis(descriptors: np.ndarray) -> np.ndarray:
    """The least-squares part's inputs: 1, log2 dense MACs, log2 kept MACs (adding the
    tensors' sizes made held-out layers' errors explode: a few layers per fit leave
    them collinear)."""
    d = np.atleast_2d(descriptors)
    return np.column_stack([np.ones(len(d)), d[:, 0], d[:, 1]])


def _ratio_inputs(vectors: np.ndarray, dense_ms: np.ndarray) -> np.ndarray:
    """The ratio model's inputs: the features and log of the layer's dense time."""
    return np.column_stack([vectors, np.log(np.maximum(dense_ms, 1e-6))])


# ------------------------------------------------------------------ the model


def record_key(geometry: Geometry, spec: SchemeSpec, target: str, threads: int) -> str:
    text = json.dumps([target, threads, geometry.key(), spec.to_json()],
                      separators=(",", ":"), default=list)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _spec_key(spec: SchemeSpec) -> str:
    return json.dumps(spec.to_json(), sort_keys=True)


class LatencyModel:
    """Per-layer latency for one target (and thread count): see the module docstring."""

    def __init__(self, target: str, target_spec=None, threads: int = 1, lanes: int = 4):
        self.target = target
        self.threads = threads
        self.lanes = lanes
        self.base_ms = 0.0
        self.scale = 1.0  # in-model / isolated kernel time (see calibrate)
        self.coef = np.zeros(3)
        self.booster = None
        self.ratio_booster = None
        self.dense_anchor: dict[str, float] = {}  # geometry key -> measured dense ms
        self.geometries: dict[str, Geometry] = {}  # by layer name
        self.features: dict[str, list[float]] = {}  # by record key
        self.meta: dict = {}
        self._target_spec = target_spec
        self._predictions: dict[tuple, float] = {}

    # -- features
    @property
    def target_spec(self):
        if self._target_spec is None:
            from npas_tvm.targets import resolve_target

            self._target_spec = resolve_target(self.target)
        return self._target_spec

    def geometry(self, layer) -> Geometry:
        found = self.geometries.get(layer.name)
        if found is not None and tuple(found.weight_shape) == tuple(layer.weight_shape):
            return found
        return layer_geometry(layer)

    def feature_vector(self, geometry: Geometry, spec: SchemeSpec) -> np.ndarray:
        key = record_key(geometry, spec, self.target, self.threads)
        cached = self.features.get(key)
        if cached is None:
            cached = list(compute_features(geometry, spec, self.target_spec, self.lanes,
                                           self.threads))
            self.features[key] = cached
        return np.asarray(cached, dtype=float)

    # -- prediction
    def _predict_vectors(self, vectors: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        vectors = np.atleast_2d(vectors)
        log_ms = _linear_basis(vectors) @ self.coef
        if self.booster is not None:
            log_ms = log_ms + self.booster.predict(xgb.DMatrix(vectors))
        return np.exp(log_ms)

    def predict_layer(self, layer, spec: SchemeSpec) -> float:
        """Predicted ms of one layer (an ``npas_tvm.layers.Layer``) pruned with ``spec``.

        A layer whose dense time was measured is predicted as that time times the
        predicted sparse/dense ratio (exactly the measurement when dense); other layers
        by the absolute model."""
        memo = (layer.name, tuple(layer.weight_shape), _spec_key(spec))
        found = self._predictions.get(memo)
        if found is None:
            geometry = self.geometry(layer)
            found = self.scale * self._kernel_ms(
                geometry.key(), spec.scheme == "dense",
                lambda: self.feature_vector(geometry, spec))
            self._predictions[memo] = found
        return found

    def predict_record(self, record: dict) -> float:
        """Predicted ms of a measured record's kernel timed alone (no ``scale``): for
        checking the model against measurements it was not trained on."""
        return self._kernel_ms(Geometry.from_json(record["geometry"]).key(),
                               record["spec"].get("scheme") == "dense",
                               lambda: np.asarray(record["features"], dtype=float))

    def _kernel_ms(self, geometry_key: str, dense: bool, vector) -> float:
        """A kernel's isolated ms: the measured dense time (times the predicted ratio
        when sparse) where the layer has one, else the absolute model; ``vector()``
        gives the features, computed only when needed."""
        anchor = self.dense_anchor.get(geometry_key)
        if anchor is not None and dense:
            return anchor
        if anchor is not None and self.ratio_booster is not None:
            return anchor * self._predict_ratio(vector(), anchor)
        return float(self._predict_vectors(vector())[0])

    def _predict_ratio(self, vector: np.ndarray, dense_ms: float) -> float:
        import xgboost as xgb

        row = _ratio_inputs(np.atleast_2d(vector), np.array([dense_ms]))
        return float(np.exp(self.ratio_booster.predict(xgb.DMatrix(row))[0]))

    def predict_layers(self, layers, plan: Plan) -> list[float]:
        return [self.predict_layer(layer, plan.spec_for(layer.name)) for layer in layers]

    def predict_plan(self, layers, plan: Plan) -> float:
        """Predicted ms of the model: its layers under ``plan`` plus ``base_ms``."""
        return float(sum(self.predict_layers(layers, plan)) + self.base_ms)

    # -- training
    def fit(self, vectors: np.ndarray, times_ms: np.ndarray, seed: int = 0) -> "LatencyModel":
        import xgboost as xgb
        from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBConfig

        vectors = np.asarray(vectors, dtype=float)
        target = np.log(np.maximum(np.asarray(times_ms, dtype=float), 1e-6))
        basis = _linear_basis(vectors)
        self.coef = np.linalg.lstsq(basis, target, rcond=None)[0]
        residual = target - basis @ self.coef
        params = XGBConfig(seed=seed, nthread=1).to_dict()
        params.update(objective="reg:squarederror", verbosity=0)
        self.booster = xgb.train(params, xgb.DMatrix(vectors, label=residual),
                                 num_boost_round=XGB_ROUNDS)
        self._predictions.clear()
        return self

    def fit_ratio(self, vectors: np.ndarray, times_ms: np.ndarray, dense_ms: np.ndarray,
                  seed: int = 0) -> "LatencyModel":
        """Fit log(sparse ms / the same layer's dense ms) on the features and the dense
        time, with XGBoost constrained to predict a higher rate no slower (monotone in the
        rate features). The ratio transfers across layers far better than absolute
        time: it is mostly the kernel's efficiency at that rate and block."""
        import xgboost as xgb
        from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBConfig

        rows = _ratio_inputs(np.asarray(vectors, dtype=float), np.asarray(dense_ms))
        label = np.log(np.maximum(times_ms, 1e-6) / np.maximum(dense_ms, 1e-6))
        params = XGBConfig(seed=seed, nthread=1).to_dict()
        constraints = [0] * rows.shape[1]
        constraints[1], constraints[2], constraints[3] = 1, -1, 1  # log kept, rate, 1/rate
        params.update(objective="reg:squarederror", verbosity=0,
                      monotone_constraints="(" + ",".join(map(str, constraints)) + ")")
        self.ratio_booster = xgb.train(params, xgb.DMatrix(rows, label=label),
                                       num_boost_round=XGB_ROUNDS)
        self._predictions.clear()
        return self

    # -- persistence
    def save(self, path: str) -> str:
        data = {"format": FORMAT, "target": self.target, "threads": self.threads,
                "lanes": self.lanes, "base_ms": self.base_ms, "scale": self.scale, "coef": list(self.coef),
                "booster": (bytes(self.booster.save_raw("json")).decode()
                            if self.booster is not None else None),
                "ratio_booster": (bytes(self.ratio_booster.save_raw("json")).decode()
                                  if self.ratio_booster is not None else None),
                "dense_anchor": self.dense_anchor,
                "geometries": {name: g.to_json() for name, g in self.geometries.items()},
                "features": self.features, "meta": self.meta}
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        return path

    @classmethod
    def load(cls, path: str) -> "LatencyModel":
        import xgboost as xgb

        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as err:
            raise LatencyError(f"{path}: cannot read the latency model ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LatencyError(f"{path}: not a latency model (format {FORMAT!r})")
        model = cls(data["target"], threads=data["threads"], lanes=data["lanes"])
        model.base_ms = float(data["base_ms"])
        model.scale = float(data.get("scale", 1.0))
        model.coef = np.asarray(data["coef"], dtype=float)
        if data.get("booster"):
            model.booster = xgb.Booster()
            model.booster.load_model(bytearray(data["booster"].encode()))
        if data.get("ratio_booster"):
            model.ratio_booster = xgb.Booster()
            model.ratio_booster.load_model(bytearray(data["ratio_booster"].encode()))
        model.dense_anchor = {k: float(v) for k, v in data.get("dense_anchor", {}).items()}
        model.geometries = {name: Geometry.from_json(g) for name, g in data["geometries"].items()}
        model.features = data.get("features", {})
        model.meta = data.get("meta", {})
        return model


def compute_features(geometry: Geometry, spec: SchemeSpec, target_spec, lanes: int,
                     threads: int, kernel: LayerKernel | None = None) -> np.ndarray:
    """Descriptors followed by the kernel's TIR features (zeros where not extracted)."""
    tir = np.zeros(TIR_FEATURES + 1)
    if target_spec.tvm_target.kind.name == "llvm":
        with contextlib.redirect_stdout(io.StringIO()):
            kernel = kernel or layer_kernel(geometry, spec, target_spec)
        tir = tir_features(kernel.kernel, target_spec.tvm_target)
    return np.concatenate([descriptor_features(geometry, spec, lanes, threads), tir])


# ------------------------------------------------------------------ records


def read_records(path: str) -> dict[str, dict]:
    """The records of a JSON-lines file by key (a torn last line is skipped)."""
    records = {}
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
    return records


def _append(path: str, records: Iterable[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def sample_pairs(layers, space: dict[str, list[SchemeSpec]], samples: int | None,
                 seed: int = 0) -> list[tuple]:
    """(layer, spec) pairs to measure: every layer's dense spec first, then sparse actions
    round-robin over the layers (each layer's actions shuffled), up to ``samples``."""
    rng = random.Random(seed)
    pairs = [(layer, DenseSpec()) for layer in layers]
    queues = []
    for layer in layers:
        actions = [spec for spec in space[layer.name] if spec.scheme != "dense"]
        rng.shuffle(actions)
        queues.append((layer, actions))
    rng.shuffle(queues)
    sparse = []
    for index in range(max((len(a) for _, a in queues), default=0)):
        sparse += [(layer, actions[index]) for layer, actions in queues if index < len(actions)]
    limit = None if samples is None else max(samples - len(pairs), 0)
    return pairs + sparse[:limit]


def _threads_for(target_spec, rpc_tracker) -> int:
    from npas_tvm.runtime import ensure_thread_env

    return ensure_thread_env() if not rpc_tracker else 0


def _check_device(target_spec, rpc_tracker, rpc_key) -> None:
    if bool(rpc_tracker) != bool(rpc_key):
        raise LatencyError("--rpc-tracker and --rpc-key go together")
    if not target_spec.runs_on_host and not rpc_tracker:
        raise LatencyError(f"target {target_spec.name} does not run here: measure it on a "
                           "device with --rpc-tracker HOST:PORT --rpc-key KEY")


def measure_records(pairs: Sequence[tuple], geometries: dict[str, Geometry], target_spec,
                    records_path: str, *, threads: int, lanes: int, rpc_tracker=None,
                    rpc_key=None, progress: bool = True) -> dict[str, dict]:
    """Measure the pairs not yet in ``records_path``, appending each batch; returns all
    records of the file."""
    from tqdm import tqdm

    from npas_tvm import tuning

    records = read_records(records_path)
    todo, seen = [], set()
    for layer, spec in pairs:
        geometry = geometries[layer.name]
        key = record_key(geometry, spec, target_spec.name, threads)
        if key not in records and key not in seen:
            seen.add(key)
            todo.append((key, layer, geometry, spec))
    if not todo:
        return records
    if target_spec.tvm_target.kind.name != "llvm":
        raise LatencyError(f"target {target_spec.name}: layer records are measured for CPU "
                           "(llvm) targets only")
    where = f"device {rpc_key!r} via {rpc_tracker}" if rpc_tracker else \
        f"this machine, TVM_NUM_THREADS={threads}"
    bar = tqdm(total=len(todo), unit="record", desc=f"latency records ({where})",
               disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), CHUNK):
            chunk = todo[start:start + CHUNK]
            built = []
            for key, layer, geometry, spec in chunk:
                with contextlib.redirect_stdout(io.StringIO()):
                    kernel = layer_kernel(geometry, spec, target_spec)
                built.append(kernel)
            int_args = {k.args_key: k.int_args for k in built if k.int_args}
            measurer = tuning.Measurer(target_spec, rpc_tracker, rpc_key, int_args)
            results = measurer.measure([k.kernel for k in built])
            new = []
            for (key, layer, geometry, spec), kernel, (secs, error) in zip(chunk, built, results):
                if secs is None:
                    if rpc_tracker and tuning._is_device_fault(error or ""):
                        raise LatencyError(f"device {rpc_key!r} via {rpc_tracker}: {error}")
                    continue  # a kernel that fails to run is left out of training
                features = compute_features(geometry, spec, target_spec, lanes, threads,
                                            kernel)
                new.append({"key": key, "target": target_spec.name, "threads": threads,
                            "geometry": geometry.to_json(), "spec": spec.to_json(),
                            "ms": 1e3 * min(secs), "family": kernel.family,
                            "layer": layer.name, "features": list(map(float, features))})
            _append(records_path, new)
            records.update({r["key"]: r for r in new})
            bar.update(len(chunk))
    finally:
        bar.close()
    return records


# ------------------------------------------------------------------ whole models


def _resolve_plan(plan, layers, target_spec) -> Plan:
    from npas_tvm.plan import load_plan, validate_plan

    if isinstance(plan, Plan):
        return plan
    if plan in (None, "dense"):
        return Plan()
    if plan == "rule":
        from search.rule_mapper import RuleTarget, rule_plan

        return rule_plan(layers, 3.0, RuleTarget.for_spec(target_spec))
    loaded = load_plan(str(plan))
    validate_plan(loaded, layers, str(plan))
    return loaded


def measure_plan_ms(model_path: str, plan, target: str = "host", *, rpc_tracker=None,
                    rpc_key=None, repeat: int = 10, number: int = 5) -> float:
    """End to end: prune with ``plan`` (a Plan, a plan path, ``rule`` or ``dense``),
    build as ``compile --npas`` does, and time the model (median of ``repeat`` timings of
    ``number`` runs each, after warm-up)."""
    return _measure_model(model_path, plan, target, rpc_tracker=rpc_tracker,
                          rpc_key=rpc_key, repeat=repeat, number=number)[0]


LAYER_OP_KINDS = ("conv", "depthwise conv", "dense")
"""``npas_tvm.profile.op_kind``s of the layers' own kernels."""


def _measure_model(model_path: str, plan, target: str = "host", *, rpc_tracker=None,
                   rpc_key=None, repeat: int = 10, number: int = 5,
                   profile: bool = False) -> tuple[float, float | None]:
    """(median ms, ms of the layers' kernels in a per-op profile, or None)."""
    from npas_tvm.compiler import compile_model, export
    from npas_tvm.layers import load_model_layers
    from npas_tvm.plan import save_plan
    from npas_tvm.runtime import TVMRunner
    from npas_tvm.sparse_compile import compile_sparse
    from npas_tvm.targets import resolve_target

    target_spec = resolve_target(target)
    _check_device(target_spec, rpc_tracker, rpc_key)
    _threads_for(target_spec, rpc_tracker)
    model, layers = load_model_layers(model_path)
    plan = _resolve_plan(plan, layers, target_spec)
    with tempfile.TemporaryDirectory(prefix="npas-latency-") as directory:
        pruned = any(spec.scheme != "dense" for spec in
                     (plan.spec_for(layer.name) for layer in layers))
        with contextlib.redirect_stdout(io.StringIO()):
            if pruned:
                plan_path = save_plan(plan, os.path.join(directory, "plan.json"))
                executable, _ = compile_sparse(model, target_spec, plan_path, None,
                                               os.path.join(directory, "model.so"),
                                               table=False)
            else:
                executable = compile_model(model, target_spec)
        inputs = model.random_inputs()
        names = list(model.input_shapes)
        if rpc_tracker:
            from npas_tvm.device import request_session

            path = export(executable, os.path.join(directory, "model.so"), target_spec)
            session = request_session(rpc_tracker, rpc_key)
            session.upload(path)
            library = session.load_module(os.path.basename(path))
            device = session.cl() if target_spec.is_gpu else session.cpu()
            runner = TVMRunner(library, names, device)
        else:
            runner = TVMRunner(executable, names)
        median = runner.time(inputs, number=number, repeat=repeat, warmup=3).median_ms
        layer_ms = None
        if profile and not rpc_tracker:
            from npas_tvm.profile import profile_vm

            report = profile_vm(runner.vm, runner.tensors(inputs), repeat=max(repeat, 5))
            layer_ms = sum(ms for kind, ms in report.by_kind().items()
                           if kind in LAYER_OP_KINDS)
        return median, layer_ms


def _model_record_key(model_path: str, target: str, threads: int) -> str:
    with open(model_path, "rb") as handle:
        digest = hashlib.sha1(handle.read()).hexdigest()[:16]
    return f"model-{digest}-{target}-{threads}"


# ------------------------------------------------------------------ building


def train(records: Iterable[dict], seed: int = 0, target: str = "host", threads: int = 1,
          lanes: int = 4, target_spec=None) -> LatencyModel:
    """A model fitted on layer records (from :func:`read_records`)."""
    layer_records = [r for r in records if "features" in r]
    if len(layer_records) < 2:
        raise LatencyError("too few layer records to train a latency model")
    model = LatencyModel(target, target_spec, threads, lanes)
    vectors = np.array([r["features"] for r in layer_records])
    model.fit(vectors, np.array([r["ms"] for r in layer_records]), seed)
    for record in layer_records:
        model.features[record["key"]] = record["features"]
    model.dense_anchor = {}
    for record in layer_records:
        if record["spec"].get("scheme") == "dense":
            model.dense_anchor[Geometry.from_json(record["geometry"]).key()] = record["ms"]
    paired = [(r, model.dense_anchor.get(Geometry.from_json(r["geometry"]).key()))
              for r in layer_records if r["spec"].get("scheme") != "dense"]
    paired = [(r, anchor) for r, anchor in paired if anchor is not None]
    if len(paired) >= 2:
        model.fit_ratio(np.array([r["features"] for r, _ in paired]),
                        np.array([r["ms"] for r, _ in paired]),
                        np.array([anchor for _, anchor in paired]), seed)
    return model


def build_latency_model(model_path: str, target: str = "host", work_dir: str = "latency",
                        *, samples: int | None = None, rpc_tracker: str | None = None,
                        rpc_key: str | None = None, progress: bool = True, seed: int = 0,
                        records: str | None = None, log=print) -> LatencyModel:
    """Measure, train and save (``work_dir/latency_model.json``) the latency model of
    ``model_path`` on ``target``: see the module docstring. ``samples`` caps the layer
    records measured for this model (default :data:`DEFAULT_SAMPLES`; every layer's
    dense record comes first); ``records`` is the JSON-lines file (default
    ``work_dir/latency_records.jsonl``), which several models may share."""
    from npas_tvm.layers import load_model_layers
    from npas_tvm.targets import resolve_target
    from search.rule_mapper import RuleTarget
    from search.space import search_space

    started = time.perf_counter()
    target_spec = resolve_target(target)
    _check_device(target_spec, rpc_tracker, rpc_key)
    threads = _threads_for(target_spec, rpc_tracker)
    lanes = max(int(target_spec.simd_lanes or 4), 4)
    records_path = records or os.path.join(work_dir, RECORDS_FILE)
    model, layers = load_model_layers(model_path)
    geometries = model_geometries(model.proto, layers)
    space = search_space(layers, RuleTarget.for_spec(target_spec))
    pairs = sample_pairs(layers, space, DEFAULT_SAMPLES if samples is None else samples, seed)
    log(f"latency model of {model_path} on {target} "
        f"({'device ' + repr(rpc_key) if rpc_tracker else f'{threads} threads here'}): "
        f"{len(layers)} layers, {sum(len(a) for a in space.values())} actions, "
        f"{len(pairs)} records wanted, records in {records_path}")
    all_records = measure_records(pairs, geometries, target_spec, records_path,
                                  threads=threads, lanes=lanes, rpc_tracker=rpc_tracker,
                                  rpc_key=rpc_key, progress=progress)
    base_key = _model_record_key(model_path, target_spec.name, threads)
    base = all_records.get(base_key)
    if base is None:
        dense_ms, layer_ms = _measure_model(model_path, "dense", target,
                                            rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                                            profile=True)
        base = {"key": base_key, "model": os.path.basename(model_path), "dense_ms": dense_ms,
                "layers_ms": layer_ms}
        _append(records_path, [base])
    ours = [r for r in all_records.values()
            if "features" in r and r.get("target") == target_spec.name
            and r.get("threads") == threads]
    latency = train(ours, seed, target_spec.name, threads, lanes, target_spec)
    latency.geometries = geometries
    calibrate(latency, layers, float(base["dense_ms"]), base.get("layers_ms"))
    latency.meta = {"model": os.path.abspath(model_path), "records": len(ours),
                    "dense_ms": float(base["dense_ms"]), "samples": len(pairs)}
    path = latency.save(os.path.join(work_dir, MODEL_FILE))
    log(f"trained on {len(ours)} records; dense model {base['dense_ms']:.3f} ms measured, "
        f"non-prunable remainder {latency.base_ms:.3f} ms, in-model / isolated kernel "
        f"time {latency.scale:.2f}; saved {path} "
        f"({time.perf_counter() - started:.0f} s)")
    return latency


def calibrate(model: LatencyModel, layers, dense_ms: float, layers_ms: float | None) -> None:
    """Set ``scale`` and ``base_ms`` from the dense model's measured time ``dense_ms``
    and the time its layers' kernels took in a per-op profile (``layers_ms``).

    A kernel timed alone (its inputs hot in cache, the thread pool warm) and the same
    kernel inside the model differ by a roughly constant factor: ``scale`` (the
    profile's layer time over the predicted dense layers) carries it over, and
    ``base_ms`` is the rest of the model (``dense_ms - layers_ms``: pooling,
    elementwise and layout kernels, the VM). Without a profile (a remote device)
    ``scale`` is 1 and ``base_ms`` the difference, which may be negative. Either way the
    dense plan is predicted as measured."""
    model.scale, model.base_ms = 1.0, 0.0
    model._predictions.clear()  # pylint: disable=protected-access
    predicted = sum(model.predict_layer(layer, DenseSpec()) for layer in layers)
    if layers_ms:
        model.scale = layers_ms / max(predicted, 1e-9)
        model.base_ms = dense_ms - layers_ms
    else:
        model.base_ms = dense_ms - predicted
    model._predictions.clear()  # pylint: disable=protected-access


def load_or_build(model_path: str, target: str, work_dir: str, **kwargs) -> LatencyModel:
    """The work dir's model if it was built for this model file and target, else build."""
    path = os.path.join(work_dir, MODEL_FILE)
    if os.path.exists(path):
        model = LatencyModel.load(path)
        if model.target == target and model.meta.get("model") == os.path.abspath(model_path):
            return model
    return build_latency_model(model_path, target, work_dir, **kwargs)
