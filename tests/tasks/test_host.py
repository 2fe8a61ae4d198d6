"""keep_freed_memory: glibc's own accounting (mallinfo2) shows where a large tensor's memory comes from."""

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r"""
import ctypes, torch
from tasks.engine.host import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
print(keep_freed_memory())
before = libc.mallinfo2().hblkhd  # bytes in mmap'd blocks
x = torch.ones(10 * 2**20)  # 40 MiB
print((libc.mallinfo2().hblkhd - before) // 2**20)
"""


def _glibc_with_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33")
@pytest.mark.parametrize("setting, expected", [("", ("True", 0)), ("default", ("False", 40))])
def test_large_tensors_come_from_the_heap_once_set(setting, expected):
    """Set: a 40 MiB tensor is served from the heap (no new mmap'd bytes); EFFDENSE_MALLOC=default: mmap'd."""
    env = {**os.environ, "EFFDENSE_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert (out[0], int(out[1])) == expected, out
