"""PEFT adapter directories: ``adapter_config.json`` plus ``adapter_model.safetensors``
(or the older pickled ``adapter_model.bin``, opened only with ``weights_only=True``)."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapter import LoraAdapter
from ..errors import InvalidAdapter

if TYPE_CHECKING:
    import torch

CONFIG = "adapter_config.json"
SAFETENSORS = "adapter_model.safetensors"
BIN = "adapter_model.bin"


def is_adapter_dir(path: Path) -> bool:
    return (path / CONFIG).is_file()


def find_adapter_dirs(root: Path, recursive: bool = False) -> list[Path]:
    """Adapter directories at ``root``: itself, else (PEFT's named adapters) its direct
    subfolders, or every directory below it with ``recursive``."""
    if not recursive:
        if is_adapter_dir(root):
            return [root]
        return sorted(p for p in root.iterdir() if p.is_dir() and is_adapter_dir(p))
    return sorted(p.parent for p in root.rglob(CONFIG) if p.is_file())


# The largest adapter_config.json read. PEFT writes a few kilobytes; spelled-out rank and alpha
# patterns of a model with ten thousand adapted modules stay under one megabyte. The cap is
# checked before reading, so a hostile multi-gigabyte file costs nothing.
MAX_CONFIG_BYTES = 4 << 20


def read_config(path: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of ``path``: a JSON object of at most
    ``MAX_CONFIG_BYTES``, UTF-8, with no integer too long for Python to parse.

    Raises:
        InvalidAdapter: missing, too large, not UTF-8 or not a JSON object.
    """
    cfg_path = path / CONFIG
    try:
        with open(cfg_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = b"" if size > MAX_CONFIG_BYTES else f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise InvalidAdapter(f"{path} has no {CONFIG}; is it a PEFT adapter directory?") from None
    except OSError as exc:
        raise InvalidAdapter(f"cannot read {cfg_path}: {exc.strerror or exc}") from None
    if size > MAX_CONFIG_BYTES or len(raw) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(
            f"{cfg_path} is over {MAX_CONFIG_BYTES:,} bytes, and lorahub reads at most that: "
            "an adapter config is a few kilobytes, so this is not one (or it is damaged)"
        )
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidAdapter(f"{cfg_path} is not valid JSON: {exc}") from None
    except ValueError:  # json's way of refusing an integer of thousands of digits
        raise InvalidAdapter(
            f"{cfg_path} holds an integer too long to read (thousands of digits); no "
            "adapter setting needs one"
        ) from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{cfg_path} must hold a JSON object, not {type(config).__name__}")
    return config


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata; a truncated or lying file is an ``InvalidAdapter``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidAdapter(f"{path} is not a valid safetensors file: {exc}") from None
    return tensors, metadata


def read_safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata, read from the header alone."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidAdapter(f"{path} is not a valid safetensors file: {exc}") from None


def read_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded with ``weights_only=True``: no code in it ever runs."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # hostile bytes: any unpickler failure means "refused"
        raise InvalidAdapter(
            f"{path} was refused: it is not a plain tensor file that loads with "
            f"weights_only=True ({type(exc).__name__}); it may hold code, or be corrupt. "
            "Ask for a safetensors file, or re-save it as safetensors in a trusted place."
        ) from None
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise InvalidAdapter(f"{path} does not hold a mapping of names to tensors")
    return dict(obj)


def read_peft_dir(path: Path) -> LoraAdapter:
    """Read a directory written by PEFT's ``save_pretrained``."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidAdapter(f"{path} is not a directory")
    config = read_config(path)
    if (path / SAFETENSORS).is_file():
        tensors, metadata = read_safetensors(path / SAFETENSORS)
        metadata.pop("format", None)
    elif (path / BIN).is_file():
        tensors, metadata = read_bin(path / BIN), {}
    else:
        raise InvalidAdapter(f"{path} has {CONFIG} but neither {SAFETENSORS} nor {BIN}")
    return LoraAdapter.from_state_dict(config, tensors, metadata)


def canonical_weights(adapter: LoraAdapter) -> bytes:
    """The bytes :func:`write_canonical` writes, in memory: for checking a digest before
    anything touches the store."""
    from safetensors.torch import save

    tensors = adapter.state_dict()
    try:
        return save(tensors, metadata={"format": "pt"})
    except RuntimeError:
        return save({k: v.clone() for k, v in tensors.items()}, metadata={"format": "pt"})


def write_canonical(adapter: LoraAdapter, path: Path) -> None:
    """Write the one byte form of an adapter's weights: PEFT's keys, ``{"format": "pt"}``
    metadata, safetensors' own layout.

    The same tensors give the same bytes whichever file they came from, which is what makes
    a ``.bin`` and a ``.safetensors`` import share one blob and one digest. Writing straight
    to a file avoids the two in-memory copies that building the bytes first would cost.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = adapter.state_dict()
    try:
        try:
            save_file(tensors, str(path), metadata={"format": "pt"})
        except RuntimeError:
            # Tensors that share storage (possible from a pickle) must be separated first.
            save_file(
                {k: v.clone() for k, v in tensors.items()}, str(path), metadata={"format": "pt"}
            )
    except SafetensorError as exc:  # the Rust writer's I/O errors (a full disk) are not OSErrors
        code = errno.ENOSPC if "os error 28" in str(exc) else errno.EIO
        raise OSError(code, str(exc)) from exc


def write_config(config: Mapping[str, Any], out: Path) -> None:
    """Write ``adapter_config.json``. ``peft_type`` is always written: PEFT picks the config
    class by it and cannot load a folder without it, while lorahub reads a missing one as LoRA."""
    (out / CONFIG).write_bytes(config_bytes(config))


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """The bytes :func:`write_config` writes."""
    data = {"peft_type": "LORA", **config}
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
