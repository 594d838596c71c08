"""npas-tvm: compiler-aware pruning (NPAS) for mobile CPUs and GPUs, on TVM."""

from setuptools import find_packages, setup

setup(
    name="npas-tvm",
    version="0.1.0",
    description="Compiler-aware pruning search and sparse code generation for mobile DNNs on TVM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["npas_tvm", "npas_tvm.*", "relay_passes", "relay_passes.*",
                                    "tir_schedules", "tir_schedules.*", "search", "search.*"]),
    install_requires=[
        # 0.27 is the newest TVM; ffi 0.1.15.x segfaults in IR serialization and tuning.
        "apache-tvm==0.27.0.post1",
        "apache-tvm-ffi==0.1.14.post1",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "numpy>=1.26",
        "torch==2.13.0",
        "xgboost-cpu>=2.0",
        "scikit-learn>=1.4",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "psutil>=5.9",  # meta_schedule
        "cloudpickle>=3.0",  # meta_schedule
        "tornado>=6.0",  # TVM's RPC tracker
    ],
    extras_require={
        # MNN: a peer engine of the benchmark suite (its converter runs isolated, see
        # benchmarks/engines.py: the pip wrapper's telemetry never runs).
        "test": ["pytest>=8", "hypothesis>=6.100", "pyopencl>=2024.1", "MNN==3.6.1"],
        "bench": ["MNN==3.6.1"],
        # The search fine-tunes user ONNX models through onnx2torch, which is not listed:
        # it requires torchvision, and PyPI's torchvision wheels do not load with the CPU
        # torch pinned above. `pip install --no-deps onnx2torch` (as .ci/setup does): it
        # imports torchvision only for NMS / RoiAlign, which search/accuracy.py stubs out.
    },
    entry_points={"console_scripts": ["npas-tvm=npas_tvm.cli:main"]},
)
