"""Checkpoint files that survive a killed process, and safe loading.

Plugged in by the ``masksub`` command and usable with your own Trainer (with the callbacks of
:mod:`masksub_lightning.callbacks.checkpoints`)::

    import lightning as L
    from masksub_lightning.callbacks import AlwaysLastCheckpoint
    from masksub_lightning.training.checkpoint_io import AtomicCheckpointIO

    trainer = L.Trainer(
        plugins=[AtomicCheckpointIO()],
        callbacks=[AlwaysLastCheckpoint(monitor="val_acc1", mode="max", save_last=True)],
    )

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file in the destination directory, fsyncs it
  and renames it over the target (``os.replace``), so a process killed while saving leaves the previous file
  intact and loadable. (Lightning's own writer stages the file in ``$TMPDIR`` and, when that is another file
  system, copies it over the target: a kill mid-copy leaves a truncated checkpoint and no old one.) It loads with
  ``weights_only=True`` unless told otherwise, so a tampered file cannot run code when resumed from.
* :func:`check_output_dir` and :func:`checkpoint_size_estimate`: a log or checkpoint directory that cannot be
  written, or has no room for a checkpoint, is found before training starts.
* :func:`load_checkpoint_file` and :func:`load_from_checkpoint` (``MaskSubModule.load_from_checkpoint``) load with
  ``weights_only=True`` and turn "this file is not a safe / complete checkpoint" into one clear error.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pickle
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import WeightAveraging

try:  # the decorator Lightning uses so that `model.load_from_checkpoint(...)` on an instance raises
    from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
except ImportError:  # pragma: no cover - older / newer Lightning
    _restricted_classmethod = classmethod

__all__ = [
    "TMP_SUFFIX",
    "AtomicCheckpointIO",
    "CheckpointLoadError",
    "CheckpointSpaceError",
    "OutputDirError",
    "check_output_dir",
    "checkpoint_size_estimate",
    "load_checkpoint_file",
    "load_from_checkpoint",
    "remove_stale_temp_files",
]

#: Suffix of the temporary files :class:`AtomicCheckpointIO` writes (``.<target name>.<host>-<pid>-<random>`` +
#: this). Only files ending in it are ever cleaned up, so nothing else in a checkpoint directory is touched.
TMP_SUFFIX = ".masksub.tmp"
_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"


class CheckpointLoadError(ValueError):
    """A file is not a checkpoint that can be loaded safely and completely."""


class OutputDirError(ValueError):
    """A log or checkpoint directory cannot be written, or has no room for a checkpoint."""


class CheckpointSpaceError(OSError):
    """The disk filled up while a checkpoint was written; the partial file is gone, ``path`` is untouched."""

    def __init__(self, path: str) -> None:
        previous = (
            "previous checkpoint intact" if os.path.exists(path) else "no previous checkpoint at that path"
        )
        super().__init__(
            errno.ENOSPC,
            f"no space left on device writing {path}; {previous} (the partial file was removed): free space there "
            "or set checkpoint.dirpath to a larger drive, then resume from the last checkpoint",
        )


# --------------------------------------------------------------------------------------------------- writing
def _fsync_dir(dirpath: str) -> None:
    """Make a rename durable: without it a power cut can leave the directory entry pointing at the old file."""
    if os.name != "posix":
        return
    fd = os.open(dirpath, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves ``path`` half written.

    The bytes go to ``.<name>.<host>-<pid>-<random>.masksub.tmp`` next to ``path`` (the same file system, so the
    final rename is atomic), are fsynced, and the file is renamed over ``path``. If anything fails, including a
    KeyboardInterrupt, the temporary file is removed and ``path`` is untouched; a SIGKILL can leave the temporary
    file behind, never a truncated ``path`` (:func:`remove_stale_temp_files` clears such leftovers).
    """
    path = os.fspath(path)
    dirpath = os.path.dirname(os.path.abspath(path))
    os.makedirs(dirpath, exist_ok=True)
    tmp = os.path.join(
        dirpath, f".{os.path.basename(path)}.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    )
    # O_EXCL: never write through a file someone else created; mode 0o666 lets the umask apply as for any file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if _out_of_space(err):
            raise CheckpointSpaceError(path) from err
        raise
    _fsync_dir(dirpath)


def _out_of_space(err: BaseException) -> bool:
    """A full disk, as the OS reports it or as torch's zip writer does (it checks positions, not errno)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and any(
        text in str(err) for text in ("unexpected pos", "No space left")
    )


def remove_stale_temp_files(dirpath: str | os.PathLike, max_age_s: float = 24 * 3600) -> list[str]:
    """Delete temporary files of :func:`atomic_torch_save` that no running save owns; return their paths.

    A file is stale when the process that wrote it is gone (same host) or, for files written on another host
    (a shared file system), when it is older than ``max_age_s``. Files of live processes are left alone: two runs
    may share a directory.
    """
    removed = []
    try:
        entries = list(os.scandir(dirpath))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX)) or not entry.is_file():
            continue
        owner = entry.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]  # <host>-<pid>-<random>
        host, _, rest = owner.partition("-")
        pid_text = rest.partition("-")[0]
        if host == _HOST and pid_text.isdigit():
            stale = int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))
        else:
            try:
                stale = time.time() - entry.stat().st_mtime > max_age_s
            except FileNotFoundError:
                continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.remove(entry.path)
                removed.append(entry.path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# --------------------------------------------------------------------------------------------------- loading
def load_checkpoint_file(
    path: str | os.PathLike | IO[bytes],
    map_location: Any = "cpu",
    weights_only: bool = True,
    load: Callable[..., Any] | None = None,
    mmap: bool = False,
) -> Any:
    """Load a checkpoint with ``weights_only=True``; unsafe, truncated or non-checkpoint files raise one clear error.

    Args:
        path: the file (or an open binary file).
        map_location: as for ``torch.load``.
        weights_only: keep True for any file you did not write yourself: unpickling arbitrary objects can run code.
        load: the loader to call as ``load(path, map_location=..., weights_only=...)`` (default ``torch.load``).
        mmap: map the file instead of reading it (to look at its metadata only; a local file).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointLoadError: the file holds objects ``weights_only`` refuses (the message says why that matters),
            or it is truncated / not a torch checkpoint at all.
    """
    name = getattr(path, "name", path)
    if isinstance(path, (str, os.PathLike)) and _is_local_file_protocol(path) and not Path(path).exists():
        raise FileNotFoundError(f"checkpoint file not found: {name}")
    if load is None:
        load = functools.partial(torch.load, mmap=True) if mmap else torch.load
    try:
        return load(path, map_location=map_location, weights_only=weights_only)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, OSError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)) or (
            # Other RuntimeErrors (e.g. a CUDA tensor on a machine without CUDA) are not about the file.
            type(err) is RuntimeError and "PytorchStreamReader" not in str(err)
        ):
            raise
        raise _load_error(name, err) from err


def _load_error(name: Any, err: BaseException) -> CheckpointLoadError:
    """The one-line error for a file ``torch.load`` refused (unsafe) or could not parse (truncated, not torch)."""
    if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        what = (
            f"a reference to {found.group(1)}" if found else "objects other than tensors and plain containers"
        )
        return CheckpointLoadError(
            f"{name} is not a safe checkpoint: it holds {what}, which weights_only=True loading refuses because "
            "unpickling it could run arbitrary code; the file was not loaded (if you wrote it yourself and trust "
            "it, load it with torch.load(..., weights_only=False) and re-save only its tensors)"
        )
    return CheckpointLoadError(
        f"{name} is not a complete torch checkpoint (truncated, or another kind of file): {_first_line(err)}"
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: crash-safe writes in the destination directory, ``weights_only`` loading.

    ``Trainer(plugins=[AtomicCheckpointIO()])``. Local paths are written by :func:`atomic_torch_save` (temporary
    file next to the target, fsync, ``os.replace``); remote URLs (``s3://``, ...) fall back to Lightning's writer.
    ``load_checkpoint`` defaults to ``weights_only=True`` (also when the ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    environment variable is set); an explicit ``Trainer.fit(..., weights_only=False)`` is still honoured.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            atomic_torch_save(checkpoint, path)
        except CheckpointSpaceError:
            raise
        except OSError as err:
            raise OSError(
                err.errno,
                f"could not write checkpoint {path} ({err.strerror or err}); the previous file at that path, if "
                "any, is unchanged",
            ) from err

    def load_checkpoint(
        self,
        path: Any,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        weights_only = True if weights_only is None else weights_only
        parent = super().load_checkpoint

        def load(p: Any, map_location: Any, weights_only: bool) -> Any:
            return parent(p, map_location=map_location, weights_only=weights_only)

        return load_checkpoint_file(path, map_location=map_location, weights_only=weights_only, load=load)


@_restricted_classmethod
def load_from_checkpoint(
    cls: type[LightningModule],
    checkpoint_path: Any,
    map_location: Any = None,
    hparams_file: Any = None,
    strict: bool | None = None,
    weights_only: bool | None = True,
    **kwargs: Any,
) -> Any:
    """``LightningModule.load_from_checkpoint`` with ``weights_only=True`` by default and a one-line error.

    Assigned as ``MaskSubModule.load_from_checkpoint``: Lightning's passes ``weights_only=None`` to ``torch.load``,
    which is safe on torch >= 2.6 only as long as ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is not set.
    """
    base = LightningModule.__dict__["load_from_checkpoint"].__func__
    try:
        return base(cls, checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)
    except pickle.UnpicklingError as err:  # Lightning's own torch.load refused the file
        raise _load_error(checkpoint_path, err) from err


# ------------------------------------------------------------------------------------------------ directories
def check_output_dir(path: str | os.PathLike, what: str, need_bytes: int = 0) -> None:
    """Check, before anything is trained, that ``path`` can be created and written and has ``need_bytes`` free.

    Creates the directory (it would be created at the first save anyway) and writes and deletes a small probe
    file in it. Remote URLs are not checked.

    Raises:
        OutputDirError: naming ``what``, the path and the reason.
    """
    text = os.fspath(path)
    if not _is_local_file_protocol(text):
        return
    target = Path(text).expanduser()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputDirError(f"{what} {text} exists and is not a directory") from None
    except OSError as err:
        raise OutputDirError(f"{what} {text} cannot be created: {err.strerror or err}") from None
    probe = target / f".write-test.{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OutputDirError(f"{what} {text} is not writable: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    free = shutil.disk_usage(target).free
    if free < need_bytes:
        raise OutputDirError(
            f"{what} {text} has {_size(free)} free but a checkpoint of this run takes about {_size(need_bytes)} "
            "(weights, optimizer state and any EMA copy)"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def checkpoint_size_lower_bound(module: torch.nn.Module) -> int:
    """Bytes of the module's state dict: no checkpoint of it can be smaller (optimizer state comes on top)."""
    total = 0
    for t in module.state_dict().values():
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


#: Optimizer state per trainable parameter, in float32 copies of it: a momentum buffer is one; Adam-style first
#: and second moments (adamw, lamb, ...) are two, which is also assumed for optimizers not listed.
_OPTIMIZER_STATE_COPIES = {"sgd": 1, "momentum": 1, "nesterov": 1, "sgdp": 1, "sgdw": 1, "lion": 1}
#: What a checkpoint spends per tensor besides its bytes: its zip record (header, name, 64-byte alignment) and
#: pickle entry, and for optimizer state a step counter.
_BYTES_PER_TENSOR = 320
#: The rest of a training checkpoint: loop counters, hyperparameters, callback and RNG states.
_BYTES_FIXED = 16 * 1024


def checkpoint_size_estimate(module: torch.nn.Module, callbacks: Any = ()) -> int:
    """Bytes a training checkpoint of ``module`` is expected to take (checked against the free space up front).

    Weights plus optimizer state (float32 copies of the trainable parameters: two for AdamW, one for SGD with
    momentum; the optimizer named by the module's ``optimizer`` hyperparameter) plus, with an EMA callback among
    ``callbacks``, a second copy of the weights (Lightning keeps the averaged and the current ones).
    """
    state_dict = module.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state_dict.values() if isinstance(t, torch.Tensor))
    tensors = len(state_dict)
    trainable = [p for p in module.parameters() if p.requires_grad]
    copies = _optimizer_state_copies(getattr(module, "hparams", None) or {})
    state = copies * sum(4 * p.numel() for p in trainable)
    tensors += (copies + 1) * len(trainable) if copies else 0
    if any(isinstance(cb, WeightAveraging) for cb in callbacks or ()):  # EMA: averaged and current weights
        weights, tensors = 2 * weights, tensors + len(state_dict)
    return weights + state + _BYTES_PER_TENSOR * tensors + _BYTES_FIXED


def _optimizer_state_copies(hparams: Any) -> int:
    name = str(hparams.get("optimizer", "")).lower()
    momentum = (hparams.get("optimizer_kwargs") or {}).get("momentum")
    if name in _OPTIMIZER_STATE_COPIES and momentum == 0:
        return 0  # plain SGD keeps no state
    return _OPTIMIZER_STATE_COPIES.get(name, 2)
