"""Resumable training checkpoints: safetensors and JSON only, atomic, with a completeness marker.

    <dir>/step-00000040/
        weights.safetensors     trainable parameters
        optimizer.safetensors   AdamW state tensors ("<param>::exp_avg", "::exp_avg_sq", "::step")
        rng.safetensors         torch CPU generator state (uint8)
        best.safetensors        best weights so far (early stopping only)
        state.json              step, data position, Python and NumPy RNG states (as JSON), history...
        COMPLETE                written last: format, step, SHA-256 of every file above

The folder is finetrace's own: it carries an ``OWNER`` marker, and finetrace deletes only what it wrote
there (``step-*`` and ``.build-*`` entries). A ``checkpoint_dir`` the user names gets a marked subfolder
``finetrace-train/``; a non-empty folder that holds anything else is refused, never emptied.

A checkpoint is built in a hidden temporary folder and renamed into place, so a folder named ``step-*``
appears whole or not at all. ``latest()`` returns the newest folder with a ``COMPLETE`` marker; ``load``
re-hashes every file against the marker, and a mismatch is an ``IntegrityError``, never a fresh start.
No pickle anywhere: RNG states are serialised as plain numbers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import fsync_dir, write_bytes
from ..canonical import canonical_json, sha256_file
from ..debris import scratch_prefix
from ..errors import ConfigError, IntegrityError, NotFoundError

FORMAT = "finetrace-train-checkpoint/1"
MARKER = "COMPLETE"
OWNER = ".finetrace-checkpoints"  # marks a folder finetrace created and may prune
SUBFOLDER = "finetrace-train"  # what finetrace owns inside a user-given checkpoint_dir
_OURS = re.compile(r"^(step-\d{8}|\.build-.*)$")


def checkpoint_folder(ws_root: Path, checkpoint_dir: str | None, output_name: str) -> Path:
    """Where a run's checkpoints go: the workspace's checkpoints/train/<name>, or a marked subfolder of
    the user's ``checkpoint_dir`` (finetrace never writes or deletes beside it)."""
    if checkpoint_dir:
        return Path(checkpoint_dir).expanduser() / SUBFOLDER
    return Path(ws_root) / "checkpoints" / "train" / output_name


# -- RNG states as JSON ------------------------------------------------------------------------------
def python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_rng_state(state: list) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


def numpy_rng_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_numpy_rng_state(state: list) -> None:
    np.random.set_state((state[0], np.array(state[1], dtype=np.uint32), state[2], state[3], state[4]))


