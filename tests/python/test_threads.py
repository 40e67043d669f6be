"""Training results do not depend on the thread count: the same run with 1, 2 and 3 threads
(more threads than this machine may have cores included) writes the same losses and the same
weights, byte for byte. Each reduction splits its work by a fixed block size, never by the
number of threads (crates/quill/src/kernels/reduce.rs argues it)."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUILL = str(ROOT / "target" / "release" / "quill")


@pytest.mark.parametrize("flags", [[], ["--arch", "llama", "--kv-heads", "1"], ["--dtype", "bf16"]])
def test_the_same_run_on_1_2_and_3_threads_is_identical(tmp_path, flags):
    runs = []
    for threads in (1, 2, 3):
        out = tmp_path / f"t{threads}"
        subprocess.run([QUILL, "train", "--threads", str(threads), "--steps", "12", "--eval-interval", "6",
                        "--batch", "8", "--out", out, "--quiet", *flags], check=True, capture_output=True,
                       timeout=300)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [(m["step"], m["train_loss"], m["val_loss"], m["grad_norm"]) for m in metrics]
        runs.append((losses, (out / "model.safetensors").read_bytes()))
    for losses, weights in runs[1:]:
        assert losses == runs[0][0]
        assert weights == runs[0][1]
