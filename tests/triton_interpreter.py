"""Running Triton kernels on the CPU through Triton's interpreter, for the tests of the CUDA kernels.

TRITON_INTERPRET must be set before Triton is imported, so each interpreted test runs in a
subprocess (`run_interpreted`) that selects a test body marked `interpreted_only`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_interpreted(test_file: str, test_name: str) -> None:
    """Runs one test in a subprocess with TRITON_INTERPRET=1 (which must be set before Triton is imported)."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")  # the interpreter computes with numpy
    result = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider", "-k", test_name],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


interpreted_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="runs inside a test that sets TRITON_INTERPRET=1")


def patch_interpreter_for_numpy_2_4():
    """Triton 3.6's interpreter calls int() on 1-element arrays, an error since numpy 2.4
    (triton-lang/triton#9171); index through .item() instead."""
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
