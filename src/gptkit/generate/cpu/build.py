"""gptkit's CPU kernels (`kernels.c`): compiled on first use by the machine's C compiler, cached.

Decoding in fp32 is bound by how fast the weights stream from memory, and PyTorch's matrix-vector
products read them at well under the machine's bandwidth (see `gptkit.generate.cpu.linear`), so
gptkit carries two small C functions: `gptkit_matvec` (a Linear layer for a few rows) and
`gptkit_decode` (a whole decoding step, see `gptkit.generate.cpu.decode`), for fp32 weights, int8
weights with row scales and int4 weights with group scales (`gptkit.generate.cpu.quantize`,
`gptkit.generate.cpu.int4`). They are built with
`cc -O3 -march=native -fopenmp` into the cache folder, keyed by the source, the compiler and the
CPU, and linked against the OpenMP runtime torch has loaded. Without a compiler, or where the built
library computes wrong products, gptkit says so once and decodes with oneDNN instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.console import notice
from gptkit.files import give_default_modes
from gptkit.generate.cpu import int4

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_size, _ptr, _int, _float = ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# The C functions' (argument types, return type), as kernels.c defines them (a test reads them there)
SIGNATURES = {
    "gptkit_matvec": ([_ptr] * 5 + [_size] * 3 + [_int, _int], None),
    "gptkit_decode": (
        [_ptr, _ptr, _int, _int] + [_size] * 6 + [_ptr] * 5 + [_size, _ptr, _float, _int],
        _int,
    ),
    "gptkit_int4_activation_block": ([], _int),
}


def cache_dir() -> Path:
    """Where compiled kernels live: $GPTKIT_CACHE, else $XDG_CACHE_HOME/gptkit, else ~/.cache/gptkit."""
    if root := os.environ.get("GPTKIT_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptkit"


def _machine() -> str:
    """What -march=native depends on: a cached library is rebuilt on another kind of CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled library, built once per machine and source; None where it cannot be had.

    GPTKIT_CPU_KERNEL=0 goes without it; CC names the compiler (default `cc`).
    """
    if os.environ.get("GPTKIT_CPU_KERNEL", "1") == "0" or not torch.backends.openmp.is_available():
        return None
    cc = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join([cc, *FLAGS]).encode(), _machine().encode()]))
    path = cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            compile_library(path, cc=cc)
        lib = open_library(path)
    except (OSError, subprocess.SubprocessError) as e:
        notice(f"fp32 decoding uses oneDNN, not gptkit's faster kernels: {cc} could not build them ({e})")
        return None
    if not agrees(lib):
        notice(f"fp32 decoding uses oneDNN: gptkit's kernels built by {cc} computed wrong products")
        return None
    return lib


def open_library(path: Path) -> ctypes.CDLL:
    """A built library with its functions' ctypes signatures set."""
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def compile_library(path: Path, flags: list[str] = FLAGS, cc: str = "cc") -> None:
    """Compile kernels.c into a temporary file, then move it in place (processes may build at the same
    time). Other `flags` build the portable code paths (the tests compile each)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-x", "c", "-", "-o", tmp, "-lm"],
            input=SOURCE.read_bytes(),
            capture_output=True,
            timeout=300,
        )
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            raise subprocess.SubprocessError(lines[-1])
        give_default_modes(Path(tmp), executable=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def int4_activation_block(lib: ctypes.CDLL) -> int:
    """The inputs per int8 scale of the activations in `lib`'s int4 products (`int4.quantize_activations`),
    or 0 where they stay fp32 (a build without AVX512-VNNI)."""
    return lib.gptkit_int4_activation_block()


def agrees(lib: ctypes.CDLL) -> bool:
    """The products equal F.linear's to fp32 rounding, on shapes with every kind of remainder, for
    fp32 weights, int8 weights with row scales and int4 weights in groups (with the activations as
    the int4 products quantise them, if they do; in fp32 even when called under autocast)."""
    g = torch.Generator().manual_seed(0)
    block = int4_activation_block(lib)
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        for m, n, out, group in [(1, 768, 2304, 64), (3, 37, 13, 32), (8, 64, 9, 32), (5, 200, 17, 128)]:
            x, w, b = (torch.randn(*s, generator=g) for s in ((m, n), (out, n), (out,)))
            q = torch.randint(-127, 128, (out, n), generator=g, dtype=torch.int8)
            scale = torch.rand(out, generator=g)
            codes, scales = int4.pack(w, group)
            w4 = int4.dequantize(codes, scales, n, group)
            expected = [
                (matvec(lib, x, w, b), F.linear(x, w, b)),
                (matvec(lib, x, q, b, scale), F.linear(x, q.float() * scale[:, None], b)),
                (
                    matvec(lib, x, codes, b, scales, group),
                    F.linear(int4.quantize_activations(x, block) if block else x, w4, b),
                ),
            ]
            if not all(torch.allclose(got, want, rtol=1e-4, atol=1e-3) for got, want in expected):
                return False
    return True


def pointer(t: Tensor | None) -> int | None:
    """The address of a contiguous CPU tensor's data (None for None), checked."""
    if t is None:
        return None
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("gptkit's CPU kernels take contiguous CPU tensors")
    return t.data_ptr()


def matvec(
    lib: ctypes.CDLL,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scale: Tensor | None = None,
    group: int = 0,
) -> Tensor:
    """x (m, n) @ weight.T + bias, contiguous CPU tensors: fp32 x and bias; weight fp32, int8 (out, n)
    whose row o is worth `scale[o]` times its values (fp32 `scale` given), or int4 codes in groups of
    `group` inputs with their bf16 (scale, zero) pairs in `scale` (`gptkit.generate.cpu.int4`)."""
    m, n = x.shape
    out = weight.size(0)
    y = torch.empty(m, out)
    args = (pointer(x), pointer(weight), pointer(scale), pointer(bias), y.data_ptr(), m, n, out, group)
    lib.gptkit_matvec(*args, torch.get_num_threads())
    return y
