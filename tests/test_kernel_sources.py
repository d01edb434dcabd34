"""The compiled kernels' cache names cover every header a kernel includes (issue #17 part 5 split
selective_scan.cpp into headers): a change in any of them must rebuild the kernel."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from seqarch import backends
from seqarch.backends import CompiledKernel
from seqarch.ops.selective_scan import KERNEL

CSRC = Path(KERNEL.source).parent


def local_includes(path: Path) -> set[str]:
    """Names of the quoted #include files reachable from `path` in its folder."""
    found, todo = set(), [path]
    while todo:
        for name in re.findall(r'^#include "([^"]+)"', todo.pop().read_text(), flags=re.M):
            if name not in found:
                found.add(name)
                todo.append(path.parent / name)
    return found


def test_selective_scan_is_split_into_headers_that_exist():
    includes = local_includes(Path(KERNEL.source))
    assert {"selective_scan_tiles.h", "selective_scan_avx512.h", "kernel_common.h", "avx512_math.h"} <= includes
    assert all((CSRC / name).is_file() for name in includes)


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cpp")))
def test_cache_name_changes_with_every_included_header(tmp_path, source):
    folder = tmp_path / "csrc"
    shutil.copytree(CSRC, folder)
    kernel = CompiledKernel("probe", str(folder / source), ("-march=native",))
    before = kernel.cache_name()
    for name in sorted(local_includes(folder / source)):
        header = folder / name
        original = header.read_bytes()
        header.write_bytes(original + b"\n// changed\n")
        backends._sources_hash.cache_clear()  # the files are read once per process; a rebuilt install reads them anew
        assert kernel.cache_name() != before, f"{source}: editing {name} keeps the cache name"
        header.write_bytes(original)
        backends._sources_hash.cache_clear()
    assert kernel.cache_name() == before
