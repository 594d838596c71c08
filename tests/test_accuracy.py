"""The accuracy evaluator and its data loaders: masks hold after fine-tuning (magnitude and
ADMM), the dense checkpoint resumes, the exported ONNX matches torch and keeps the masks,
and user ONNX models go through onnx2torch. Small: vgg_cifar at 16x16 on a few hundred
digits, one short epoch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from npas_tvm.layers import load_model_layers  # noqa: E402
from npas_tvm.plan import Plan  # noqa: E402
from npas_tvm.schemes import satisfies, spec_from_json  # noqa: E402
from search.accuracy import AccuracyEvaluator, fast_settings, torch_model_for  # noqa: E402
from search.data import DataError, Dataset, load_dataset  # noqa: E402
from search.rule_mapper import rule_plan, uniform_plan  # noqa: E402
from search.space import plan_from_choices, search_space  # noqa: E402

SHAPE = (3, 16, 16)


# ---------------------------------------------------------------- data


def test_digits_shape_range_classes():
    data = load_dataset("digits", SHAPE, val_fraction=0.25, seed=3)
    assert data.x_train.shape[1:] == SHAPE and data.x_train.dtype == torch.float32
    assert data.y_train.dtype == torch.int64 and data.num_classes == 10
    assert len(data.y_train) + len(data.y_val) == 1797
    assert abs(len(data.y_val) / 1797 - 0.25) < 0.01
    assert set(data.y_val.tolist()) == set(range(10))  # stratified
    assert abs(float(data.x_train.mean())) < 1e-3 and abs(float(data.x_train.std()) - 1) < 1e-2
    assert torch.equal(data.x_train[:, 0], data.x_train[:, 2])  # gray replicated
    again = load_dataset("digits", SHAPE, val_fraction=0.25, seed=3)
    assert torch.equal(again.y_train, data.y_train)


def test_npz_sources(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 10, 10, 3), dtype=np.uint8)  # NHWC uint8
    y = np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    data = load_dataset(str(tmp_path / "xy.npz"), (1, 8, 8))
    assert data.x_train.shape[1:] == (1, 8, 8) and data.num_classes == 4
    assert len(data.y_val) == 8
    np.savez(tmp_path / "split.npz", x_train=x[:30].transpose(0, 3, 1, 2), y_train=y[:30],
             x_val=x[30:].transpose(0, 3, 1, 2), y_val=y[30:])
    split = load_dataset(str(tmp_path / "split.npz"), (3, 12, 12))
    assert len(split.y_train) == 30 and len(split.y_val) == 10
    assert split.x_val.shape == (10, 3, 12, 12)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 256, (9 + i, 11, 3), dtype=np.uint8)  # mixed sizes
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = load_dataset(str(tmp_path), SHAPE)
    assert data.num_classes == 2 and len(data.y_train) + len(data.y_val) == 6
    assert data.x_train.shape[1:] == SHAPE and set(data.y_val.tolist()) == {0, 1}


@pytest.mark.parametrize("make, words", [
    (lambda p: str(p / "missing"), "no such file"),
    (lambda p: (np.savez(p / "a.npz", images=np.zeros((4, 8, 8))), str(p / "a.npz"))[1],
     "expected arrays 'x' and 'y'"),
    (lambda p: ((p / "t.npz").write_text("hello"), str(p / "t.npz"))[1], "not a readable"),
    (lambda p: ((p / "empty").mkdir(), str(p / "empty"))[1], "no class sub-folders"),
    (lambda p: (np.savez(p / "b.npz", x=np.zeros((4, 8, 8)), y=np.zeros(3, int)),
                str(p / "b.npz"))[1], "one label per image"),
])
def test_bad_sources_are_one_line_errors(tmp_path, make, words):
    source = make(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(source, SHAPE)
    message = str(err.value)
    assert "\n" not in message and source in message and words in message


# ---------------------------------------------------------------- the evaluator


def _small_digits(count: int = 360) -> Dataset:
    data = load_dataset("digits", SHAPE)
    return Dataset(data.x_train[:count], data.y_train[:count], data.x_val[:120],
                   data.y_val[:120], data.num_classes, "digits-small")


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """vgg_cifar at 16x16: the evaluator (dense model trained one short epoch, checkpointed)
    and the model's prunable layers from its ONNX export."""
    from npas_tvm.zoo import export_onnx

    work = tmp_path_factory.mktemp("vgg")
    data = _small_digits()
    model, names = torch_model_for("vgg_cifar", data.num_classes)
    evaluator = AccuracyEvaluator(model, names, data, epochs=1, threads=2, progress=False)
    checkpoint = str(work / "dense.pt")
    evaluator.train_dense(epochs=1, checkpoint=checkpoint)
    onnx_path = export_onnx(torch_model_for("vgg_cifar", 10)[0], str(work / "vgg.onnx"),
                            (1, *SHAPE))
    _, layers = load_model_layers(onnx_path)
    return evaluator, layers, checkpoint, work


def _check_masks(state_dict, names, plan, layers):
    checked = 0
    for layer in layers:
        spec = plan.spec_for(layer.name)
        if spec.scheme == "dense":
            continue
        weight = state_dict[names[layer.name]].numpy()
        if weight.shape != tuple(layer.weight_shape):  # stored as in ONNX, [in, out]
            weight = layer.to_scheme_layout(weight)
        assert satisfies(weight, spec), (layer.name, spec)
        checked += 1
    return checked


def test_zoo_names_are_the_onnx_plan_keys(vgg):
    evaluator, layers, _, _ = vgg
    assert set(evaluator.weight_names) == {layer.name for layer in layers}


