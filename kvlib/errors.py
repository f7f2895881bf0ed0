"""Every error kvlib raises on purpose, in one hierarchy, and the argument checks that raise them.

    KVLibError                          root: `except kvlib.errors.KVLibError` catches them all
    ├── KVLibTypeError (TypeError)      an argument of the wrong type (a bool where an int goes)
    ├── KVLibValueError (ValueError)    an argument of the right type with a wrong value
    │   ├── ConfigError                 a ModelConfig whose numbers cannot describe a model
    │   ├── KVCacheError                misuse of a cache: shape, dtype, device, length
    │   │   ├── CacheFullError          appending past a cache's capacity
    │   │   └── OutOfBlocksError        a block pool with too few free blocks
    │   ├── AssetError                  a shipped or saved file that cannot be read
    │   ├── WeightLoadError             a state dict that does not fit the model
    │   ├── DoesNotFitError             weights plus reserve exceed a GPU's memory
    │   └── BenchError                  a benchmark asked for something it cannot measure
    ├── KVLibIndexError (IndexError)    an index out of range (a layer, a token position)
    ├── MissingFileError (FileNotFoundError)  a file kvlib needs is not there
    ├── UnknownNameError (KeyError)     a name or id that is not registered (model, GPU, sequence)
    ├── NotFinishedError (RuntimeError)  a run stopped at its step limit before finishing
    ├── GPUUnavailableError (RuntimeError)  no CUDA GPU or no CuPy
    ├── ToolchainError (RuntimeError)   the CUDA compiler wheels are missing or a compile failed
    └── KernelFaultError (RuntimeError)  a kernel run on the CPU broke a rule of the hardware

Each class also subclasses the built-in error a caller would expect (ValueError, TypeError,
IndexError, FileNotFoundError, KeyError, RuntimeError), so `except ValueError` keeps working.
A failed call changes nothing, and its message says what was wrong and what was expected.
"""

from pathlib import Path


class KVLibError(Exception):
    """The root of every error kvlib raises on purpose."""


class KVLibTypeError(KVLibError, TypeError):
    """An argument of the wrong type."""


class KVLibValueError(KVLibError, ValueError):
    """An argument of the right type whose value is out of range or inconsistent."""


class KVLibIndexError(KVLibError, IndexError):
    """An index out of range: a layer, a token position, a block id."""


class MissingFileError(KVLibError, FileNotFoundError):
    """A file kvlib needs is not there (the message says how to make or get it)."""


class ConfigError(KVLibValueError):
    """A `ModelConfig` whose numbers cannot describe a model."""


class KVCacheError(KVLibValueError):
    """Misuse of a KV cache: wrong shape, dtype or device, or a length out of range."""


class CacheFullError(KVCacheError):
    """Appending would go past the cache's preallocated capacity."""


class OutOfBlocksError(KVCacheError):
    """The block pool has too few free blocks; the failed call changed nothing."""


class AssetError(KVLibValueError):
    """A shipped or saved file that cannot be read: damaged, truncated or of another kind."""

    def __init__(self, path: str | Path, expected: str, err: Exception) -> None:
        super().__init__(
            f"{path} is not {expected} ({type(err).__name__}: {err}); the file is damaged or "
            "truncated: reinstall kvlib, or rewrite it (python -m kvlib.train / kvlib.data)"
        )
        self.path = Path(path)


class WeightLoadError(KVLibValueError):
    """A state dict that does not fit the kvlib model: missing, unexpected or misshapen keys."""


class DoesNotFitError(KVLibValueError):
    """The model's weights plus the reserved memory exceed the GPU's memory."""


class BenchError(KVLibValueError):
    """A benchmark asked for something it cannot measure (bad section, device or size)."""


class UnknownNameError(KVLibError, KeyError):
    """A name or id that is not registered: a model, a GPU, a sequence (the message says which
    are known)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class NotFinishedError(KVLibError, RuntimeError):
    """A run stopped at its step limit before it finished (a simulation, a trace)."""


class GPUUnavailableError(KVLibError, RuntimeError):
    """No CUDA GPU or no CuPy: the kernels cannot run here (the emulation still can)."""


class ToolchainError(KVLibError, RuntimeError):
    """The CUDA compiler wheels (NVRTC, headers, ptxas) are missing or a compile failed."""


class KernelFaultError(KVLibError, RuntimeError):
    """A CUDA kernel run on the CPU broke a rule of the GPU (bounds, barrier, shuffle, WMMA)."""


def check_int(
    name: str,
    value: object,
    low: int | None = 1,
    high: int | None = None,
    error: type[KVLibValueError] = KVLibValueError,
) -> int:
    """`value`, checked to be an int with low <= value <= high (None: no bound on that side).

    Anything but an int (a bool or a float too) raises KVLibTypeError; an int out of range raises
    `error`, a KVLibValueError subclass of the caller's choosing (ConfigError, KVCacheError, ...).
    """
    if not isinstance(value, int) or isinstance(value, bool):
        raise KVLibTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            wanted = f">= {low}"
        elif low is None:
            wanted = f"<= {high}"
        else:
            wanted = f"in [{low}, {high}]"
        raise error(f"{name} must be an int {wanted}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """`value`, checked to be a bool (not 0/1, not None)."""
    if not isinstance(value, bool):
        raise KVLibTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value
