"""Read weights from the files training code writes, and fit them to a model.

One loader for the whole library (the CLI's ``--weights``, checkpoint sweeps): a bare state
dict saved with ``torch.save``, a training checkpoint dict that keeps the state dict under a
usual key (``state_dict``, ``model``, ...), a Lightning ``.ckpt``, a ``.safetensors`` file,
and, only when the caller trusts the file, a whole pickled ``nn.Module``.

Every ``torch.load`` here uses ``weights_only=True``, which refuses pickled code, except the
one path the caller opts into with ``trust_pickle=True``.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .exceptions import CheckpointError, Opt

__all__ = ["STATE_DICT_KEYS", "load_state_dict", "fit_state_dict", "load_weights"]

#: Keys under which training checkpoints usually keep the model's state dict, in the order
#: they are tried.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "weights",
    "params",
)

SAFETENSORS_HINT = "pip install 'foresight-sparse[safetensors]'"

_ZIP_MAGIC = b"PK\x03\x04"
#: A pickled reference to a class or function (``module.name``): random bytes that happen to
#: parse as a GLOBAL opcode name no module, and are reported as unreadable instead.
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\w+(?:\.\w+)+)")
_MAIN_ATTRIBUTE = re.compile(r"Can't get attribute '(\w+)' on <module '__main__'")


def _is_state_dict(obj: Any) -> bool:
    """A non-empty mapping from names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's bold-face escapes
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _is_safetensors(path: str) -> bool:
    """By extension, or by the format's header: 8-byte little-endian length, then JSON."""
    if path.lower().endswith(".safetensors"):
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[:4] != _ZIP_MAGIC and head[8:9] == b"{"


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path!r} is a safetensors file, and reading it needs the "
            f"safetensors package: {SAFETENSORS_HINT}"
        ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # any unreadable file is the same error
        raise CheckpointError(
            f"cannot read {path!r} as a safetensors file: {_first_line(exc)}"
        ) from None


def _main_class_hint(path: str, name: str) -> str:
    return (
        f"{path!r} holds an object of class {name!r} defined in the script that saved it "
        "(__main__), which cannot be imported here; define the class in a module, or "
        "save a state dict (torch.save(model.state_dict(), FILE)) and load it into a model "
        "you build"
    )


def _torch_load(path: str, trust_pickle: bool) -> Any:
    try:
        if trust_pickle:
            # weights_only=False unpickles arbitrary objects: it runs code from the file.
            return torch.load(path, map_location="cpu", weights_only=False)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        if found is None:
            raise CheckpointError(f"cannot read {path!r}: {_first_line(exc)}") from None
        raise CheckpointError(
            f"{path!r} holds pickled code (it refers to {found.group(1)}), and loading it runs "
            "code from the file; if you trust the file, pass ",
            Opt("trust_pickle", True),
            ", or save a state dict instead: torch.save(model.state_dict(), FILE)",
        ) from None
    except AttributeError as exc:
        found = _MAIN_ATTRIBUTE.search(str(exc))
        if found is not None:
            raise CheckpointError(_main_class_hint(path, found.group(1))) from None
        raise CheckpointError(f"cannot read {path!r}: {_first_line(exc)}") from None
    except Exception as exc:  # truncated, corrupt or not a torch file at all
        raise CheckpointError(
            f"cannot read {path!r} as a torch.save file: {_first_line(exc)}"
        ) from None


def _candidates(obj: Mapping) -> list[str]:
    """Keys of ``obj`` that hold a state dict (or, once trusted, a module)."""
    return [str(k) for k, v in obj.items() if _is_state_dict(v) or isinstance(v, nn.Module)]


