"""Find the model a name, a callable or a file stands for: what the command line's MODEL means.

:func:`load_model` reads ``spec`` as:

- a torchvision model name (``vgg16``), built with random weights seeded by ``seed``;
  nothing is downloaded;
- ``package.module:callable``, a function or class returning an ``nn.Module``, or a module
  instance (the current directory is importable, as with ``python -m``);
- a file: a TorchScript archive of a scripted ``nn.Sequential`` of torch.nn layers (rebuilt as
  the eager model, since TorchScript modules cannot be hooked), or a module saved whole with
  ``torch.save(model, FILE)``. Unpickling such a file runs code from it, so it is only done
  with ``trust_pickle=True``.

Weights come from :mod:`foresight_sparse.checkpoints`. Messages name the arguments of
:func:`load_model` as :class:`~foresight_sparse.exceptions.Opt` parts, which the command
line renders as its flags.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .checkpoints import fit_state_dict, load_state_dict
from .exceptions import ForesightError, Opt

__all__ = ["load_model", "UsageError", "ModelError", "DEFAULT_IMAGE_SHAPE"]

#: Input shape used for torchvision classification and segmentation models.
DEFAULT_IMAGE_SHAPE = (1, 3, 224, 224)

# Suffixes that make a MODEL argument a file path even when the file is missing.
_FILE_SUFFIXES = (".pt", ".pth", ".pkl", ".ts", ".jit", ".torchscript", ".bin", ".zip")
_CALLABLE_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class UsageError(ForesightError, ValueError):
    """The model cannot be found or loaded as named (the command line exits with status 2)."""


class ModelError(ForesightError, RuntimeError):
    """The model's own code failed while it was imported, built or unpickled (status 1)."""


def _kind(spec: str) -> str:
    """``'file'``, ``'callable'`` or ``'torchvision'``: how to read a MODEL argument."""
    if os.path.exists(spec):
        return "file"
    if _CALLABLE_RE.match(spec):
        return "callable"
    if os.sep in spec or "/" in spec or spec.lower().endswith(_FILE_SUFFIXES):
        raise UsageError(f"model file {spec!r} does not exist")
    return "torchvision"


def _torchvision_models():
    try:
        import torchvision.models as tvm
    except ImportError:
        raise UsageError(
            "torchvision is not installed, so MODEL cannot be a torchvision "
            "name; pip install 'foresight-sparse[vision]', or pass "
            "package.module:callable or a model file"
        ) from None
    return tvm


def _image_model_names(tvm) -> set[str]:
    names = set(tvm.list_models(module=tvm))
    names.update(tvm.list_models(module=tvm.segmentation))
    return names


def _from_torchvision(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...] | None]:
    tvm = _torchvision_models()
    key = name.lower()
    known = tvm.list_models()
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3)
        hint = (
            f"; did you mean {' or '.join(close)}?"
            if close
            else "; see torchvision.models.list_models()"
        )
        raise UsageError(
            f"unknown model {name!r}: not a file, not package.module:callable "
            f"and not a torchvision model name{hint}"
        )
    builder = tvm.get_model_builder(key)
    kwargs: dict[str, Any] = {"weights": None}
    # Never download anything: detection models would fetch a pretrained backbone.
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None
    torch.manual_seed(seed)
    model = tvm.get_model(key, **kwargs)
    shape = DEFAULT_IMAGE_SHAPE if key in _image_model_names(tvm) else None
    return model, shape


def _from_callable(spec: str, seed: int) -> nn.Module:
    mod_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
            raise UsageError(f"cannot import module {mod_name!r} of {spec!r}: {exc}") from None
        raise ModelError(f"importing {mod_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ModelError(f"importing {mod_name!r} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"module {mod_name!r} has no attribute {attr_path!r}") from None
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(
            f"{spec!r} is a {type(obj).__name__}, not a callable returning an nn.Module"
        )
    torch.manual_seed(seed)
    try:
        model = obj()
    except Exception as exc:
        raise ModelError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _pickled_global(exc: BaseException) -> str | None:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else None


