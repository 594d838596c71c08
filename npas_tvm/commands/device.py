"""``npas-tvm device tracker|emulate-arm|list|stop``: RPC devices on loopback."""

from __future__ import annotations

LOOPBACK = "127.0.0.1"


def register(subparsers, common) -> None:
    parser = subparsers.add_parser("device", parents=[common],
                                   help="RPC tracker and the emulated ARM device")
    actions = parser.add_subparsers(dest="device_action", required=True, metavar="ACTION")

    tracker = actions.add_parser("tracker", parents=[common],
                                 help="start TVM's RPC tracker in the background")
    tracker.add_argument("--host", help="address to bind (default 127.0.0.1; another address "
                                        "must be given explicitly)")
    tracker.add_argument("--port", type=int, default=9190)
    tracker.set_defaults(func=run_tracker)

    emulate = actions.add_parser("emulate-arm", parents=[common],
                                 help="start an emulated aarch64 device (qemu-user) "
                                      "registered with a tracker")
    emulate.add_argument("--tracker", default=f"{LOOPBACK}:9190", help="HOST:PORT")
    emulate.add_argument("--key", default="arm-emu", help="device key at the tracker")
    emulate.add_argument("--host", help="address the RPC server binds (default 127.0.0.1)")
    emulate.add_argument("--port", type=int, default=9091)
    emulate.set_defaults(func=run_emulate)

    actions.add_parser("list", parents=[common], help="what this machine started").set_defaults(
        func=run_list)

    stop = actions.add_parser("stop", parents=[common], help="stop started servers")
    stop.add_argument("name", nargs="?", default="all",
                      help="a device key, a tracker HOST:PORT, or all (default)")
    stop.set_defaults(func=run_stop)


def _bind_host(args) -> str:
    from npas_tvm.device import check_bind_host

    host = args.host or LOOPBACK
    check_bind_host(host, explicit=args.host is not None)
    return host


def run_tracker(args) -> int:
    from npas_tvm.device import start_tracker

    started = start_tracker(_bind_host(args), args.port)
    print(f"tracker listening on {started.address} (pid {started.pid}, log {started.log})")
    print(f"stop it with: npas-tvm device stop {started.name}")
    return 0


def run_emulate(args) -> int:
    from npas_tvm.device import start_emulated_arm

    started = start_emulated_arm(args.tracker, args.key, _bind_host(args), args.port)
    print(f"emulated aarch64 device registered as {args.key!r} at {args.tracker} "
          f"(pid {started.pid}, log {started.log}); timings under emulation mean nothing")
    print(f"stop it with: npas-tvm device stop {args.key}")
    return 0


def run_list(args) -> int:
    from npas_tvm.device import find_started

    rows = find_started()
    for started in rows:
        state = "running" if started.alive() else "dead"
        print(f"{started.kind:<11} {started.name:<20} pid {started.pid:<8} {state:<8} "
              f"{started.address}")
    if not rows:
        print("nothing started")
    return 0


def run_stop(args) -> int:
    from npas_tvm.device import DeviceError, find_started, stop_started

    targets = [s for s in find_started() if args.name in ("all", s.name)]
    if not targets and args.name != "all":
        raise DeviceError(f"nothing started under the name {args.name!r} "
                          "(see `npas-tvm device list`)")
    for started in targets:
        stop_started(started)
        print(f"stopped {started.kind} {started.name} (pid {started.pid})")
    return 0
