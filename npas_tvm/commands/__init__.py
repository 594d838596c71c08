"""CLI subcommands: one module each, with ``register(subparsers, common)``.

A new command is a module here plus its name in :data:`COMMANDS`.
"""

COMMANDS = ("compile", "targets", "zoo", "demo", "device", "bench", "profile", "plan", "prune",
            "inspect", "tune", "search", "latency")