class Checkpointer:
    """Checkpoints of one training configuration in ``folder``."""

    def __init__(self, folder: Path, config_digest: str, keep: int = 2, workspace: Path | None = None):
        self.folder = Path(folder)
        self.config_digest = config_digest
        self.keep = keep
        self.workspace = workspace  # whose lock names this process's scratch (see debris.py)

    def _build_prefix(self) -> str:
        return scratch_prefix(self.workspace, ".build-") if self.workspace else ".build-"

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.folder.is_dir():
            return []
        dirs = [
            d for d in self.folder.iterdir() if d.is_dir() and d.name.startswith("step-") and (d / MARKER).is_file()
        ]
        return sorted(dirs, key=lambda d: int(d.name.split("-", 1)[1]))

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def foreign(self) -> list[str]:
        """Entries of the folder that finetrace did not write (empty: the folder is ours or absent)."""
        if not self.folder.exists():
            return []
        if not self.folder.is_dir():
            return [self.folder.name]
        return sorted(e.name for e in self.folder.iterdir() if e.name != OWNER and not _OURS.match(e.name))

    def claim(self) -> None:
        """Create (or adopt) the folder and mark it; ConfigError if it holds anything finetrace did not write."""
        alien = self.foreign()
        if alien:
            raise ConfigError(
                f"checkpoint folder {self.folder} already holds files finetrace did not write "
                f"({', '.join(alien[:3])}{', ...' if len(alien) > 3 else ''})",
                field="checkpoint_dir",
                hint="give an empty or new folder; finetrace never deletes what it did not create",
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / OWNER).is_file():
            write_bytes(self.folder / OWNER, canonical_json({"format": FORMAT}))

    def clear(self) -> None:
        """Delete this folder's checkpoints (only what finetrace wrote; the folder too once empty)."""
        if not self.folder.is_dir():
            return
        self.claim()  # refuses a folder holding foreign files, before deleting anything
        for e in sorted(self.folder.iterdir()):
            if e.name.startswith("step-") and _OURS.match(e.name):
                self._discard(e)
            elif _OURS.match(e.name):
                shutil.rmtree(e, ignore_errors=True)
        (self.folder / OWNER).unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass  # something appeared meanwhile: leave it

    def save(self, step: int, weights: dict, optimizer, state: dict, best: dict | None = None) -> Path:
        """Write checkpoint ``step`` atomically and prune old ones; returns its folder."""
        import torch
        from safetensors.torch import save

        self.claim()
        build = Path(tempfile.mkdtemp(dir=self.folder, prefix=self._build_prefix()))
        try:
            files = {
                "weights.safetensors": save({k: v.detach().cpu().contiguous() for k, v in weights.items()}),
                "optimizer.safetensors": save(optimizer_tensors(weights, optimizer)),
                "rng.safetensors": save({"torch_cpu": torch.get_rng_state(), **cuda_rng_state(weights)}),
                "state.json": canonical_json(
                    {
                        **state,
                        "step": step,
                        "config_digest": self.config_digest,
                        "python_rng": python_rng_state(),
                        "numpy_rng": numpy_rng_state(),
                    }
                ),
            }
            if best is not None:
                files["best.safetensors"] = save({k: v.cpu().contiguous() for k, v in best.items()})
            for name, data in files.items():
                write_bytes(build / name, data)
            marker = {"format": FORMAT, "step": step, "files": {n: sha256_file(build / n) for n in sorted(files)}}
            write_bytes(build / MARKER, canonical_json(marker))  # last: the folder is now complete
            final = self.folder / f"step-{step:08d}"
            if final.exists():
                self._discard(final)
            build.rename(final)
            fsync_dir(self.folder)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        for old in self.complete()[: -self.keep]:
            self._discard(old)
        return final

    def _discard(self, step: Path) -> None:
        """Delete a checkpoint: renamed out of the step-* namespace first, so a kill midway never leaves a
        step-* folder without its marker (the renamed remains are scratch, removed by ``clear``)."""
        doomed = Path(tempfile.mkdtemp(dir=self.folder, prefix=self._build_prefix()))
        os.replace(step, doomed / step.name)
        shutil.rmtree(doomed, ignore_errors=True)

    def load(self, path: Path | None = None) -> dict:
        """Verify and read a checkpoint (default: the newest complete one)."""
        from safetensors.torch import load_file

        path = path or self.latest()
        if path is None:
            raise NotFoundError(
                f"no complete checkpoint in {self.folder} to resume from", hint="run without --resume to start fresh"
            )
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, ValueError) as exc:
            raise IntegrityError(f"checkpoint {path} has an unreadable completeness marker: {exc}") from None
        if marker.get("format") != FORMAT:
            raise IntegrityError(f"checkpoint {path} has format {marker.get('format')!r}, expected {FORMAT}")
        for name, digest in marker["files"].items():
            f = path / name
            if not f.is_file():
                raise IntegrityError(f"checkpoint {path} is missing {name}", hint="delete it or resume from another")
            if sha256_file(f) != digest:
                raise IntegrityError(
                    f"checkpoint file {f} is corrupt (its SHA-256 does not match {MARKER})",
                    hint="delete that checkpoint folder to resume from an older one",
                )
        try:
            state = json.loads((path / "state.json").read_text())
            out = {
                "path": path,
                "state": state,
                "weights": load_file(path / "weights.safetensors"),
                "optimizer": load_file(path / "optimizer.safetensors"),
                "rng": load_file(path / "rng.safetensors"),
                "best": load_file(path / "best.safetensors") if (path / "best.safetensors").is_file() else None,
            }
        except Exception as exc:  # unreadable despite matching hashes: still never a silent fresh start
            raise IntegrityError(f"checkpoint {path} cannot be read: {exc}") from None
        if state.get("config_digest") != self.config_digest:
            raise IntegrityError(
                f"checkpoint {path} was written by a different training config",
                hint="resume with the same config, or run without --resume",
            )
        return out


def optimizer_tensors(weights: dict, optimizer) -> dict:
    """AdamW state as named tensors."""
    out = {}
    for name, p in weights.items():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"{name}::{key}"] = value.detach().cpu().clone() if hasattr(value, "detach") else _scalar(value)
    return out


def cuda_rng_state(weights: dict) -> dict:
    """The CUDA generator of the device the weights live on (dropout there draws from it)."""
    import torch

    device = next(iter(weights.values())).device if weights else torch.device("cpu")
    return {"torch_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}


def _scalar(value):
    import torch

    return torch.tensor(float(value), dtype=torch.float32)


def restore(loaded: dict, weights: dict, optimizer) -> dict:
    """Put weights, optimiser state and every RNG back; returns the saved training state."""
    import torch

    with torch.no_grad():
        for name, p in weights.items():
            if name not in loaded["weights"]:
                raise IntegrityError(f"checkpoint {loaded['path']} lacks weight {name}")
            p.copy_(loaded["weights"][name])
    opt = loaded["optimizer"]
    for name, p in weights.items():
        # AdamW keeps its step counter on the CPU, the moments beside the parameter
        st = {
            k.split("::", 1)[1]: v.clone() if k.endswith("::step") else v.to(p.device)
            for k, v in opt.items()
            if k.split("::", 1)[0] == name
        }
        if st:
            optimizer.state[p] = st
    torch.set_rng_state(loaded["rng"]["torch_cpu"])
    if "torch_cuda" in loaded["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(loaded["rng"]["torch_cuda"], device=next(iter(weights.values())).device)
    state = loaded["state"]
    set_python_rng_state(state["python_rng"])
    set_numpy_rng_state(state["numpy_rng"])
    return state
