"""Run a Relax model built for an OpenCL target on any OpenCL device (PoCL included).

TVM's pip runtime has OpenCL switched off, but TVM still generates the OpenCL C. This
runner lowers the model exactly as ``tvm.compile`` does for Mali/Adreno, takes each
kernel's source and launch grid (from the TIR thread bindings) and then interprets the
VM's ``main`` binding by binding: allocations become numpy arrays, each PrimFunc call
launches its kernels with ``pyopencl``. It is the way to check the generated OpenCL's
numerics without a phone; PoCL timings are not GPU timings.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np

_KERNEL_SIGNATURE = re.compile(r"__kernel\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{")


@dataclass(frozen=True)
class KernelLaunch:
    """One OpenCL kernel: its name, pointer arguments (buffer names) and NDRange."""

    name: str
    buffers: tuple[str, ...]  # "<buffer name>" for each "__global T* <name>_ptr", in order
    global_size: tuple[int, ...]
    local_size: tuple[int, ...]

    @property
    def work_items(self) -> int:
        return int(np.prod(self.global_size))


def _launch_dims(device_func) -> dict[str, int]:
    import tvm
    import tvm_ffi

    dims: dict[str, int] = {}

    def visit(node, visitor):
        if node.attr_key == "thread_extent":
            dims[node.node.thread_tag] = int(node.value)
        visitor.default_visit(node)

    tvm_ffi.structural_visit(device_func.body, [(tvm.tirx.AttrStmt, visit)])
    return dims


def _ndrange(dims: dict[str, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    local = tuple(dims.get(f"threadIdx.{axis}", 1) for axis in "xyz")
    groups = tuple(dims.get(f"blockIdx.{axis}", 1) for axis in "xyz")
    return tuple(g * t for g, t in zip(groups, local)), local


class OpenCLModel:
    """A Relax module lowered for an OpenCL ``target``, runnable through pyopencl.

    ``pipeline`` is the Relax pipeline (default: TVM's for the target, which needs the
    weights bound); npas-tvm's (``relay_passes.gpu.gpu_pipeline``) adds the sparse kernels.
    """

    def __init__(self, mod, target, pipeline=None):
        import tvm
        from tvm import relax

        with target:
            self.vm_mod = (pipeline or relax.get_default_pipeline(target))(mod)
        build = sys.modules["tvm.tirx.build"]
        tir_mod = tvm.tirx.transform.BindTarget(target.with_host(target.host))(
            relax.vm_build._filter_tir(self.vm_mod))
        pipeline, _, device_passes = tvm.tirx.get_tir_pipeline("default")
        _, device_mods = build.split_host_device_mods(pipeline(tir_mod))
        self.source = ""
        dims: dict[str, dict[str, int]] = {}
        for device_target, device_mod in device_mods.items():
            device_mod = device_passes()(device_mod)
            self.source += build.codegen_build(device_mod, device_target).inspect_source()
            for gvar, func in device_mod.functions_items():
                dims[gvar.name_hint] = _launch_dims(func)
        self.kernels: dict[str, KernelLaunch] = {}
        for match in _KERNEL_SIGNATURE.finditer(self.source):
            name, params = match.group(1), match.group(2)
            buffers = []
            for param in params.split(","):
                pointer = re.search(r"\*\s*(?:restrict\s+)?(\w+)_ptr\s*$", param.strip())
                if not pointer:
                    raise NotImplementedError(f"kernel {name}: scalar argument {param.strip()!r}"
                                              " (dynamic shapes are not supported)")
                buffers.append(pointer.group(1))
            global_size, local_size = _ndrange(dims[name])
            self.kernels[name] = KernelLaunch(name, tuple(buffers), global_size, local_size)
        self._context = None
        self.traffic: dict[str, int] = {}
        """Bytes of the buffers each kernel touched in the last run (every buffer read or
        written once: the compulsory traffic, the proxy for memory cost on a GPU)."""

    # ------------------------------------------------------------------ OpenCL side

    def _cl(self):
        if self._context is None:
            import pyopencl as cl

            platforms = cl.get_platforms()
            if not platforms:
                raise RuntimeError("no OpenCL platform (install pocl-opencl-icd)")
            context = cl.Context(platforms[0].get_devices())
            queue = cl.CommandQueue(context)
            program = cl.Program(context, self.source).build()
            self._context = (cl, context, queue, program, {})
        return self._context

    def kernels_of(self, func_name: str) -> list[KernelLaunch]:
        """The kernels a PrimFunc launches, in order (``f_kernel``, ``f_kernel_1``, ...)."""
        found = [k for n, k in self.kernels.items()
                 if n == f"{func_name}_kernel" or n.startswith(f"{func_name}_kernel_")]
        return sorted(found, key=lambda k: (len(k.name), k.name))

    def launch(self, func_name: str, args: list[np.ndarray]) -> None:
        """Run a PrimFunc's kernels on ``args`` (numpy, updated in place)."""
        cl, context, queue, program, kernel_cache = self._cl()
        prim_func = self.vm_mod[func_name]
        # TVM 0.27 PrimFunc parameters are the buffers themselves: same names.
        by_buffer = {param.name: index for index, param in enumerate(prim_func.params)}
        device = [cl.Buffer(context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                            hostbuf=np.ascontiguousarray(arg)) for arg in args]
        for launch in self.kernels_of(func_name):
            if launch.name not in kernel_cache:
                kernel_cache[launch.name] = cl.Kernel(program, launch.name)
            missing = [b for b in launch.buffers if b not in by_buffer]
            if missing:
                raise NotImplementedError(f"kernel {launch.name}: buffers {missing} are not "
                                          f"parameters of {func_name}")
            kernel_cache[launch.name](queue, launch.global_size, launch.local_size,
                                      *[device[by_buffer[b]] for b in launch.buffers])
            self.traffic[launch.name] = sum(int(np.asarray(args[by_buffer[b]]).nbytes)
                                            for b in set(launch.buffers))
        for arg, buffer in zip(args, device):
            cl.enqueue_copy(queue, arg, buffer)
        queue.finish()

    # ------------------------------------------------------------------ the VM's main

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Interpret ``main`` binding by binding; returns the flattened outputs."""
        import tvm
        from tvm import relax

        main = self.vm_mod["main"]
        env: dict = {param: np.ascontiguousarray(value, dtype=str(param.ty.dtype))
                     for param, value in zip(main.params, inputs)}

        def value_of(expr):
            if isinstance(expr, tvm.ir.GenericConst):
                return expr.value.numpy()
            if isinstance(expr, relax.ShapeExpr):
                return tuple(int(v) for v in expr.values)
            return env[expr]

        for block in main.body.blocks:
            for binding in block.bindings:
                call = binding.value
                if isinstance(call, relax.Tuple):
                    env[binding.var] = tuple(value_of(f) for f in call.fields)
                    continue
                if isinstance(call, relax.TupleGetItem):
                    env[binding.var] = value_of(call.tuple_value)[call.index]
                    continue
                if not isinstance(call, relax.Call):
                    env[binding.var] = value_of(call)
                    continue
                op = call.op
                name = getattr(op, "name", None) or getattr(op, "global_symbol", None)
                if isinstance(op, tvm.ir.GlobalVar):
                    args = [value_of(a) for a in call.args]
                    self.launch(op.name_hint, args)
                elif name == "relax.vm.alloc_tensor":
                    env[binding.var] = np.zeros(value_of(call.args[2]), str(binding.var.ty.dtype))
                elif name == "vm.builtin.reshape":
                    env[binding.var] = value_of(call.args[0]).reshape(value_of(call.args[1]))
                elif name in ("relax.vm.alloc_storage", "relax.vm.kill_object",
                              "relax.null_value", "vm.builtin.check_tensor_info",
                              "vm.builtin.match_shape"):
                    continue
                else:
                    raise NotImplementedError(f"OpenCL runner: binding {binding.var.name} "
                                              f"calls {name or op}")
        result = value_of(main.body.body)
        return list(result) if isinstance(result, tuple) else [result]
