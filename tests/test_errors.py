"""kvlib raises its own errors: every `raise` in the package names a class of `kvlib.errors`
(each also the built-in error a caller expects), so `except KVLibError` catches them all."""

import ast
import builtins
import inspect
from pathlib import Path

import pytest

import kvlib
from kvlib import errors
from kvlib.errors import KVLibError, KVLibTypeError, KVLibValueError, check_bool, check_int

PACKAGE = Path(kvlib.__file__).parent
BUILTIN_ERRORS = {
    name
    for name, obj in vars(builtins).items()
    if inspect.isclass(obj) and issubclass(obj, BaseException)
}
# Raising these is a statement about the code, not about a caller's input.
ALLOWED_BUILTINS = {"NotImplementedError", "AssertionError", "SystemExit", "KeyboardInterrupt"}


def raised_builtins(source: str) -> list[tuple[int, str]]:
    """(line, name) of every `raise BuiltinError(...)` or `raise BuiltinError` in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in BUILTIN_ERRORS - ALLOWED_BUILTINS:
                found.append((node.lineno, exc.id))
    return found


def test_every_error_class_is_a_kvlib_error():
    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, Exception)]
    assert len(classes) > 10
    assert all(issubclass(c, KVLibError) for c in classes)


def test_kvlib_raises_only_its_own_errors():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} raises {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, name in raised_builtins(path.read_text())
    ]
    assert not offenders, "raise a kvlib.errors class instead:\n" + "\n".join(offenders)


def test_the_raise_check_finds_builtin_raises():
    source = "def f(x):\n    if x:\n        raise ValueError('no')\n    raise TypeError\n"
    assert sorted(raised_builtins(source)) == [(3, "ValueError"), (4, "TypeError")]
    assert raised_builtins("raise KVLibValueError('x')\nraise NotImplementedError\n") == []


def test_check_int_and_check_bool():
    assert check_int("n", 3) == 3 and check_int("n", 0, low=0) == 0
    assert check_int("n", 5, low=None, high=5) == 5
    for bad in (True, 1.0, "1", None):
        with pytest.raises(KVLibTypeError, match="n must be an int"):
            check_int("n", bad)
    with pytest.raises(KVLibValueError, match=r"n must be an int >= 1, got 0"):
        check_int("n", 0)
    with pytest.raises(KVLibValueError, match=r"n must be an int in \[0, 3\], got 4"):
        check_int("n", 4, low=0, high=3)
    with pytest.raises(KVLibValueError, match=r"n must be an int <= 3, got 4"):
        check_int("n", 4, low=None, high=3)
    with pytest.raises(errors.KVCacheError):
        check_int("n", 0, error=errors.KVCacheError)
    assert check_bool("flag", False) is False
    for bad in (0, 1, None, "yes"):
        with pytest.raises(KVLibTypeError, match="flag must be True or False"):
            check_bool("flag", bad)


def test_kvlib_errors_are_still_the_builtin_errors_callers_catch():
    assert issubclass(errors.KVCacheError, ValueError)
    assert issubclass(errors.KVLibTypeError, TypeError)
    assert issubclass(errors.UnknownNameError, KeyError)
    assert issubclass(errors.MissingFileError, FileNotFoundError)
    assert issubclass(errors.GPUUnavailableError, RuntimeError)