def _as_state(value: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(value, nn.Module):
        return {k: v.detach() for k, v in value.state_dict().items()}
    if _is_state_dict(value):
        return dict(value)
    return None


def load_state_dict(
    path: str | os.PathLike, *, key: str | None = None, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a weights file and return its state dict, as a flat dict of CPU tensors.

    Parameters
    ----------
    path : str or os.PathLike
        The file: a state dict saved with ``torch.save``; a training checkpoint dict holding
        one under ``key`` or, without ``key``, under the first of :data:`STATE_DICT_KEYS` it
        has (a Lightning ``.ckpt`` keeps it under ``state_dict``); a ``.safetensors`` file
        (needs the ``safetensors`` package); or, with ``trust_pickle=True``, a whole module
        saved with ``torch.save(model, FILE)``.
    key : str, optional
        The checkpoint key that holds the state dict, when it is not one of the usual ones.
    trust_pickle : bool, default False
        Allow a file that holds pickled Python objects (a whole module, a checkpoint with
        custom classes). Unpickling runs code from the file: only pass True for files you
        trust.

    Returns
    -------
    dict of str to torch.Tensor
        The keys as saved (see :func:`fit_state_dict` to match them to a model).

    Raises
    ------
    CheckpointError
        When the file does not exist or cannot be read, holds pickled code and
        ``trust_pickle`` is False, holds no state dict, or ``key`` is not in it; the message
        names the file and, for a wrong or missing key, the keys that hold state dicts.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"weights file {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"weights file {path!r} is a directory")
    if _is_safetensors(path):
        if key is not None:
            raise CheckpointError(
                f"{path!r} is a safetensors file, which holds one flat state "
                f"dict: there is no key {key!r} to choose; drop it",
                param="key",
            )
        return _read_safetensors(path)
    obj = _torch_load(path, trust_pickle)
    state = _as_state(obj)
    if state is not None:
        if key is not None:
            raise CheckpointError(
                f"{path!r} holds a bare state dict, not a checkpoint with "
                f"keys: there is no key {key!r} to choose; drop it",
                param="key",
            )
        return state
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path!r} holds a {type(obj).__name__}, not a state dict or a "
            "checkpoint dict; save the weights with "
            "torch.save(model.state_dict(), FILE)"
        )
    candidates = _candidates(obj)
    listed = ", ".join(repr(c) for c in candidates) if candidates else "none"
    if key is not None:
        if key not in obj:
            raise CheckpointError(
                f"{path!r} has no key {key!r}; the keys that hold state dicts are: {listed}",
                param="key",
            )
        state = _as_state(obj[key])
        if state is None:
            raise CheckpointError(
                f"{path!r}: key {key!r} holds a {type(obj[key]).__name__}, "
                f"not a state dict; the keys that hold state dicts are: "
                f"{listed}",
                param="key",
            )
        return state
    for usual in STATE_DICT_KEYS:
        state = _as_state(obj.get(usual))
        if state is not None:
            return state
    keys = ", ".join(repr(str(k)) for k in list(obj)[:8]) + (" ..." if len(obj) > 8 else "")
    raise CheckpointError(
        f"{path!r} is a dict with keys {keys} and none of the usual state dict keys "
        f"({', '.join(STATE_DICT_KEYS)}); the keys that hold state dicts are: {listed}; choose "
        "one with ",
        Opt("key", metavar="NAME"),
    )


