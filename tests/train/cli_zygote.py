"""A process that imports finetrace's training stack once, then forks one child per ``finetrace`` command.

The SIGKILL and SIGTERM tests need the training command in a process of its own (one they can kill), not a
fresh interpreter: starting one costs seconds of CPU importing torch, transformers and peft. Importing
starts no threads, so forking afterwards is safe (as in tests/core/chaos_child.py).

    python cli_zygote.py [MODULE...]
                            imports the training stack (and each MODULE, e.g. ``finetrace.serve.server``
                            for ``finetrace serve``), then reads lines '{"argv": [...], "out": PATH,
                            "err": PATH}' on stdin; for each, forks a child running
                            ``finetrace.cli.main(argv)`` (stdout and stderr to the files), answers "pid N"
                            at once and "rc R" when the child ends (R < 0: the signal that killed it)

The child ends as a ``finetrace`` process does: ``sys.exit(code)`` (atexit handlers run, threads it started
are joined), not ``os._exit``, so what a command leaves to interpreter exit is tested too.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys


def child(req: dict) -> int:
    """In the forked child: run the command with its output in the files; its exit status."""
    code = 1
    try:
        for fd, path in ((1, req["out"]), (2, req["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        from finetrace.cli import main as cli

        code = cli(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report, never return into the loop
        import traceback

        traceback.print_exc()
    return code


def main(preload: list[str]) -> None:
    from importlib.util import find_spec

    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    import finetrace.cli  # noqa: F401
    import finetrace.train  # noqa: F401

    if find_spec("bitsandbytes") is not None:
        import bitsandbytes  # noqa: F401
    for name in preload:
        importlib.import_module(name)

    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            sys.exit(child(req))  # leaves the loop: the interpreter exits as after a `finetrace` command
        sys.stdout.write(f"pid {pid}\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        sys.stdout.write(f"rc {rc}\n")
        sys.stdout.flush()
    # stdin closed, every child waited for: the zygote itself has nothing left to run at exit, and tearing
    # down an interpreter with torch, transformers and peft loaded takes ~3 s the test would wait for
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
