"""The process the SIGKILL chaos tests kill: a zygote that imports finetrace once, then forks one child per
kill point. The child counts write events in the workspace and SIGKILLs itself at event N, so the kill
points are deterministic (the same inputs give the same event sequence), not timing-dependent.

Events: every open-for-writing, mkdir, rename/replace, remove, hard link and rmtree under the workspace
(Python audit hooks), and every ledger append, before and after it (SQLite writes are not audited).

    python chaos_child.py            reads lines "SCENARIO WORKSPACE N COUNT_FILE" on stdin, answers
                                     "rc EVENT" per line (rc -9: killed at event EVENT; 0: ran to the end)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Counter:
    def __init__(self, root: str, kill_at: int, count_file: str):
        self.root, self.kill_at, self.count_file, self.n, self.last = root + os.sep, kill_at, count_file, 0, ""

    def report(self, killed: bool) -> None:
        Path(self.count_file).write_text(json.dumps({"events": self.n, "last": self.last, "killed": killed}))

    def hit(self, what: str) -> None:
        self.n += 1
        self.last = what
        if self.n == self.kill_at:
            self.report(True)
            os.kill(os.getpid(), signal.SIGKILL)

    def audit(self, event: str, args) -> None:
        if event == "open":
            path, flags = args[0], args[2]
            if not (isinstance(flags, int) and flags & WRITE_FLAGS):
                return
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.rename"):
            path = args[0]
        elif event == "os.link":
            path = args[1]
        else:
            return
        path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
        if path.startswith(self.root):  # names relative to a dir_fd (inside rmtree) are not counted
            self.hit(f"{event} {path[len(self.root) :]}")


def wrap_ledger(counter: Counter) -> None:
    from finetrace.ledger.log import Ledger

    for name in ("append", "append_many", "add_artifact"):
        real = getattr(Ledger, name)

        def wrapped(self, *a, __real=real, __name=name, **kw):
            counter.hit(f"before ledger.{__name} {a[0] if a else ''}")
            out = __real(self, *a, **kw)
            counter.hit(f"after ledger.{__name} {a[0] if a else ''}")
            return out

        setattr(Ledger, name, wrapped)


def scenario(kind: str, root: str) -> None:
    from finetrace.workspace import Workspace

    spec = json.loads(Path(root, "..", "chaos.json").read_text())
    ws = Workspace.open(root)
    if kind == "import":
        from finetrace.data import import_dataset

        import_dataset(ws, spec["files"], "chaos", schema="completion", splits=(0.8, 0.2, 0.0))
    elif kind == "train":
        from finetrace.train import TrainConfig, train

        train(ws, TrainConfig(**spec["train"]), progress=False)
    ws.close()


def child(kind: str, root: str, kill_at: int, count_file: str) -> None:
    signal.alarm(180)  # bounded: a hung child dies by SIGALRM (the test then fails with rc -14)
    counter = Counter(os.path.realpath(root), kill_at, count_file)
    wrap_ledger(counter)
    sys.addaudithook(counter.audit)
    scenario(kind, root)
    counter.report(False)


def main() -> None:
    # import once, fork many (importing starts no threads); finetrace imports these lazily
    import matplotlib

    import finetrace.data  # noqa: F401
    import finetrace.train  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    for line in sys.stdin:
        kind, root, kill_at, count_file = line.split()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(kind, root, int(kill_at), count_file)
            except BaseException as exc:  # noqa: BLE001 - report, never return into the loop
                sys.stderr.write(f"child failed: {exc!r}\n")
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        sys.stdout.write(f"{rc}\n")
        sys.stdout.flush()
    os._exit(0)  # every child waited for; skip the interpreter's teardown (~3 s with torch loaded)


if __name__ == "__main__":
    main()
