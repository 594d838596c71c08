"""npas-tvm: compiler-aware pruning for mobile CPUs and GPUs on TVM.

The package is the user-facing half of the project: the CLI, the targets, the plan
format, the model zoo and the compile driver. Graph passes live in ``relay_passes``,
kernels in ``tir_schedules`` and the pruning search in ``search``.
"""

__version__ = "0.1.0"
