"""The AVX2 kernel path from an AVX-512 machine: the quantization and model modules again with ATEN_CPU_CAPABILITY=avx2.
A module of its own: it reruns several, and takes as long as they do."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(bool(os.environ.get("ATEN_CPU_CAPABILITY")) or torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="the AVX2 kernel path is forced from an AVX-512 machine; on AVX2 it is the default run")
def test_quantization_and_model_tests_pass_on_the_avx2_kernel_path():
    """torch dispatches the int8/int4 kernels, and attention, by CPU capability: run the quantization and model modules
    again on the AVX2 path (on an AMX CPU torch's bf16 flash attention failed there: model.flash_attention_fails)."""
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_quant.py",
                            "tests/test_quant_checkpoints.py", "tests/test_model_v1.py", "tests/test_model_v2v3.py"],
                           cwd=ROOT, capture_output=True, text=True,
                           timeout=900, env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2"})
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
