"""What the method asks of the program that runs it, as one interface.

The method (every ``siso_ops`` module outside ``host/``) is plain torch and imports nothing of
ComfyUI. What it needs from the host's objects (a MODEL, a VAE, CONDITIONING, Cancel, the
device) it asks through ``Host`` below; ``siso_ops/host`` implements it for ComfyUI and
registers itself when it is imported. A method module writes ``from .runtime import host`` and
calls ``host.<operation>(...)``: the lookup happens at the call, so the method imports, and its
pure parts run, with no host at all; only a call that needs one fails, saying so.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Host(Protocol):
    """The operations the method calls on the host's objects. ``model`` is the host's MODEL,
    ``vae`` its VAE, ``positive`` its CONDITIONING; tensors are torch tensors."""

    # --- the device and Cancel
    def compute_device(self): ...                       # the torch.device the run computes on
    def throw_if_interrupted(self) -> None: ...         # raises when the user pressed Cancel
    def is_cancel(self, error: BaseException) -> bool: ...   # whether an error is that Cancel, not a failure

    # --- what a model is, and whether the method can run on it (each raises ValueError with the reason)
    def check_supported(self, model) -> None: ...
    def check_reference_path(self, model, positive) -> None: ...
    def check_size(self, vae, width: int, height: int) -> None: ...
    def describe_model(self, model) -> str: ...
    def user_compile_note(self, model) -> str: ...       # a TorchCompileModel input, said in the report
    def subject_lora_layouts(self, model) -> dict: ...
    def model_family(self, model): ...                  # its row of families.py
    def is_flow(self, model) -> bool: ...
    def latent_channels(self, model) -> int: ...
    def latent_scale(self, vae) -> int: ...             # pixels per latent cell
    def checkpoint_block_classes(self, model) -> set: ...

    # --- sampling: latents, noise, schedules, and the host's own loop around a denoiser
    def empty_latent(self, model, width: int, height: int, vae=None): ...
    def seed_noise(self, latent, seed: int): ...
    def sigma_schedule(self, model, scheduler: str, steps: int): ...
    def run_with_denoiser(self, model, positive, latent, noise, sigmas, seed: int, body): ...
    def encode_photo(self, vae, pixels): ...
    def decode_latent(self, vae, model, model_latent): ...

    # --- training: the trainable clone, the differentiable decoder, the memory they run in
    def training_mode(self): ...                        # a context manager
    def TrainableModel(self, model, rank: int, alpha: float, target: str, seed: int = 0,   # noqa: N802 (a class)
                       checkpointing: bool = False): ...
    def DifferentiableDecoder(self, vae, model, device, dtype=None, checkpointing: bool = False): ...  # noqa: N802
    def make_room_for_training(self, device) -> int: ...
    def free_cached_memory(self) -> None: ...

    # --- the memory estimate's probe (memory.py): sizes, and shape-only passes through the host's code
    def device_memory(self, device) -> dict: ...        # free / unloadable / total bytes
    def memory_reserve(self, device) -> int: ...
    def model_weight_bytes(self, model) -> int: ...
    def model_weights_in_ram(self, model) -> bool: ...
    def decoder_weight_bytes(self, vae, dtype) -> int: ...
    def lora_parameter_count(self, model, rank: int, target: str) -> int: ...
    def model_conditioning(self, model, positive, latent) -> dict: ...
    def prepare_denoiser_probe(self, base, model, rank: int, alpha: float, target: str): ...
    def probe_apply_model(self, base, x, sigma, conds: dict): ...
    def vae_first_stage(self, vae) -> tuple: ...
    def prepare_decoder_probe(self, first_stage): ...
    def probe_decode(self, first_stage, model, model_latent, dtype): ...
    def probe_environment(self): ...                    # a context manager


OPERATIONS = frozenset(name for name in vars(Host) if not name.startswith("_"))


class NoHost(RuntimeError):
    """The method was asked for work on a host's objects, and no host is registered."""


_registered = []


def register(implementation) -> None:
    """Makes ``implementation`` (an object or module with every operation of ``Host``) the host
    the method calls. ``siso_ops/host`` registers itself on import."""
    missing = sorted(name for name in OPERATIONS if not callable(getattr(implementation, name, None)))
    if missing:
        raise TypeError(f"{getattr(implementation, '__name__', type(implementation).__name__)} does not implement "
                        f"siso_ops.runtime.Host: missing {', '.join(missing)}")
    _registered[:] = [implementation]


def current() -> Host:
    """The registered host; raises NoHost when there is none."""
    if not _registered:
        raise NoHost("no host is registered for the SISO method: this operation works on a host's MODEL / VAE / "
                     "CONDITIONING. Inside ComfyUI the pack registers one when it loads (import siso_ops.host); "
                     "elsewhere pass an object implementing siso_ops.runtime.Host to siso_ops.runtime.register.")
    return _registered[0]


class _CurrentHost:
    """``host.<operation>``: that operation of the host registered at the time of the call (so
    a test that replaces an operation on the host module is seen by the method)."""

    __slots__ = ()

    @property
    def __dict__(self):
        # The registered host's own attributes: pytest's monkeypatch (8.4 and later) reads the
        # instance __dict__ for the value its undo restores; with no entry there it would undo a
        # replacement by deleting the operation from the host.
        return vars(current())

    def __getattr__(self, name):
        if name not in OPERATIONS:
            raise AttributeError(f"{name!r} is not an operation of siso_ops.runtime.Host")
        return getattr(current(), name)

    # A test that replaces an operation through this object (monkeypatch.setattr(host, ...))
    # replaces it on the host itself, and its undo restores it there.
    def __setattr__(self, name, value):
        if name not in OPERATIONS:
            raise AttributeError(f"{name!r} is not an operation of siso_ops.runtime.Host")
        setattr(current(), name, value)

    def __delattr__(self, name):
        if name not in OPERATIONS:
            raise AttributeError(f"{name!r} is not an operation of siso_ops.runtime.Host")
        delattr(current(), name)

    def __repr__(self):
        return f"<the SISO method's host: {_registered[0] if _registered else 'none registered'}>"


host = _CurrentHost()
