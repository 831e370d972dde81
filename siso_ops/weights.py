"""Reading weight files safely (no ComfyUI import): safetensors, or pickles through
``torch.load(weights_only=True)`` with at most a few named harmless classes allowed.

Every way a file can be unusable ends in a ``WeightFileError`` that names the file, its folder
and its role, says in plain words what is wrong with it and what to do. Torch's own advice for a
refused pickle (loading it with the safety check switched off) is never passed on: the refusal is
the safety feature."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass

import torch

log = logging.getLogger("siso")


class WeightFileError(ValueError):
    """A weight file is missing, unreadable or not what it should be; the message says which file."""


def _allowing(classes):
    allow = getattr(torch.serialization, "safe_globals", None)
    return allow(list(classes)) if classes and allow else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the message
class _File:
    """Where a file is and what it is for, for messages."""

    def __init__(self, path: str, what: str, source: str | None):
        self.path = path
        self.name = os.path.basename(path)
        self.folder = os.path.dirname(os.path.abspath(path))
        self.what = what
        self.source = source

    def error(self, problem: str, advice: str | None = None) -> WeightFileError:
        return WeightFileError(f"The {self.what} file '{self.name}' in {self.folder} {problem}. "
                               f"{advice or self.download_again()}")

    def published(self) -> str:
        return f" Published: {self.source}." if self.source else ""

    def download_again(self) -> str:
        return (f"Download the published file again and put it in {self.folder} in place of "
                f"'{self.name}'.{self.published()}")

    def refused(self, classes: list) -> WeightFileError:
        return self.error(
            f"holds Python objects that a weights-only load refuses: {', '.join(classes)}",
            "Objects in a checkpoint can run code when it is opened, so SISO reads .pth files with "
            "torch.load(weights_only=True) only and does not open this one. Use the published file, or a "
            f"copy of its tensors saved as .safetensors, in {self.folder}.{self.published()}")


# ----------------------------------------------------------------------------- what a file is
def _text_kind(head: bytes) -> str | None:
    """A plain-words name for a start of file that is text, not weights (what a failed download
    often leaves: a Git LFS pointer, an error or login page)."""
    if not head or b"\0" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # the sample may end inside a multi-byte character
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if sum(c.isprintable() or c in "\r\n\t" for c in text) < 0.95 * len(text):
        return None
    start = text.lstrip().lower()
    if start.startswith("version https://git-lfs"):
        return ("is a Git LFS pointer (a small text file that stands for the weights), not the weights "
                "themselves: the repository was cloned without 'git lfs pull'")
    if start.startswith(("<!doctype html", "<html", "<?xml")):
        return "is a web page (HTML), not weights: the download saved an error or sign-in page"
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return f"is a text file, not weights (its first line: {first!r})" if 0 < len(first) <= 80 else \
        "is a text file, not weights"


def _head(path: str, size: int = 512) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _not_weights(path: str, size: int) -> str | None:
    """Why a file is no weight file at all, seen before any loader reads it: empty, or text."""
    if size == 0:
        return "is empty (0 bytes)"
    return _text_kind(_head(path))


def _safetensors_problem(path: str, size: int) -> str:
    """Why safetensors could not read a file, in plain words."""
    head = _head(path)
    if size < 8 or head[8:9] != b"{":
        return f"is not a safetensors file, or one cut short before its header ({size:,} bytes)"
    header_size = int.from_bytes(head[:8], "little")
    if 8 + header_size > size:
        return (f"is a safetensors file cut short: it has {size:,} bytes, fewer than its header alone "
                f"({8 + header_size:,} bytes); the download or copy did not finish")
    try:
        with open(path, "rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        return f"is not a safetensors file, or its header is damaged ({size:,} bytes)"
    expected = 8 + header_size + int(end)
    if size < expected:
        return (f"is a safetensors file cut short: it has {size:,} of the {expected:,} bytes its header "
                "announces; the download or copy did not finish")
    if size > expected:
        return (f"is a damaged safetensors file: it has {size - expected:,} bytes more than the {expected:,} "
                "its header announces")
    return f"is a damaged safetensors file ({size:,} bytes)"


def _renamed(path: str, size: int) -> tuple | None:
    """(problem, advice) for a safetensors file under a pickle's name or the other way round."""
    head = _head(path, 10)
    stem, extension = os.path.splitext(os.path.basename(path))
    is_zip = head.startswith(b"PK\x03\x04")
    is_safetensors = size >= 10 and head[8:10] == b'{"' and 8 + int.from_bytes(head[:8], "little") <= size
    if extension == ".safetensors" and is_zip:
        kind, proper = "a PyTorch (torch.save) checkpoint", f"{stem}.pth"
    elif extension != ".safetensors" and is_safetensors:
        kind, proper = "a safetensors file", f"{stem}.safetensors"
    else:
        return None
    return (f"is {kind}, but its name ends in '{extension}'",
            f"Rename it to '{proper}' (in the same folder) and refresh.")