def _few(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _renamings(state: Mapping[str, torch.Tensor]) -> list[tuple[str, dict[str, str]]]:
    """Candidate ``(prefix removed, {model key: checkpoint key})`` pairs, most literal first."""
    base = {k: k for k in state}
    out = [("", base)]
    # DataParallel / DistributedDataParallel wrap the model as its attribute `module`.
    if base and all(k.startswith("module.") for k in base):
        base = {k[len("module.") :]: k for k in state}
        out.append(("module.", base))
    head = out[-1][0]
    # A LightningModule (or any wrapper) keeps the model as one attribute, e.g. `model.`;
    # its other attributes (a loss module, say) are left out.
    for prefix in sorted({k.split(".", 1)[0] for k in base if "." in k}):
        cut = len(prefix) + 1
        out.append(
            (
                f"{head}{prefix}.",
                {k[cut:]: v for k, v in base.items() if k.startswith(prefix + ".")},
            )
        )
    return out


def fit_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, *, source: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Match a state dict to ``model``'s keys, ready for ``model.load_state_dict``.

    A ``module.`` prefix (DataParallel, DistributedDataParallel) is removed, and so is a
    wrapper's attribute prefix such as a LightningModule's ``model.``: the one leading name
    whose keys, with it removed, are exactly the model's (other keys of the wrapper, such as
    a loss module's, are then left out).

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        As returned by :func:`load_state_dict`.
    model : torch.nn.Module
        The model the weights are for.
    source : str or os.PathLike, optional
        Where ``state`` came from, named in error messages.

    Returns
    -------
    dict of str to torch.Tensor
        Exactly the keys of ``model.state_dict()``, in its order.

    Raises
    ------
    CheckpointError
        When keys are missing or unexpected (the message names up to three of each and the
        closest match of the first missing key), or when a tensor's shape differs from the
        model's (naming the key and both shapes).
    """
    where = f"{os.fspath(source)!r}" if source is not None else "the state dict"
    expected = model.state_dict()
    target = set(expected)
    renamings = _renamings(state)
    exact = [(prefix, r) for prefix, r in renamings if set(r) == target]
    if len(exact) > 1 and exact[0][0] != "" and exact[0][0] != "module.":
        found = " and ".join(repr(prefix) for prefix, _ in exact)
        raise CheckpointError(
            f"{where} holds the model's weights several times, under {found}; "
            "save the state dict of the one you want on its own"
        )
    if exact:
        best = exact[0][1]
    else:
        # Report the keys as saved (less a `module.` prefix): a stripped wrapper prefix
        # would hide the keys outside it.
        best = (
            renamings[1][1]
            if len(renamings) > 1 and renamings[1][0] == "module."
            else renamings[0][1]
        )
    if set(best) != target:
        missing = [k for k in expected if k not in best]
        unexpected = [best[k] for k in best if k not in target]
        problems = []
        if missing:
            problems.append(f"missing {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {_few(unexpected)}")
        hint = ""
        if missing:
            pool = unexpected or list(state)
            # A key saved under an extra prefix is the likeliest match, then the most similar.
            close = [k for k in pool if k.endswith("." + missing[0])] or difflib.get_close_matches(
                missing[0], pool, n=1, cutoff=0.5
            )
            if close:
                hint = f"; the closest match of {missing[0]!r} is {close[0]!r}"
        raise CheckpointError(
            f"{where} does not fit the model ({type(model).__name__}): {'; '.join(problems)}"
            f"{hint}; check that the model is the architecture the weights were saved from"
        )
    wrong = [
        (k, tuple(state[best[k]].shape), tuple(v.shape))
        for k, v in expected.items()
        if tuple(state[best[k]].shape) != tuple(v.shape)
    ]
    if wrong:
        detail = "; ".join(
            f"{k}: {_dims(a)} in the file, {_dims(b)} in the model" for k, a, b in wrong[:3]
        )
        more = f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        raise CheckpointError(
            f"{where} does not fit the model ({type(model).__name__}): "
            f"shapes differ for {detail}{more}"
        )
    return {k: state[best[k]] for k in expected}


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "a scalar"


def load_weights(
    model: nn.Module, path: str | os.PathLike, *, key: str | None = None, trust_pickle: bool = False
) -> nn.Module:
    """Load the weights in ``path`` into ``model`` in place, and return ``model``.

    :func:`load_state_dict` followed by :func:`fit_state_dict` and
    ``model.load_state_dict``; the parameters are those of :func:`load_state_dict`.

    Raises
    ------
    CheckpointError
        As :func:`load_state_dict` and :func:`fit_state_dict` do.
    """
    state = load_state_dict(path, key=key, trust_pickle=trust_pickle)
    model.load_state_dict(fit_state_dict(state, model, source=path))
    return model
