"""Helpers shared by the train tests (a module of its own: conftest modules of sibling folders clash)."""

from __future__ import annotations


def make_config(**kw):
    from finetrace.train import TrainConfig

    base = dict(
        base_model="tiny",
        dataset="toy",
        output_name="toy-lora",
        batch_size=4,
        max_steps=6,
        lr=5e-3,
        checkpoint_every=None,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


class Zygote:
    """``cli_zygote.py`` started once: ``start(argv, tmp)`` forks a ``finetrace`` command from it.
    ``preload``: modules the commands import beyond the training stack (imported once, in the zygote)."""

    def __init__(self, preload: tuple[str, ...] = ()):
        import os
        import subprocess
        import sys
        from pathlib import Path

        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_zygote.py")), *preload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def start(self, argv: list[str], tmp) -> Forked:
        import json

        out, err = tmp / "child.out", tmp / "child.err"
        self.proc.stdin.write(json.dumps({"argv": argv, "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("pid "), f"the zygote died: {line!r}"
        return Forked(self, int(line.split()[1]), out, err)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Forked:
    """The part of ``subprocess.Popen`` the kill tests use, for a child of the zygote."""

    def __init__(self, zygote: Zygote, pid: int, out, err):
        self.zygote, self.pid, self.out, self.err, self.returncode = zygote, pid, out, err, None

    def poll(self, timeout: float = 0.0):
        import select

        if self.returncode is None and select.select([self.zygote.proc.stdout], [], [], timeout)[0]:
            line = self.zygote.proc.stdout.readline()
            assert line.startswith("rc "), f"the zygote died: {line!r}"
            self.returncode = int(line.split()[1])
        return self.returncode

    def send_signal(self, sig) -> None:
        import os

        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        import subprocess

        if self.poll(timeout if timeout is not None else 3600) is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self.out.read_bytes(), self.err.read_bytes()