def _refuse_what_is_not_weights(file, path: str, size: int) -> None:
    """Raises ``file``'s error for a file that is no weights file at all, or one under the other
    format's name: what every reader checks before it parses anything."""
    problem = _not_weights(path, size)
    if problem:
        raise file.error(problem)
    renamed = _renamed(path, size)
    if renamed:
        raise file.error(*renamed)


def _first_sentence(error: Exception) -> str:
    """The first sentence of a loader's error, without torch's advice to load without the safety check."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text, re.S)
    if unpickler:
        text = unpickler.group(1)
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".")
    if not sentence or "weights_only" in sentence or len(sentence) > 300:
        return type(error).__name__
    return f"{type(error).__name__}: {sentence}"


def _zip_problem(path: str, size: int, error: Exception, allowed) -> tuple:
    """(problem, refused classes) for a file that starts like a zip archive (torch.save's format)."""
    if not zipfile.is_zipfile(path):
        return (f"is a PyTorch checkpoint cut short: its {size:,} bytes end before the archive's table of "
                "contents; the download or copy did not finish"), []
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                return "is a zip archive that holds no PyTorch checkpoint (no data.pkl in it)", []
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError):
        return f"is a damaged PyTorch checkpoint: its zip archive cannot be read ({size:,} bytes)", []
    if broken is not None:
        return f"is a damaged PyTorch checkpoint: its part '{broken}' fails its checksum", []
    try:
        with _allowing(allowed):
            refused = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an older torch: the load error is all we have
        refused = []
    refused = refused or _globals_named_in(error)
    if refused:
        return None, refused
    return f"could not be read by torch.load(weights_only=True) ({_first_sentence(error)})", []


def _globals_named_in(error: Exception) -> list:
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(error))))


def _pickle_problem(path: str, size: int, error: Exception, allowed) -> tuple:
    """(problem, refused classes): why torch.load(weights_only=True) could not read a file."""
    head = _head(path)
    if head.startswith(b"PK\x03\x04"):
        return _zip_problem(path, size, error, allowed)
    if head[:1] == b"\x80":  # a pickle: torch.save's older (non-zip) format
        refused = _globals_named_in(error)
        if refused:
            return None, refused
        if isinstance(error, EOFError) or "EOF" in str(error):
            return (f"is a PyTorch checkpoint (older non-zip format) cut short: its {size:,} bytes end before "
                    "its data does; the download or copy did not finish"), []
        return f"is a damaged PyTorch checkpoint (older non-zip format; {_first_sentence(error)})", []
    return (f"is not a PyTorch checkpoint: it is neither the zip archive torch.save writes nor a pickle "
            f"({size:,} bytes)"), []


def _describe(data) -> str:
    if isinstance(data, dict):
        odd = [(k, v) for k, v in data.items() if not isinstance(v, torch.Tensor)]
        if not data:
            return "an empty dictionary"
        key, value = odd[0]
        return (f"a dictionary of {len(data)} entries, {len(odd)} of them no tensor (the first: '{key}', "
                f"of type {type(value).__name__})")
    return f"a {type(data).__name__}"