def test_fast_settings_are_evaluator_arguments(vgg):
    evaluator, _, _, _ = vgg
    for name in ("vgg_cifar", "mobilenet_v2"):
        AccuracyEvaluator(evaluator.model, evaluator.weight_names, evaluator.data,
                          progress=False, **fast_settings(name))
    assert fast_settings("model.onnx") == {}


def test_masks_hold_after_magnitude_fine_tune(vgg):
    evaluator, layers, _, _ = vgg
    plan = rule_plan(layers, 3.0)
    result = evaluator.evaluate(plan)
    assert 0 <= result.accuracy <= 1 and result.epochs == 1 and result.seconds > 0
    assert _check_masks(result.state_dict, evaluator.weight_names, plan, layers) >= 5


def test_evaluate_is_deterministic(vgg):
    evaluator, layers, _, _ = vgg
    plan = uniform_plan(layers, 5.0)
    first = evaluator.evaluate(plan, epochs=1, steps_per_epoch=2)
    second = evaluator.evaluate(plan, epochs=1, steps_per_epoch=2)
    assert first.accuracy == second.accuracy
    for key, value in first.state_dict.items():
        assert torch.equal(second.state_dict[key], value), key


@settings(max_examples=3, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_masks_hold_for_any_plan_of_the_space(vgg, data):
    evaluator, layers, _, _ = vgg
    space = search_space(layers)
    choices = [data.draw(st.integers(0, len(actions) - 1), label=name)
               for name, actions in space.items()]
    plan = plan_from_choices(space, choices)
    result = evaluator.evaluate(plan, epochs=1)
    _check_masks(result.state_dict, evaluator.weight_names, plan, layers)


def test_admm_returns_a_masked_model(vgg):
    evaluator, layers, _, _ = vgg
    admm = AccuracyEvaluator(evaluator.model, evaluator.weight_names, evaluator.data,
                             method="admm", epochs=1, admm_epochs=1, steps_per_epoch=2,
                             progress=False)
    admm.use_current_as_dense()
    admm._base = evaluator._base
    plan = uniform_plan(layers, 5.0)
    result = admm.evaluate(plan)
    assert _check_masks(result.state_dict, evaluator.weight_names, plan, layers) >= 5


def test_dense_checkpoint_resumes(vgg, monkeypatch):
    evaluator, _, checkpoint, _ = vgg
    model, names = torch_model_for("vgg_cifar", 10, seed=7)
    again = AccuracyEvaluator(model, names, evaluator.data, progress=False)

    def no_training(*args, **kwargs):
        raise AssertionError("trained instead of loading the checkpoint")

    monkeypatch.setattr(again, "_train_epoch", no_training)
    assert again.train_dense(epochs=1, checkpoint=checkpoint) == evaluator.dense_accuracy
    for key, value in evaluator._base.items():
        assert torch.equal(again._base[key], value)


def test_export_onnx_round_trip(vgg):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    evaluator, layers, _, work = vgg
    plan = rule_plan(layers, 3.0)
    result = evaluator.evaluate(plan, epochs=1)
    path = evaluator.export_onnx(result.state_dict, str(work / "pruned.onnx"), (1, *SHAPE))
    model, _ = torch_model_for("vgg_cifar", 10)
    model.load_state_dict(result.state_dict)
    x = evaluator.data.x_val[:1]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    checked = 0
    for layer in layers:
        spec = plan.spec_for(layer.name)
        if spec.scheme != "dense":
            assert satisfies(layer.to_scheme_layout(weights[layer.name]), spec), layer.name
            checked += 1
    assert checked >= 5


def test_onnx_model_through_onnx2torch(tmp_path):
    import importlib.util

    if importlib.util.find_spec("onnx2torch") is None:
        pytest.skip("onnx2torch is not installed (pip install --no-deps onnx2torch)")
    from tests.onnx_graphs import make_graph

    g = make_graph((1, 3, 12, 12))
    g.conv(16)
    g.op("Relu")
    g.conv(32, kernel=1)
    g.op("Relu")
    g.flatten()
    g.gemm(10, transposed=False)  # a MatMul weight, stored [in, out]
    path = g.save(tmp_path / "small.onnx")
    model, names = torch_model_for(path, 10)
    assert set(names) == {"conv1.weight", "conv2.weight", "fc3.weight"}
    data = load_dataset("digits", (3, 12, 12))
    data = Dataset(data.x_train[:128], data.y_train[:128], data.x_val[:64], data.y_val[:64],
                   10, "digits-tiny")
    evaluator = AccuracyEvaluator(model, names, data, epochs=1, progress=False)
    evaluator.use_current_as_dense()
    plan = Plan(layers={
        "conv1.weight": spec_from_json({"scheme": "pattern", "rate": 2.25}),
        "conv2.weight": spec_from_json({"scheme": "block_based", "rate": 2.0, "block": [4, 4]}),
        "fc3.weight": spec_from_json({"scheme": "unstructured", "rate": 2.0})})
    result = evaluator.evaluate(plan)
    _, layers = load_model_layers(path)
    assert _check_masks(result.state_dict, names, plan, layers) == 3
    # Exported back under the original ONNX names, the same function.
    import onnxruntime as ort

    out = evaluator.export_onnx(result.state_dict, str(tmp_path / "out.onnx"), (1, 3, 12, 12))
    _, exported = load_model_layers(out)
    assert [layer.name for layer in exported] == [layer.name for layer in layers]
    model.load_state_dict(result.state_dict)
    with torch.no_grad():
        expected = model.eval()(data.x_val[:1]).numpy()
    got = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(
        None, {"input": data.x_val[:1].numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_unconvertible_or_missing_models_are_clear_errors(tmp_path):
    from npas_tvm.errors import NpasError

    with pytest.raises(NpasError, match="neither a zoo model"):
        torch_model_for(str(tmp_path / "nothing.onnx"), 10)
