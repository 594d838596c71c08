"""The named compilation targets and the host CPU detection.

Every named target lives in :data:`TARGETS`, one row each with a one-line description;
``npas-tvm targets`` prints the table. A target given as JSON (TVM's dict form) is
accepted too. TVM 0.27 silently builds generic code for ``mcpu=native`` or any name its
LLVM does not know, so the host CPU is detected explicitly (LLVM's host CPU name,
checked against LLVM's CPU list, else an ``x86-64-vN`` level from ``/proc/cpuinfo``)
and reported with its SIMD width.
"""

from __future__ import annotations

import functools
import json
import platform
import shutil
from dataclasses import dataclass
from typing import Callable

from npas_tvm.errors import TargetError

AARCH64_CROSS_CC = "aarch64-linux-gnu-gcc"


@dataclass(frozen=True)
class CpuInfo:
    """What was detected about the machine we compile on."""

    llvm_cpu: str  # the -mcpu given to LLVM
    source: str  # how it was found ("llvm host cpu" or "cpuinfo flags")
    simd: str  # "avx512", "avx2", "sse", "neon"
    fp32_lanes: int  # fp32 elements per SIMD register
    model_name: str  # what the OS calls the processor

    def describe(self) -> str:
        return (f"{self.model_name}: mcpu={self.llvm_cpu} ({self.source}), "
                f"{self.simd}, {self.fp32_lanes} fp32 lanes")


@dataclass(frozen=True)
class TargetSpec:
    """A resolved target: the TVM target plus how its artifact is linked and run."""

    name: str
    description: str
    tvm_target: "object"  # tvm.target.Target
    cross_compiler: str | None  # None: link with the host's compiler
    runs_on_host: bool  # the artifact can be loaded and run on this machine
    simd_lanes: int  # fp32 lanes of the CPU side (kernel tile choice)

    @property
    def is_gpu(self) -> bool:
        return "gpu" in list(self.tvm_target.keys)

    @property
    def family(self) -> str:
        """Schedule family: "x86", "arm" or "opencl" (a target differs in its schedule)."""
        return schedule_family(self.tvm_target)


def schedule_family(tvm_target) -> str:
    """"x86", "arm" or "opencl" for a ``tvm.target.Target`` (None: the host, x86)."""
    if tvm_target is None:
        return "x86"
    if tvm_target.kind.name == "opencl":
        return "opencl"
    return "arm" if "arm_cpu" in list(tvm_target.keys) else "x86"


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=None)
def detect_host_cpu() -> CpuInfo:
    """Detect the host CPU for LLVM: a named CPU LLVM knows, else an ISA level."""
    from tvm.target import Target, codegen

    model, flags = _cpuinfo()
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        name = codegen.llvm_get_system_cpu()
        return CpuInfo(name or "generic", "llvm host cpu", "neon", 4, model)
    if "avx512f" in flags:
        simd, lanes, level = "avx512", 16, "x86-64-v4"
    elif "avx2" in flags and "fma" in flags:
        simd, lanes, level = "avx2", 8, "x86-64-v3"
    else:
        simd, lanes, level = "sse", 4, "x86-64-v2"
    name = codegen.llvm_get_system_cpu()
    known = set(codegen.llvm_get_cpu_archlist(Target("llvm")))
    if name and name != "generic" and name in known:
        # Trust LLVM's name only when it agrees with the OS on the widest SIMD.
        probe = Target({"kind": "llvm", "mcpu": name})
        want = {"avx512": ["avx512f"], "avx2": ["avx2", "fma"], "sse": ["sse4.2"]}[simd]
        if codegen.llvm_cpu_has_features(want, probe):
            return CpuInfo(name, "llvm host cpu", simd, lanes, model)
    return CpuInfo(level, "cpuinfo flags", simd, lanes, model)