def _non_finite(state: dict) -> tuple:
    """(key of the first floating-point tensor with NaN or infinite values, how many such tensors,
    how many floating-point tensors), tensor by tensor so no second copy of the weights is made."""
    first, count, total = None, 0, 0
    for key, value in state.items():
        if not (value.is_floating_point() or value.is_complex()) or value.device.type == "meta":
            continue
        total += 1
        if not bool(torch.isfinite(value).all()):
            count += 1
            first = key if first is None else first
    return first, count, total


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str, what: str, allowed=(), source: str | None = None) -> dict:
    """The state dict of a checkpoint, unwrapping a ``{"model": ...}`` / ``{"state_dict": ...}``
    dict and a ``module.`` prefix, with every floating-point tensor checked finite.
    ``what``: the file's role in messages ("DINOv2 ViT-L/14", "SAM"); ``allowed``: classes a
    weights-only load may rebuild; ``source``: the published file(s) and where to get them."""
    file = _File(path, what, source)
    if not os.path.isfile(path):
        raise WeightFileError(f"The {what} file {path} was not found. {file.download_again()}")
    try:
        size = os.path.getsize(path)
        _refuse_what_is_not_weights(file, path, size)
        if path.endswith(".safetensors"):
            import safetensors.torch
            try:
                data = safetensors.torch.load_file(path, device="cpu")
            except OSError:
                raise
            except Exception as error:
                raise file.error(_safetensors_problem(path, size)) from error
        else:
            try:
                with _allowing(allowed):
                    data = torch.load(path, map_location="cpu", weights_only=True)
            except OSError:
                raise
            except Exception as error:
                problem, refused = _pickle_problem(path, size, error, allowed)
                raise (file.refused(refused) if refused else file.error(problem)) from None
    except OSError as error:
        raise file.error(f"could not be read: {error.strerror or type(error).__name__}",
                         "Check that the file can be read by the user ComfyUI runs as.") from error
    for wrapper in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise file.error(f"holds {_describe(data)}, not a state dict of tensors",
                         f"It is not the file SISO expects. {file.download_again()}")
    if all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    first, count, total = _non_finite(data)
    if count:
        raise file.error(
            f"holds NaN or infinite values in {count} of its {total} floating-point tensors (the first: "
            f"'{first}'), which a broken download or conversion leaves")
    return data


# ----------------------------------------------------------------------------- loading
def block_count(keys, pattern: str) -> int:
    """How many numbered blocks a state dict's ``keys`` hold: one past the highest index that
    ``pattern``'s first group captures (0 when no key matches)."""
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def load_exactly(model: torch.nn.Module, state: dict, name: str, what: str, source: str | None = None,
                 optional_prefixes: tuple = (), unused_ok: bool = False):
    """Load ``state`` into ``model`` only when it fits: no tensor of the model is missing (except
    under ``optional_prefixes``, which keep the model's own: Grounding DINO's local BERT) and none
    has another shape. Tensors the model does not have are refused, or with ``unused_ok`` logged
    and left out (detector checkpoints carry training-only extras). ``name``: the file in messages;
    ``what``: the model it should fit; ``source``: the published file(s)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not (optional_prefixes and k.startswith(tuple(optional_prefixes)))]
    misshaped = [f"{k} (shape {tuple(v.shape)}, expected {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    refused = [] if unused_ok else unexpected
    if missing or misshaped or refused:
        extra = f", {len(refused)} unexpected keys {refused[:4]}" if refused else ""
        expected = f". Expected {source}." if source else "."
        raise WeightFileError(f"{name} does not fit the {what} model built for it: {len(missing)} missing keys "
                              f"{missing[:4]}, {len(misshaped)} of another shape {misshaped[:4]}{extra}{expected}")
    if unexpected:
        log.info("%s: %d unused tensors ignored (%s)", name, len(unexpected), ", ".join(unexpected[:5]))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=not optional_prefixes)


# ----------------------------------------------------------------------------- a safetensors file's header
# safetensors' dtype names -> torch's words, for messages and the floating-point test
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
                      "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                      "U64": "uint64", "BOOL": "bool"}
FLOATING = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it: its dtype (torch's word) and shape."""
    dtype: str
    shape: tuple

    @property
    def floating(self) -> bool:
        return self.dtype in FLOATING

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorEntry":
        return cls(str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape))


def read_safetensors_header(path: str, what: str) -> tuple:
    """({tensor name: TensorEntry}, {metadata}) of a safetensors file, from its header alone
    (8 bytes of length, then that many bytes of JSON): milliseconds for a file of any size, no
    tensor is read. A file whose header is unreadable, or whose size is not the one its header
    announces, is refused as read_checkpoint would refuse it, naming the file's problem."""
    stat = os.stat(path)
    return _header(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, what)


@functools.lru_cache(maxsize=64)   # keyed by size and modification time: a changed file is read again
def _header(path: str, size: int, modified: int, what: str) -> tuple:
    file = _File(path, what, None)
    _refuse_what_is_not_weights(file, path, size)
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or 8 + length > size:
                raise ValueError("cut short")
            header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None) or {}
        entries, end = {}, 0
        for key, entry in header.items():
            entries[key] = TensorEntry(SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"].lower()),
                                       tuple(int(s) for s in entry["shape"]))
            end = max(end, int(entry["data_offsets"][1]))
        if 8 + length + end != size or not isinstance(metadata, dict):
            raise ValueError("size")
    except OSError as error:
        raise file.error(f"could not be read: {error.strerror or type(error).__name__}",
                         "Check that the file can be read by the user ComfyUI runs as.") from error
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise file.error(_safetensors_problem(path, size)) from None
    return entries, metadata


