"""``npas-tvm targets``: the named targets and what was detected about this CPU."""

from __future__ import annotations


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("targets", parents=[common], help="list the named targets")
    parser.set_defaults(func=run)


def run(args) -> int:
    from npas_tvm.targets import TARGETS, detect_host_cpu

    width = max(len(name) for name in TARGETS)
    for name, (description, _) in TARGETS.items():
        print(f"{name:<{width}}  {description}")
    print(f"{'JSON':<{width}}  any TVM target as a JSON object, e.g. "
          '\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}\'')
    print(f"\nthis machine: {detect_host_cpu().describe()}")
    return 0
