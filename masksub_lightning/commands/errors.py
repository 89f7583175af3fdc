"""One-line answers for the ``masksub`` command: which errors are the user's mistakes, and how to say them.

A mistake found before the first batch (a bad value, missing data, a checkpoint that does not fit, an unwritable
folder) is a :class:`ConfigError` printed as one line ``masksub: error: ...`` with exit code 2; a run that failed
while training keeps its traceback, except a diverged loss and an unreadable image file (:func:`run_failure_line`:
one line, exit code 1). ``MASKSUB_TRACEBACK=1`` keeps every traceback. jsonargparse's reports (a tree over every
union alternative) become one line with a "did you mean" (:func:`parser_error_line`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from typing import Any

#: Functions whose frames mark an exception as raised while running batches rather than while setting up.
_BATCH_FRAMES = frozenset({"training_step", "validation_step", "test_step", "predict_step", "__next__"})


class ConfigError(Exception):
    """A config value, the data, a checkpoint or an output directory was rejected before training started."""


def is_setup_error(err: BaseException) -> bool:
    """Whether ``err`` is a mistake in the inputs found before any batch ran (then it is shown as one line).

    Value, type, key and path errors, a refused (unsafe) pickle, Lightning's MisconfigurationException and a state
    dict that does not fit the model count, unless a frame of a ``*_step`` method or of batch fetching is on the traceback (a bug or bad
    sample met while training keeps its traceback), or ``MASKSUB_TRACEBACK`` is set.
    """
    if os.environ.get("MASKSUB_TRACEBACK", "").strip() not in ("", "0"):
        return False
    import pickle

    from lightning.fabric.utilities.exceptions import MisconfigurationException

    kinds = (
        pickle.UnpicklingError,  # a weights file refused by weights_only loading (pretrained_weights, at fit set-up)
        ValueError,
        TypeError,
        KeyError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        MisconfigurationException,
    )
    state_dict = isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict")
    if not (isinstance(err, kinds) or state_dict):
        return False
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _BATCH_FRAMES:
            return False
        tb = tb.tb_next
    return True


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (a state-dict mismatch as its first problem and a count of the rest)."""
    text = _root_cause(err) if isinstance(err, (ValueError, TypeError)) else str(err)
    if isinstance(err, KeyError):
        text = f"KeyError: {text}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].startswith("Error(s) in loading state_dict"):
        problems = [p.strip() for line in lines[1:] for p in line.split("\t") if p.strip()]
        first = problems[0] if problems else ""
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"the checkpoint does not fit the model: {first}{more}"
    return "; ".join(lines)


def _root_cause(err: BaseException) -> str:
    """The innermost message: jsonargparse wraps a constructor's ValueError in a long union-type report."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return str(err)


#: Lines of a jsonargparse error that describe its union-type search rather than the mistake.
_PARSER_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Expected a <class 'NoneType'>",
)


def parser_error_line(message: str, known_keys: Any = (), class_options: Any = None) -> str:
    """jsonargparse's error report (a tree over every union alternative) as one line, with a close known key.

    Args:
        message: the parser's message, e.g. ``Parser key "model": ... Option 'sub_ratoi' is not accepted``.
        known_keys: the dotted keys the parser accepts (suggestions for an unknown top-level option).
        class_options: class path -> the option names its constructor accepts (suggestions inside ``init_args``).
    """
    path, owner, problems = _read_parser_report(message)
    text = "; ".join(problems) or message.strip().splitlines()[0]
    module, _, name = (owner or "").rpartition(".")
    unknown = re.fullmatch(r"Option '(.+)' is not accepted", text)
    if owner and name not in _module_names(
        module
    ):  # the class path itself is wrong, not one of its init_args
        path.pop()
        text = f"class_path {owner!r} does not name a class"
        close = _close_key(name, _module_names(module))
        close = f"{module}.{close}" if close else None
    elif owner and unknown:
        text = f"option {unknown[1]!r} is not accepted by {owner}"
        close = _close_key(unknown[1], class_options(owner) if class_options else ())
    else:
        unknown = re.search(r"(?:does not accept option '|Option '|unrecognized arguments: --)([\w.]+)", text)
        close = _close_key(unknown[1], known_keys) if unknown else None
    hint = f"; did you mean {close!r}?" if close else ""
    return f"{'.'.join(path)}: {text}{hint}" if path else f"{text}{hint}"


def _read_parser_report(message: str) -> tuple[list[str], str | None, list[str]]:
    """(key path to the innermost problem, the class whose init_args it is in, the problems) of a report."""
    path, owner, problems, expected, given = [], None, [], [], None
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").strip()
        if not line or line.startswith(_PARSER_NOISE):
            continue
        if key := re.fullmatch(r'Parser key "(.+)":', line):
            path.append(key[1])
        elif cls := re.fullmatch(r"Problem with given class_path '(.+)':", line):
            owner = cls[1]
            path.append("init_args")
        elif line.startswith("Given value:"):
            given = given or line.removeprefix("Given value:").strip()  # the innermost comes first
        elif typed := re.fullmatch(r"Expected a <class '([\w.]+)'>(?:\. Got value: (.*))?", line):
            expected.append(typed[1])
            given = typed[2] if typed[2] is not None else given
        else:
            problems.append(line)
    if expected:
        problems.append(f"expected {' or '.join(expected)}, got {given!r}")
    return path, owner, problems


def _module_names(module: str) -> list[str]:
    try:
        return dir(importlib.import_module(module))
    except (ImportError, ValueError):
        return []


def _close_key(bad: str, known: Any) -> str | None:
    """The known dotted key that differs from ``bad`` in its first unknown part only, and there by about an edit."""
    parts, known_parts = bad.split("."), [k.split(".") for k in known]
    for i, part in enumerate(parts):
        level = {k[i] for k in known_parts if len(k) > i and k[:i] == parts[:i]}
        if part not in level:
            close = difflib.get_close_matches(part, level, n=1, cutoff=0.75)
            return ".".join([*parts[:i], close[0]]) if close else None
    return None


def class_options(class_path: str) -> list[str]:
    """Constructor argument names of ``class_path`` and of the bases its ``**kwargs`` reach (as jsonargparse)."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else ():
        try:
            params = list(inspect.signature(klass.__init__).parameters.values())
        except (TypeError, ValueError):
            break
        names += [
            p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names


def run_failure_line(err: BaseException) -> str | None:
    """The one line that tells all about a run that failed while training, or None (the traceback is kept).

    Two failures qualify, with exit code 1 (the run failed; the options were fine): the non-finite-loss guard's
    stop (naming the step and the last good checkpoint), and, unless ``MASKSUB_TRACEBACK`` is set, an image file
    the data loader could not use under ``bad_samples: error`` (naming the file and the option that skips it;
    from a loader worker the message is that worker's traceback, whose last line is the error's own).
    """
    from masksub_lightning.training.guards import NonFiniteLossError  # imported by then: a run was training

    if isinstance(err, NonFiniteLossError):
        return str(err)
    lines = str(err).strip().splitlines()
    # A failing transform keeps its traceback: only the file errors, whose message names the file and the fix.
    # A loader worker's error is re-raised by torch as the same class, its message the worker's traceback text.
    from masksub_lightning.data.datasets import CorruptImageError, ImageTooSmallError

    bad_file = isinstance(err, (CorruptImageError, ImageTooSmallError, FileNotFoundError))
    if not bad_file or not lines or "bad_samples: skip" not in lines[-1]:
        return None
    if os.environ.get("MASKSUB_TRACEBACK", "").strip() not in ("", "0"):
        return None
    return re.sub(r"^[\w.]+Error: ", "", lines[-1])