def _host() -> TargetSpec:
    from tvm.target import Target

    cpu = detect_host_cpu()
    return TargetSpec("host", "", Target({"kind": "llvm", "mcpu": cpu.llvm_cpu}), None,
                      True, cpu.fp32_lanes)


def _arm_cpu() -> TargetSpec:
    from tvm.target import Target

    tgt = Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    return TargetSpec("arm-cpu", "", tgt, _cross_cc_for("aarch64-linux-gnu"), False, 4)


def _opencl(device: str) -> Callable[[], TargetSpec]:
    def make() -> TargetSpec:
        from tvm.target import Target

        tgt = Target({"kind": "opencl", "device": device,
                      "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                               "mattr": ["+neon"]}})
        return TargetSpec(device, "", tgt, _cross_cc_for("aarch64-linux-gnu"), False, 4)

    return make


# name -> (one-line description, factory). The one table of named targets.
TARGETS: dict[str, tuple[str, Callable[[], TargetSpec]]] = {
    "host": ("LLVM for this machine's CPU (detected; x86-64 AVX2/AVX-512 or aarch64)", _host),
    "arm-cpu": ("LLVM aarch64-linux-gnu +neon, cross-linked with aarch64-linux-gnu-gcc "
                "(ARM phones and boards)", _arm_cpu),
    "mali": ("OpenCL for ARM Mali GPUs, aarch64-linux-gnu host side", _opencl("mali")),
    "adreno": ("OpenCL for Qualcomm Adreno GPUs, aarch64-linux-gnu host side "
               "(pass --cc with an NDK clang for Android)", _opencl("adreno")),
}


def _cross_cc_for(triple: str) -> str | None:
    """The compiler that links an artifact for ``triple`` on this machine (None: host cc)."""
    host_arch = platform.machine()
    arch = triple.split("-")[0]
    if arch in (host_arch, "") or (arch == "x86_64" and host_arch == "x86_64"):
        return None
    if arch in ("aarch64", "arm64"):
        return AARCH64_CROSS_CC
    raise TargetError(f"target triple {triple!r}: no cross compiler known; pass --cc")


def resolve_target(spec: str) -> TargetSpec:
    """A named target from :data:`TARGETS`, or a TVM target given as a JSON object."""
    if spec in TARGETS:
        description, factory = TARGETS[spec]
        resolved = factory()
        return TargetSpec(spec, description, resolved.tvm_target, resolved.cross_compiler,
                          resolved.runs_on_host, resolved.simd_lanes)
    if not spec.lstrip().startswith("{"):
        raise TargetError(f"--target {spec!r}: unknown target; choose one of "
                          f"{', '.join(TARGETS)} or give a TVM target as JSON")
    try:
        config = json.loads(spec)
    except json.JSONDecodeError as err:
        raise TargetError(f"--target: invalid JSON ({err.msg} at column {err.colno})") from None
    from tvm.target import Target

    try:
        tgt = Target(config)
    except Exception as err:  # TVM raises ValueError/TVMError with a long message
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise TargetError(f"--target: TVM rejected the target JSON: {first}") from None
    cpu_side = tgt.host if tgt.host is not None else tgt
    triple = str(cpu_side.attrs.get("mtriple", "")) if cpu_side.kind.name == "llvm" else ""
    cross = _cross_cc_for(triple) if triple else None
    runs_here = cross is None and tgt.kind.name == "llvm"
    lanes = 4 if "arm_cpu" in list(cpu_side.keys) else detect_host_cpu().fp32_lanes
    return TargetSpec("custom", "TVM target from JSON", tgt, cross, runs_here, lanes)


def check_cross_compiler(spec: TargetSpec, override: str | None = None) -> str | None:
    """The linker to use for ``spec``; fails clearly when it is not installed."""
    cc = override or spec.cross_compiler
    if cc and shutil.which(cc) is None:
        raise TargetError(f"target {spec.name}: linker {cc!r} not found (install Debian's "
                          "gcc-aarch64-linux-gnu, or pass --cc)")
    return cc
