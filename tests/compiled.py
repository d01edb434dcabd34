"""The one skip every test of a compiled C++ kernel uses: no compiler on PATH, no kernel to test.

    @needs_compiler
    def test_compiled_matches_reference(): ...

    @pytest.mark.parametrize("backend", [compiled("compiled"), "chunked"])   # one parameter only

    monkeypatch.setattr(op_module, "KERNEL", FakeKernel(False, "no C++ compiler on PATH"))  # dispatch tests
"""

from __future__ import annotations

import pytest

from seqarch.backends import cpp_compiler_available

needs_compiler = pytest.mark.skipif(not cpp_compiler_available(), reason="no C++ compiler (c++ or g++) on PATH")


def compiled(value: str):
    """A parametrize value that needs the compiled kernel (skipped without a compiler)."""
    return pytest.param(value, marks=needs_compiler, id=value)


class FakeKernel:
    """Stands in for an op's KERNEL in dispatch tests: says whether it loads, never builds anything."""

    def __init__(self, ok: bool, reason: str = ""):
        self.ok, self.reason = ok, reason

    def usable(self):
        return self.ok, self.reason

    def available(self):
        return self.ok
