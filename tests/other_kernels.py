"""The numeric tests again, under the CPU kernels of other machines: what would fail on another CPU
fails here first.

    python tests/other_kernels.py            # make test runs it after the whole suite
    python tests/other_kernels.py --full     # with the real SmolLM2 and lm-eval's three routes (~2 min more each)
    python tests/other_kernels.py -x         # other words go to pytest

torch picks its vectorised kernels by the CPU it finds (ATEN_CPU_CAPABILITY overrides the choice
downwards) and its sums' order by the thread count, so a fresh clone on another CPU runs other
kernels than this one did (oneDNN, which float32 decoding runs, is held to the same width by
ONEDNN_MAX_CPU_ISA). This runs `pytest -m numeric tests` (the tests that compare
floating-point results, marked in each file) once per setting below that this CPU can execute,
besides its own, which the main run covered; the real 135M-parameter model's comparison with
transformers, and lm-eval's three routes (tests/test_evaluate.py: 45 s of lm-eval's own set-up a run;
the echo and rolling tests there cover our side of the arithmetic), only with --full (the tiny models
run the same code paths in seconds). A setting the
CPU lacks (avx512 on a CPU without it) would die of an illegal instruction, so a probe process tries
it first and the setting is reported as skipped.
Read next: support/tolerance.py (how close the tests require two computations to be).
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ["default", "avx2", "avx512"]  # torch's x86 kernel families, narrowest first
ONEDNN_ISA = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}  # oneDNN's (float32 decoding's)
PROBE = ("import torch; x = torch.randn(4096); F = torch.nn.functional; "  # kernels that the model runs
         "(x.softmax(0) + x.log_softmax(0) + F.rms_norm(x, (4096,)) + x.exp() + x @ x).sum().item(); "
         "print(torch.backends.cpu.get_cpu_capability())")


def probe(env: dict) -> str:
    """The kernel family torch runs under `env`, or '' when this CPU cannot run it."""
    r = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                       text=True)
    return r.stdout.strip().lower() if r.returncode == 0 else ""


def settings() -> list:
    """[(name, environment or None when this CPU cannot run it)], this CPU's own family left out."""
    own = probe({})
    runs = [(f"ATEN_CPU_CAPABILITY={c}", {"ATEN_CPU_CAPABILITY": c, "ONEDNN_MAX_CPU_ISA": ONEDNN_ISA[c]})
            for c in CAPABILITIES if c != own]
    runs = [(name, env if probe(env) == env["ATEN_CPU_CAPABILITY"] else None) for name, env in runs]
    return [*runs, ("one thread", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})]


def main(extra: list) -> int:
    print(f"this CPU's own kernels ({probe({})}, {os.cpu_count()} threads) ran in the main suite")
    if "--full" in extra:
        extra.remove("--full")
    else:
        extra += ["-k", "not smollm2 and not routes_give_the_same_numbers"]
    failed = []
    for name, env in settings():
        if env is None:
            print(f"--- {name}: skipped, this CPU cannot execute those kernels", flush=True)
            continue
        print(f"--- numeric tests under {name}", flush=True)
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "numeric", "-p", "no:cacheprovider",
                            *extra, str(ROOT / "tests")], env={**os.environ, **env}, cwd=ROOT)
        if r.returncode:
            failed.append(name)
    print(f"numeric tests failed under: {', '.join(failed)}" if failed else
          "numeric tests green under every setting")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
