"""Result files: the NetCDF writing and reading, and the checks, that every kind of result
shares (paths in :mod:`ckptscope.results`, planes and surfaces in :mod:`ckptscope.grids`,
trajectories and instability in :mod:`ckptscope.matrix_results`).

Files are NetCDF version 3, written with scipy (no extra library), to a temporary name in the
target folder and renamed, so a crash never leaves a half-written result. A file is read whole
into memory and validated by its kind's ``validate_*``; the checks here raise through the
caller's ``fail(what)``, which names the kind and how to write it again.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from ckptscope.errors import CkptscopeError
from ckptscope.files import replacing

SCHEMA_VERSION = 1
ENGINE = "scipy"
# What a value kind means in an error: "float" (real floating point, any width), "int",
# "number" (int or float), "text" (str).
EXPECTED = {"float": "real floats (float32 or float64)", "int": "integers",
            "number": "numbers", "text": "strings"}

Fail = Callable[[str], None]


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> Path:
    """Write any dataset as NetCDF atomically (temporary name in the same folder, then rename)."""
    with replacing(path) as tmp:
        ds.to_netcdf(tmp, engine=ENGINE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return Path(path)


def read_netcdf(path: str | os.PathLike, *, writer: str) -> xr.Dataset:
    """Read a NetCDF file whole into memory (not validated).

    Args:
        path: the file.
        writer: the command that writes such a file, for the error (``"ckptscope path --out"``).

    Raises:
        CkptscopeError: the file is missing or not readable NetCDF.
    """
    path = Path(path)
    if not path.is_file():
        raise CkptscopeError(f"result {str(path)!r} does not exist or is not a file.")
    try:
        with xr.open_dataset(path, engine=ENGINE) as f:
            return f.load()
    except Exception as err:  # any reader failure is the file's fault here
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CkptscopeError(
            f"{str(path)!r} is not a readable NetCDF result ({reason[:160]}); write it with "
            f"{writer}."
        ) from None


def kind_problem(values: np.ndarray, kind: str) -> str | None:
    """Describe what ``values`` hold when it is not ``kind`` (see ``EXPECTED``); ``None`` if
    it is."""
    dtype = values.dtype
    if kind == "text":
        # NetCDF hands strings back as an object array of str; in memory they are <U.
        if dtype.kind == "U" or (
            dtype.kind == "O" and all(isinstance(v, str) for v in values.ravel())
        ):
            return None
    elif dtype.kind in {"float": "f", "int": "iu", "number": "iuf"}[kind]:
        return None
    if dtype.kind == "U":
        return "strings"
    if dtype.kind == "S":
        return "bytes"
    if dtype.kind == "O":
        types = sorted({type(v).__name__ for v in values.ravel()[:100]})
        return "strings" if types == ["str"] else f"Python objects ({', '.join(types)})"
    return f"{dtype.name} values"


def check_kinds(ds: xr.Dataset, kinds: Mapping[str, str], fail: Fail) -> None:
    """Fail on the first variable or coordinate of ``kinds`` (name -> kind) present in ``ds``
    whose values are not of its kind: nothing is coerced."""
    for name, kind in kinds.items():
        if name in ds.variables:
            problem = kind_problem(ds.variables[name].values, kind)
            if problem:
                fail(f"{name!r} holds {problem}, expected {EXPECTED[kind]}")


def check_accuracy(ds: xr.Dataset, fail: Fail) -> None:
    """Fail when ``accuracy`` holds values outside [0, 1] (NaN passes: not evaluated)."""
    acc = ds.variables["accuracy"].values
    if np.any((acc < 0) | (acc > 1)):
        fail("'accuracy' holds values outside [0, 1]")


def check_unique(ds: xr.Dataset, names: Iterable[str], fail: Fail) -> None:
    """Fail when the labels of any coordinate in ``names`` repeat."""
    for name in names:
        labels = [str(v) for v in ds.variables[name].values]
        if len(set(labels)) != len(labels):
            fail(f"{name!r} labels repeat")


def check_schema(ds: xr.Dataset, fail: Fail, *, source: str) -> None:
    """Fail unless ``ds.attrs["ckptscope_schema"]`` is an integer; refuse a schema newer than
    this ckptscope reads, saying to upgrade."""
    version = ds.attrs.get("ckptscope_schema")
    if version is None:
        fail("attribute 'ckptscope_schema' is missing")
    if not isinstance(version, numbers.Integral) or isinstance(version, bool):
        fail(f"attribute 'ckptscope_schema' is {str(version)[:40]!r}, expected an integer")
    if int(version) > SCHEMA_VERSION:
        raise CkptscopeError(
            f"{source} uses result schema {int(version)}, newer than this ckptscope reads "
            f"({SCHEMA_VERSION}); upgrade ckptscope."
        )
