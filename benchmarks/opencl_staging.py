"""The gathered-tap conv on an OpenCL GPU with and without its input tile staged in
``__local`` memory (``GpuScheduleConfig.stage_input``).

Two steps, since the GPU machine need not have TVM:

    python benchmarks/opencl_staging.py export DIR       # here: TVM, PoCL
    python benchmarks/opencl_staging.py time DIR OUT.json  # on the GPU: numpy, pyopencl
    python benchmarks/opencl_staging.py report OUT.json   # the table, and the JSON it keeps

``export`` lowers each layer (MobileNetV2 / ResNet-18 shapes, block-punched 3x3 or
block-based 1x1 at each rate) for Adreno both ways, checks both on PoCL against
onnxruntime, and writes each sparse kernel's OpenCL source, launch grid and argument
arrays, with the proxy figures (global loads issued per variant). ``time`` builds
each kernel with the first GPU platform's driver and reports the median of repeated
launches after a warm-up (event timestamps, so no host overhead), and checks the two
variants' outputs agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, kind, in channels, out channels, input size, kernel), as benchmarks/kernels.py
LAYERS = [
    ("resnet18 conv3x3 64->64 @56", "conv", 64, 64, 56, 3),
    ("resnet18 conv3x3 128->128 @28", "conv", 128, 128, 28, 3),
    ("resnet18 conv3x3 256->256 @14", "conv", 256, 256, 14, 3),
    ("resnet18 conv3x3 512->512 @7", "conv", 512, 512, 7, 3),
    ("mobilenet_v2 conv1x1 24->144 @56", "conv", 24, 144, 56, 1),
    ("mobilenet_v2 conv1x1 96->576 @14", "conv", 96, 576, 14, 1),
    ("mobilenet_v2 conv1x1 320->1280 @7", "conv", 320, 1280, 7, 1),
]
RATES = (3.0, 5.0)


def proxy_loads(counts, pixels: int, out_w: int, block: int, per_group: int,
                chunk: int) -> dict:
    """Global loads (4-byte words) the kernel issues, per variant.

    Unstaged, every work-item (a pixel x a ``float4`` of the block) loads, per tap, the
    input value, the tap's 3 index words and a ``float4`` of weights. Staged, the input
    value and its 3 index words are loaded once per (pixel, tap) of the chunk, by the
    group; the work-items then read the value from ``__local`` memory (weights as
    before). The staged tap loop runs whole chunks (the last one padded)."""
    import numpy as np

    counts = np.asarray(counts, np.int64)
    vectors = block // 4 if block % 4 == 0 else block
    rows = pixels // out_w
    groups_per_row = -(-out_w // per_group)
    chunks = -(-counts // chunk) * chunk
    weight_words = int(counts.sum()) * block * pixels
    input_unstaged = int(counts.sum()) * pixels * vectors * 4
    staged_pixels = rows * groups_per_row * per_group  # a ragged last group loads all
    input_staged = int(chunks.sum()) * staged_pixels * 4
    return {"input_loads_unstaged_mb": 4 * input_unstaged / 1e6,
            "input_loads_staged_mb": 4 * input_staged / 1e6,
            "weight_loads_mb": 4 * weight_words / 1e6,
            "loads_unstaged_mb": 4 * (input_unstaged + weight_words) / 1e6,
            "loads_staged_mb": 4 * (input_staged + weight_words) / 1e6}


def export(work: str, rates=RATES, device: str = "adreno") -> None:
    import numpy as np

    from benchmarks.opencl_proxy import measure
    from npas_tvm.opencl_runner import OpenCLModel
    from tir_schedules.sparse_gpu import GpuScheduleConfig, _per_group

    os.makedirs(work, exist_ok=True)
    captured = {}
    original = OpenCLModel.launch

    def launch(self, func_name, args):
        kernels = self.kernels_of(func_name)
        if any("sparse" in k.name for k in kernels):
            captured["call"] = (kernels, [np.array(a) for a in args],
                                [p.name for p in self.vm_mod[func_name].params])
        original(self, func_name, args)

    OpenCLModel.launch = launch
    index = []
    config = GpuScheduleConfig()
    try:
        for layer in LAYERS:
            scheme = "block_based" if layer[5] == 1 else "block_punched"
            for rate in rates:
                for stage in (False, True):
                    row = measure(layer, scheme, rate, device, work, stage_input=stage)
                    kernels, args, params = captured.pop("call")
                    (kernel,) = kernels
                    runner_source = _kernel_source(_last_source[0], kernel.name)
                    case = f"{len(index):03d}"
                    arrays = dict(zip(params, args))
                    np.savez(os.path.join(work, case + ".npz"), **arrays)
                    counts = [a for n, a in arrays.items() if a.ndim == 1 and a.dtype == np.int32]
                    values = [a for a in arrays.values() if a.ndim == 3 and a.dtype == np.float32]
                    out = args[-1]
                    block, out_w = int(values[0].shape[2]), int(out.shape[3])
                    pixels = int(out.shape[2]) * out_w
                    per_group = _per_group(block, out_w, config.max_threads, False)
                    entry = {"case": case, "layer": layer[0], "scheme": scheme, "rate": rate,
                             "staged": row["staged"], "ok_pocl": row["ok"],
                             "max_rel_err_pocl": row["max_rel_err"], "kernel": kernel.name,
                             "buffers": list(kernel.buffers), "output": params[-1],
                             "global_size": list(kernel.global_size),
                             "local_size": list(kernel.local_size),
                             "source": runner_source, "block": block,
                             "per_group": per_group, "stage_taps": config.stage_taps,
                             "max_taps": int(values[0].shape[1]),
                             "mean_taps": float(np.mean(counts[0])),
                             **proxy_loads(counts[0], pixels, out_w, block, per_group,
                                           min(config.stage_taps, int(values[0].shape[1])))}
                    index.append(entry)
                    print(f"{layer[0]} {scheme} {rate:g}x staged={row['staged']} "
                          f"ok={row['ok']} local={kernel.local_size[0]}", flush=True)
    finally:
        OpenCLModel.launch = original
    with open(os.path.join(work, "index.json"), "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=1)


_last_source = [""]


def _remember_sources():
    """Keep the last runner's whole OpenCL source (the kernel is cut out of it)."""
    from npas_tvm.opencl_runner import OpenCLModel

    init = OpenCLModel.__init__

    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        _last_source[0] = self.source

    OpenCLModel.__init__ = wrapped


