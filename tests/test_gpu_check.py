"""scripts/gpu_check.py: a CPU smoke run of the GPU timing script, with the GPU machine's missing
packages (trl, datasets, lm_eval, gguf) made unimportable, so an import of any of them fails here
before it fails there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MISSING_ON_GPU_MACHINE = ("trl", "datasets", "lm_eval", "gguf")
# sys.modules[name] = None makes ``import name`` raise ImportError, as on a machine without it.
RUN_WITHOUT = (
    "import runpy, sys\n"
    f"for name in {MISSING_ON_GPU_MACHINE!r}:\n"
    "    sys.modules[name] = None\n"
    "sys.argv = ['scripts/gpu_check.py', *sys.argv[1:]]\n"
    "runpy.run_path('scripts/gpu_check.py', run_name='__main__')\n"
)
TINY = ["--device", "cpu", "--dtype", "fp32", "--layers", "2", "--hidden", "64", "--vocab", "256",
        "--seq_len", "32", "--batch", "4", "--warmup", "1", "--steps", "1", "--peak_tflops", "1"]


def test_cpu_smoke_run_without_the_missing_packages():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}  # tiny matmuls: extra threads only wait for each other on a busy machine
    proc = subprocess.run([sys.executable, "-c", RUN_WITHOUT, *TINY], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for method in ("sft", "repnoise"):
        assert re.search(rf"^{method}: step \d+\.\d+ s \(median of 1,.* tokens/s, .* MFU \d+\.\d%",
                         proc.stdout, re.M), proc.stdout
    assert re.search(r"^repnoise/sft step time: \d+\.\d+x$", proc.stdout, re.M), proc.stdout


def test_launcher_parses():
    script = ROOT / "scripts/gpu_check.sh"
    assert script.read_text().splitlines()[1] == "# Launch from the repository root:  bash scripts/gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