# ----------------------------------------------------------------------------- writing a file whole
def _safetensors_error() -> type:
    """safetensors' own exception class (not an OSError: its I/O failures, disk full included,
    arrive as this), wherever the installed version keeps it; a class nothing raises if none."""
    try:
        from safetensors import SafetensorError
        return SafetensorError
    except ImportError:
        try:
            from safetensors._safetensors_rust import SafetensorError
            return SafetensorError
        except ImportError:
            return type("NoSafetensorError", (Exception,), {})


SafetensorError = _safetensors_error()
# The one pattern of the pack's temporary files: '.<file name>.<process id>-<8 letters>.tmp' beside
# the file being written. The process id is required: '.<file name>.<8 letters>.tmp' is what
# tempfile.mkstemp makes for any other tool writing into the folder.
TEMPORARY = re.compile(r"\.(?P<name>.+\.safetensors)\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp")
# A temporary file whose process is not running HERE is removed only once it has not changed for
# this long: a save in another container or machine sharing the folder (whose process ids are not
# this one's) writes continuously and renames within seconds.
STALE_AFTER_S = 600
_writing: set = set()   # this process's temporary files being written now


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(words in text for words in ("No space left on device", "os error 28", "Disk quota exceeded",
                                           "os error 122"))


def _size_text(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


def _free_space(folder: str) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False   # this process: its temporary files being written are in _writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True    # another user's process: not ours to judge
    return True


def remove_stale_temporaries(folder: str) -> list:
    """Removes the temporary files a save that never finished left in ``folder`` (a process killed
    mid-write, a power cut): files of the pack's pattern (TEMPORARY) only, whose writing process
    is gone and which have not changed for STALE_AFTER_S. Returns the names removed; a file that
    cannot be removed is left (and logged)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = TEMPORARY.fullmatch(name)
        path = os.path.join(folder, name)
        if match is None or path in _writing or not os.path.isfile(path) or os.path.islink(path):
            continue
        if _running(int(match.group("pid"))):
            continue
        try:
            if time.time() - os.path.getmtime(path) < STALE_AFTER_S:
                continue
        except OSError:
            continue
        try:
            os.remove(path)
            removed.append(name)
        except OSError as error:
            log.warning("SISO: could not remove the unfinished save %s: %s", path, error)
    if removed:
        log.info("SISO: removed %d unfinished save(s) from %s: %s", len(removed), folder, ", ".join(removed))
    return removed


def write_file_whole(path: str, serialise, size: int):
    """Writes ``serialise()``'s bytes to ``path`` whole or not at all: into one temporary file of
    the pack's pattern in the same folder, flushed to disk, then renamed over ``path``
    (``os.replace``, atomic on one file system). An earlier file of that name stays intact when
    anything fails, and no temporary file is left; one a killed process left is removed by the
    next write into that folder (and at start-up, remove_stale_temporaries). ``size``: the bytes
    the file will take, for a full disk's message. Any failure is an OSError naming the file and
    the folder, and for a full disk the space needed and what to free; safetensors' own errors
    (SafetensorError, not an OSError) are translated the same way."""
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    temporary = None
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)
        data = serialise()
        size = len(data)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}-", suffix=".tmp", dir=folder)
        _writing.add(temporary)
        with os.fdopen(handle, "wb") as out:
            view, step = memoryview(data), 64 << 20
            for start in range(0, len(view), step):
                out.write(view[start:start + step])
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        _writing.discard(temporary)
        temporary = None
    except (OSError, SafetensorError) as error:
        _discard(temporary)   # first: the free space the message reports is without it
        temporary = None
        raise OSError(_write_failure(name, folder, size, error)) from error
    finally:
        _discard(temporary)


def _discard(temporary: str | None):
    if temporary is not None:
        _writing.discard(temporary)
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _write_failure(name: str, folder: str, size: int, error: BaseException) -> str:
    unchanged = "then queue again (an earlier file of that name is unchanged)"
    if _disk_full(error):
        free = _free_space(folder)
        have = f", {_size_text(free)} are free there" if free is not None else ""
        more = f"at least {_size_text(max(size - free, 0) + (1 << 20))}" if free is not None else _size_text(size)
        return (f"could not write '{name}' in {folder}: the disk is full (no space left on the device). The file "
                f"needs {_size_text(size)}{have}: free {more} on the disk that holds {folder} (delete LoRAs or "
                f"other files you no longer use there), {unchanged}")
    reason = (error.strerror if isinstance(error, OSError) else None) or str(error) or type(error).__name__
    return (f"could not write '{name}' in {folder}: {reason}. Make the folder writable for the user ComfyUI runs "
            f"as (or free space there), {unchanged}")
