"""Child process for the SIGKILL chaos tests: it imports finetrace once, then forks one grandchild per
request line, and the grandchild runs one publish or pull and SIGKILLs itself at write event N.

    stdin:  publish WORKSPACE REGISTRY TOKEN  TARGET KILL_AT
            pull    WORKSPACE REGISTRY KEY_ID REF    KILL_AT
    stdout: "<exit status> <events>" per line (status -9: killed; events: counted when it ran to the end)

A *write event* is each ledger append (inside its transaction), each fsync and rename (atomic writes,
the object store, the witnesses) and each HTTP request sent. KILL_AT=0 runs to the end, so the parent
can count the events and pick seeded kill points across every write window. This process stays
single-threaded, so forking it is safe.
"""

import os
import signal
import sys
import tempfile

import httpx

from finetrace.ledger.log import Ledger
from finetrace.market import client
from finetrace.workspace import Workspace

state = {"count": 0, "kill_at": 0}


def event() -> None:
    state["count"] += 1
    if state["count"] == state["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)


def hook(owner, name):
    original = getattr(owner, name)

    def wrapped(*a, **k):
        event()
        return original(*a, **k)

    setattr(owner, name, wrapped)


for owner, name in ((os, "fsync"), (os, "replace"), (os, "rename"), (httpx.Client, "send"), (Ledger, "_append_locked")):
    hook(owner, name)


def run(mode, workspace, registry, secret, ref, kill_at, out) -> None:
    state["kill_at"] = int(kill_at)
    ws = Workspace.open(workspace)
    if mode == "publish":
        client.publish(ws, "legal-lora", ref, registry, secret)
    else:
        client.pull(ws, ref, registry, trust_keys=[secret])
    ws.close()
    with open(out, "w") as fh:
        fh.write(str(state["count"]))


for line in sys.stdin:
    fd, out = tempfile.mkstemp()
    os.close(fd)
    pid = os.fork()
    if pid == 0:
        try:
            run(*line.split(), out)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as status 1
            sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    with open(out) as fh:
        count = fh.read() or "-1"
    os.unlink(out)
    print(code, count, flush=True)
os._exit(0)  # every grandchild waited for; skip the interpreter's teardown