def _kernel_source(source: str, name: str) -> str:
    """The kernel ``name`` alone (with its prototype), from a whole program's source."""
    import re

    match = re.search(rf"__kernel\s+void\s+{name}\s*\([^)]*\)\s*\{{", source)
    end = source.find("__kernel", match.end())
    body = source[match.start():end if end >= 0 else len(source)]
    head = source[:source.find("__kernel")]  # pragmas and helpers before the first kernel
    return head + body


def time_cases(work: str, out: str, repeats: int = 50, warmup: int = 5) -> None:
    import platform

    import numpy as np
    import pyopencl as cl

    with open(os.path.join(work, "index.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    platform_ = next((p for p in cl.get_platforms()
                      if p.get_devices(device_type=cl.device_type.GPU)), None)
    if platform_ is None:
        raise SystemExit(f"no OpenCL GPU platform: {cl.get_platforms()}")
    device = platform_.get_devices(device_type=cl.device_type.GPU)[0]
    context = cl.Context([device])
    queue = cl.CommandQueue(context, properties=cl.command_queue_properties.PROFILING_ENABLE)
    results, outputs = [], {}
    for entry in index:
        arrays = dict(np.load(os.path.join(work, entry["case"] + ".npz")))
        program = cl.Program(context, entry["source"]).build()
        kernel = cl.Kernel(program, entry["kernel"])
        mf = cl.mem_flags
        buffers = {name: cl.Buffer(context, mf.READ_WRITE | mf.COPY_HOST_PTR,
                                   hostbuf=np.ascontiguousarray(arrays[name]))
                   for name in entry["buffers"]}
        args = [buffers[name] for name in entry["buffers"]]
        times = []
        for i in range(warmup + repeats):
            event = kernel(queue, tuple(entry["global_size"]), tuple(entry["local_size"]), *args)
            event.wait()
            if i >= warmup:
                times.append((event.profile.end - event.profile.start) * 1e-3)  # us
        result = np.empty_like(arrays[entry["output"]])
        cl.enqueue_copy(queue, result, buffers[entry["output"]])
        queue.finish()
        key = (entry["layer"], entry["rate"])
        if key in outputs:
            agree = float(np.max(np.abs(outputs[key] - result)) /
                          max(float(np.max(np.abs(outputs[key]))), 1e-12))
        else:
            outputs[key], agree = result, 0.0
        row = {k: entry[k] for k in entry if k not in ("source", "buffers")}
        row.update(median_us=float(np.median(times)), min_us=float(np.min(times)),
                   repeats=repeats, warmup=warmup, rel_diff_vs_unstaged=agree)
        results.append(row)
        print(f"{entry['layer']} {entry['rate']:g}x staged={entry['staged']} "
              f"{row['median_us']:.1f} us (rel diff {agree:.1e})", flush=True)
    machine = {"device": device.name, "driver": device.driver_version,
               "platform": f"{platform_.name} {platform_.version}",
               "compute_units": device.max_compute_units,
               "local_mem_bytes": device.local_mem_size,
               "host": platform.node(), "python": platform.python_version(),
               "pyopencl": cl.VERSION_TEXT}
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"machine": machine, "settings": {"repeats": repeats, "warmup": warmup,
                                                    "timer": "OpenCL event profiling"},
                   "rows": results}, handle, indent=1)
    print(json.dumps(machine))


def report(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    print(data["machine"], data["settings"])
    print("| layer | rate | unstaged us | staged us | staged/unstaged | input loads MB "
          "unstaged -> staged | all loads MB unstaged -> staged |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = data["rows"]
    for plain, staged in zip(rows[::2], rows[1::2]):
        print(f"| {plain['layer']} | {plain['rate']:g}x | {plain['median_us']:.1f} | "
              f"{staged['median_us']:.1f} | {staged['median_us'] / plain['median_us']:.2f} | "
              f"{plain['input_loads_unstaged_mb']:.1f} -> {plain['input_loads_staged_mb']:.1f} | "
              f"{plain['loads_unstaged_mb']:.1f} -> {plain['loads_staged_mb']:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("export")
    p.add_argument("dir")
    p.add_argument("--rates", nargs="+", type=float, default=list(RATES))
    p = sub.add_parser("time")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--repeats", type=int, default=50)
    p = sub.add_parser("report")
    p.add_argument("json")
    args = parser.parse_args(argv)
    if args.step == "export":
        _remember_sources()
        export(args.dir, tuple(args.rates))
    elif args.step == "time":
        time_cases(args.dir, args.out, args.repeats)
    else:
        report(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