def _main_class(path: str, name: str) -> UsageError:
    return UsageError(
        f"{path!r} holds a {name} whose class was defined in the script that saved it "
        "(__main__), so it cannot be imported here; define the class in a module, or save a "
        "state dict (torch.save(model.state_dict(), FILE)) and load it with ",
        Opt("weights", metavar=""),
        " into MODEL=package.module:callable",
    )


def _describe(path: str, obj: Any) -> UsageError:
    """The error for a torch.save file that holds data, not a module."""
    what = type(obj).__name__
    article = "an" if what[:1].lower() in "aeiou" else "a"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return UsageError(
            f"{path!r} holds {article} {what} (a state dict): pass it with ",
            Opt("weights", metavar=""),
            " to a model (a torchvision name or package.module:callable), not as the model",
        )
    if isinstance(obj, dict):
        keys = ", ".join(repr(str(k)) for k in list(obj)[:5]) + (" ..." if len(obj) > 5 else "")
        return UsageError(
            f"{path!r} holds a dict with keys {keys} (a training checkpoint?): pass it with ",
            Opt("weights", metavar=""),
            " to a model (a torchvision name or package.module:callable), not as the model",
        )
    return UsageError(f"{path!r} holds {article} {what}, not a torch.nn.Module")


def _from_file(path: str, trust_pickle: bool) -> nn.Module:
    if os.path.isdir(path):
        raise UsageError(f"model file {path!r} is a directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            model = torch.jit.load(path, map_location="cpu")
    except Exception:  # not TorchScript: try a torch.save file next
        model = None
    if model is not None:
        return _unscript(model, os.path.basename(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        name = _pickled_global(exc)
        if name is None:
            raise UsageError(
                f"cannot load {path!r} as a TorchScript file or a torch.save "
                f"file: {_first_line(exc)}"
            ) from None
        if name.startswith("__main__."):
            raise _main_class(path, name[len("__main__.") :]) from None
        if not trust_pickle:
            raise UsageError(
                f"{path!r} holds a pickled {name} (saved with torch.save(model, FILE)), and "
                "loading it runs code from the file; if you trust the file, pass ",
                Opt("trust_pickle", True),
                ", or save a state dict (torch.save(model.state_dict(), FILE)) and load it with ",
                Opt("weights", metavar=""),
                " into MODEL=package.module:callable",
            ) from None
        obj = _unpickle(path)
    except Exception as exc:  # truncated, corrupt or not a torch file at all
        raise UsageError(
            f"cannot load {path!r} as a TorchScript file or a torch.save file: {_first_line(exc)}"
        ) from None
    if isinstance(obj, nn.Module):
        return obj
    raise _describe(path, obj)


def _unpickle(path: str) -> Any:
    try:
        # weights_only=False unpickles arbitrary objects: it runs code from the file, which
        # the caller said it trusts.
        return torch.load(path, map_location="cpu", weights_only=False)
    except AttributeError as exc:
        found = re.search(r"Can't get attribute '(\w+)' on <module '__main__'", str(exc))
        if found:
            raise _main_class(path, found.group(1)) from None
        raise ModelError(f"unpickling {path!r} failed: {_first_line(exc)}") from exc
    except Exception as exc:  # the file's own code (or a missing import) failed
        raise ModelError(f"unpickling {path!r} failed: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# Layers are found with forward hooks, which TorchScript modules refuse. A scripted model built
# only of nn.Sequential and torch.nn layers is rebuilt as the eager model it was made from;
# anything else has compiled forward code that cannot be hooked, and a traced model has lost
# its layers' settings (stride, padding, ...) to the graph.

_TORCH_NN = "__torch__.torch.nn.modules."


def _unscript(module: nn.Module, where: str) -> nn.Module:
    if not isinstance(module, torch.jit.ScriptModule):
        return module
    return _rebuild(module, where, "")


def _rebuild(module, where: str, name: str) -> nn.Module:
    qual = module._c.qualified_name
    cls = getattr(nn, module.original_name, None)
    children = list(module.named_children())
    supported = qual.startswith(_TORCH_NN) and isinstance(cls, type) and issubclass(cls, nn.Module)
    if supported and cls is nn.Sequential:
        return nn.Sequential(
            OrderedDict((n, _rebuild(c, where, f"{name}.{n}" if name else n)) for n, c in children)
        )
    if not supported or children:
        what = (
            f"module {name!r} ({module.original_name})"
            if name
            else f"its top module ({module.original_name})"
        )
        raise UsageError(
            f"{where} is TorchScript, and {what} has compiled forward code that foresight-"
            "sparse cannot hook to find layer shapes (only nn.Sequential models of torch.nn "
            "layers are converted); save the eager model with torch.save(model, FILE) or "
            "pass package.module:callable"
        )
    missing = [n for n in getattr(cls, "__constants__", ()) if not module._c.hasattr(n)]
    if missing:
        raise UsageError(
            f"{where} is TorchScript, and its {module.original_name} {name!r} does not keep "
            f"its settings ({', '.join(missing)}), as with torch.jit.trace; save the model "
            "with torch.jit.script or torch.save(model, FILE), or pass package.module:callable"
        )
    return _eager_leaf(module, cls)


def _attribute_names(cls: type) -> set[str]:
    """Attributes the eager forward of a torch.nn layer may read."""
    names = set(getattr(cls, "__constants__", ()))
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not klass.__module__.startswith("torch.nn"):
            continue
        try:
            names.update(re.findall(r"self\.([A-Za-z_]\w*)", inspect.getsource(klass)))
        except (OSError, TypeError):  # pragma: no cover - source not shipped
            pass
    return names


def _eager_leaf(script, cls: type) -> nn.Module:
    leaf = cls.__new__(cls)
    nn.Module.__init__(leaf)
    for n, p in script.named_parameters(recurse=False):
        leaf.register_parameter(n, nn.Parameter(p.detach().clone(), p.requires_grad))
    for n, b in script.named_buffers(recurse=False):
        leaf.register_buffer(n, b.detach().clone())
    done = set(leaf._parameters) | set(leaf._buffers) | {"training"}
    for n in sorted(_attribute_names(cls) - done):
        if script._c.hasattr(n):
            value = getattr(script, n)
            if not isinstance(value, torch.Tensor):
                setattr(leaf, n, value)
    leaf.train(script.training)
    return leaf


def load_model(
    spec: str,
    *,
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    input_shape: tuple[int, ...] | None = None,
    weights_key: str | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, tuple[int, ...]]:
    """The model ``spec`` names, with ``weights`` loaded, and its input shape.

    Parameters
    ----------
    spec : str
        A torchvision model name, ``package.module:callable``, or a model file (see the
        module's description).
    seed : int, default 0
        Seeds the random weights of a model built from a name or a callable.
    weights : str or os.PathLike, optional
        A weights file for :func:`foresight_sparse.checkpoints.load_state_dict`.
    input_shape : tuple of int, optional
        The example input's shape; torchvision image models default to
        :data:`DEFAULT_IMAGE_SHAPE`, every other model needs it.
    weights_key : str, optional
        The checkpoint key that holds the state dict in ``weights``.
    trust_pickle : bool, default False
        Allow unpickling a module saved whole, as ``spec`` or in ``weights``; this runs code
        from the file.

    Returns
    -------
    tuple of (torch.nn.Module, tuple of int)
        The model (in whatever train/eval mode it was built or saved in) and the input shape.

    Raises
    ------
    UsageError
        When the model cannot be found or loaded, or no input shape is known.
    ModelError
        When the model's own code fails while it is imported or built.
    CheckpointError
        When ``weights`` cannot be read or does not fit the model.
    """
    kind = _kind(spec)
    if weights is not None and not os.path.isfile(weights):
        raise UsageError(Opt("weights", metavar=""), f" file {os.fspath(weights)!r} does not exist")
    default_shape = None
    if kind == "torchvision":
        model, default_shape = _from_torchvision(spec, seed)
    elif kind == "callable":
        model = _from_callable(spec, seed)
    else:
        model = _from_file(spec, trust_pickle)
    if weights is not None:
        state = load_state_dict(weights, key=weights_key, trust_pickle=trust_pickle)
        model.load_state_dict(fit_state_dict(state, model, source=weights))
    shape = input_shape or default_shape
    if shape is None:
        raise UsageError(
            Opt("input_shape", metavar=""),
            f" is required for {spec!r}: only torchvision image "
            "models have a default (e.g. 1,3,224,224)",
        )
    return model, tuple(shape)
