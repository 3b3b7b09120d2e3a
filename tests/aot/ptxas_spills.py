"""The register-spill report of one compile spec: Triton compiles it to PTX for the architecture, the
``ptxas`` that Triton ships assembles it with ``-v``. Shared by the ahead-of-time compile tests."""

import os
import re
import subprocess
import tempfile

_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(spec: dict, arch: int) -> list[tuple[int, int]]:
    """(spill store bytes, spill load bytes) of every function ``ptxas -v`` reports for `spec` (keys fn,
    signature, constexprs, attrs, num_warps, num_stages, maxnreg) compiled for sm_`arch`. Raises
    ValueError when ptxas printed no spill report (nothing would have been checked)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    src = triton.compiler.ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"])
    kern = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                   "maxnreg": spec["maxnreg"]})
    ptx = kern.asm["ptx"]
    gpu = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        res = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    found = [(int(a), int(b)) for a, b in _SPILL.findall(res.stdout + res.stderr)]
    if not found:
        raise ValueError(f"ptxas -v printed no spill report:\n{res.stderr[-2000:]}")
    return found
