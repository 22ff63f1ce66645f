"""kernels.c and the Python that calls it describe one layout: read from the C source, compared name
by name (no compiler needed, so these run where the kernels cannot be built)."""

from __future__ import annotations

import ctypes
import re

import pytest

from gptkit.generate.cpu.build import SIGNATURES, SOURCE
from gptkit.generate.cpu.decode import LAYER_POINTERS, LINEAR, NORM, layer_pointer_names

C_TYPES = {"void": None, "long": ctypes.c_long, "int": ctypes.c_int, "float": ctypes.c_float}


def c_source() -> str:
    """kernels.c without its comments."""
    return re.sub(r"/\*.*?\*/", "", SOURCE.read_text(), flags=re.S)


def c_enum(last: str) -> list[str]:
    """The members of the enum in kernels.c that ends with `last` (its count), in order."""
    bodies = [b for b in re.findall(r"enum\s*\{([^}]*)\}", c_source()) if last in b]
    assert len(bodies) == 1, f"one enum with {last} in {SOURCE.name}"
    members = [m.strip() for m in bodies[0].split(",")]
    assert members[-1] == last
    return members[:-1]


def test_the_c_layer_table_is_the_python_one() -> None:
    """kernels.c's enum of a layer's pointers names LAYER_POINTERS's tensors one by one, in order."""
    assert c_enum("LAYER_FIELDS") == layer_pointer_names()
    assert layer_pointer_names()[:5] == ["LN1_W", "LN1_B", "ATTN_W", "ATTN_S", "ATTN_B"]
    assert {fields for *_, fields in LAYER_POINTERS} == {NORM, LINEAR}


def c_signature(function: str) -> tuple[list[type], type | None]:
    """A kernels.c function's (parameter ctypes, return ctype), read from its definition."""
    found = re.search(rf"\b(\w+)\s+{function}\(([^)]*)\)", c_source())
    assert found, f"{function} is not defined in {SOURCE.name}"
    params = [" ".join(p.split()) for p in found.group(2).split(",") if p.strip() != "void"]
    return [ctypes.c_void_p if "*" in p else C_TYPES[p.split()[-2]] for p in params], C_TYPES[found.group(1)]


@pytest.mark.parametrize("function", sorted(SIGNATURES))
def test_the_ctypes_signatures_are_the_c_ones(function: str) -> None:
    argtypes, restype = SIGNATURES[function]
    assert (argtypes, restype) == c_signature(function)
