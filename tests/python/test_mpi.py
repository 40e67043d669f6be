"""Data-parallel training over MPI (`mpirun -np N quill train ...`), run by ./run-tests.

These need Open MPI's `mpirun` and a quill built with `--features mpi` (run-tests builds it
as target/release/quill-mpi where Open MPI and libclang are installed; .ci/run installs them
and sets QUILL_REQUIRE_MPI=1, so that there a missing piece fails instead of skipping).

What is checked: two ranks (one thread each) give the per-step losses of one process with
the same global batch, and bit-identical weights on both ranks after every step (a hash
gathered each step), with and without ZeRO-1; a rank killed with SIGKILL ends the job by
itself, and the last checkpoint resumes exactly on one or two ranks; LoRA fine-tuning splits
the same way; bad splits get one clear line.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gguf import QUILL, ROOT  # noqa: E402

MPI_BIN = os.environ.get("QUILL_MPI_BIN", str(ROOT / "target" / "release" / "quill-mpi"))
MPIRUN = shutil.which("mpirun")
ENV = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
       "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}
# a small GPT-2 on characters of Tiny Shakespeare: hundreds of steps in seconds
SHAPE = ["--layers", "2", "--heads", "2", "--width", "64", "--context", "64", "--sample-tokens", "0", "--quiet"]
SMALL = [*SHAPE, "--batch", "8"]


def _missing():
    if MPIRUN is None:
        return "Open MPI's mpirun is not installed"
    if not Path(MPI_BIN).exists():
        return f"no MPI build of quill at {MPI_BIN} (cargo build --release -p quill-cli --features mpi)"
    return None


needs_mpi = pytest.mark.skipif(_missing() is not None and os.environ.get("QUILL_REQUIRE_MPI") != "1",
                               reason=_missing() or "")


def mpirun(n, *args, check=True, timeout=600):
    r = subprocess.run([MPIRUN, "-np", str(n), "--oversubscribe", MPI_BIN, "--threads", "1", *map(str, args)],
                       capture_output=True, text=True, env=ENV, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"mpirun -np {n} quill {' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}")
    return r


def alone(*args, threads=2, binary=QUILL):
    r = subprocess.run([binary, "--threads", str(threads), *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return r


def losses(path):
    return {d["step"]: d["loss"] for d in map(json.loads, Path(path).read_text().splitlines())}


def largest_difference(a, b, steps):
    assert all(s in a and s in b for s in steps), (sorted(a)[-3:], sorted(b)[-3:])
    return max(abs(a[s] - b[s]) for s in steps)


@needs_mpi
@pytest.mark.parametrize("zero", [True, False], ids=["zero1", "replicated-moments"])
def test_two_ranks_give_one_process_losses_with_identical_weights(tmp_path, zero):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["train", *SMALL, "--steps", "200", "--eval-interval", "100"]
    alone(*common, "--out", one, "--loss-log", tmp_path / "one.log")
    r = mpirun(2, *common, "--out", two, "--loss-log", tmp_path / "two.log", "--verify-ranks",
               *([] if zero else ["--no-zero"]))
    assert "data-parallel: 2 ranks" in r.stderr and ("ZeRO-1" in r.stderr) == zero, r.stderr
    a, b = losses(tmp_path / "one.log"), losses(tmp_path / "two.log")
    worst = largest_difference(a, b, range(1, 201))
    print(f"largest per-step loss difference over 200 steps, 1 process vs 2 ranks "
          f"({'ZeRO-1' if zero else 'whole moments'}): {worst:.2e}")
    assert worst < 1e-5
    assert a[200] < a[1] - 0.5, "the run did not learn"
    ma = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [100, 200]
    assert max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(ma, mb)) < 1e-5
    # the saved model is a normal one: it generates in one process
    alone("generate", "--model", two, "--prompt", "ROMEO:", "--max-new-tokens", "5")


@needs_mpi
def test_a_killed_rank_ends_the_job_and_the_checkpoint_resumes_exactly(tmp_path):
    # the schedule plans for 100,000 steps; a long warm-up keeps the learning rate gentle, so
    # that one process and two ranks (whose sums differ in float rounding) stay within 1e-5
    common = ["train", *SMALL, "--steps", "100000", "--eval-interval", "50", "--warmup", "1000"]
    # what an uninterrupted two-rank run does
    mpirun(2, *common, "--out", tmp_path / "ref", "--stop-after", "300", "--loss-log", tmp_path / "ref.log")
    ref = losses(tmp_path / "ref.log")
    out = tmp_path / "killed"
    job = subprocess.Popen([MPIRUN, "-np", "2", "--oversubscribe", MPI_BIN, "--threads", "1", *common, "--out", out],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            m = out / "metrics.jsonl"
            if m.exists() and any(json.loads(x)["step"] >= 100 for x in m.read_text().splitlines()):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("no checkpoint at step 100 in 2 minutes")
        ranks = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        os.kill(int(ranks[-1]), signal.SIGKILL)
        killed = time.time()
        text, _ = job.communicate(timeout=30)
        ended = time.time() - killed
    finally:
        if job.poll() is None:
            job.kill()
    print(f"the job ended {ended:.1f} s after a rank was killed")
    assert job.returncode != 0
    assert "signal 9" in text or "Killed" in text, text[-2000:]
    # the checkpoint is intact and continues exactly: on two ranks bit for bit, on one rank
    # within the rounding of sums taken in another order
    for n in (2, 1):
        copy = tmp_path / f"resumed{n}"
        shutil.copytree(out, copy)
        args = ["train", "--resume", "--out", copy, "--stop-after", "60", "--quiet",
                "--loss-log", tmp_path / f"resumed{n}.log"]
        r = mpirun(2, *args) if n == 2 else alone(*args, threads=1)
        step = int(r.stderr.split("at step ")[1].split()[0])
        assert 100 <= step <= 200 and step % 50 == 0, r.stderr
        got = losses(tmp_path / f"resumed{n}.log")
        worst = largest_difference(got, ref, range(step + 1, step + 61))
        print(f"resumed at step {step} on {n} rank(s): largest loss difference over 60 steps {worst:.2e}")
        assert worst == 0.0 if n == 2 else worst < 1e-5


@needs_mpi
def test_lora_finetuning_splits_over_ranks_the_same_way(tmp_path):
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}")
    corpus = tmp_path / "c.txt"
    corpus.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:30000])
    model = tmp_path / "tiny"
    alone("train", "--arch", "llama", "--data", corpus, "--out", model, "--tokenizer", "bpe:300", "--steps", "10",
          "--eval-interval", "10", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--width", "64",
          "--context", "128", "--batch", "4", "--quiet")
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": chatml}))
    words = ["king", "rose", "night", "sword", "crown", "heart"]
    data = tmp_path / "echo.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Echo {w} {v}"},
                                                     {"role": "assistant", "content": f"{v} {w}"}]}) + "\n"
                            for w in words for v in words))
    common = ["finetune", "--model", model, "--data", data, "--steps", "30", "--eval-interval", "15", "--batch", "4",
              "--context", "128", "--lr", "1e-2", "--quiet", "--lora-rank", "4", "--lora-dropout", "0.1"]
    alone(*common, "--out", tmp_path / "one", "--loss-log", tmp_path / "one.log")
    mpirun(2, *common, "--out", tmp_path / "two", "--loss-log", tmp_path / "two.log", "--verify-ranks")
    worst = largest_difference(losses(tmp_path / "one.log"), losses(tmp_path / "two.log"), range(1, 31))
    print(f"LoRA fine-tuning, 1 process vs 2 ranks: largest loss difference over 30 steps {worst:.2e}")
    assert worst < 1e-5
    assert (tmp_path / "two" / "adapter_model.safetensors").exists()


@needs_mpi
def test_a_batch_that_does_not_split_is_refused_on_every_rank(tmp_path):
    t0 = time.time()
    r = mpirun(2, "train", *SHAPE, "--batch", "3", "--steps", "5", "--out", tmp_path / "x", check=False,
               timeout=60)
    assert r.returncode != 0
    text = r.stdout + r.stderr
    assert "must split evenly over the 2 ranks" in text, text
    assert time.time() - t0 < 30


def test_an_mpi_launch_without_the_mpi_build_is_refused(tmp_path):
    """The default build, started by an MPI launcher, would run N copies of one run that
    overwrite each other: it says what to build instead."""
    env = {**os.environ, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}
    r = subprocess.run([QUILL, "train", "--steps", "1", "--out", tmp_path / "x"], capture_output=True, text=True,
                       env=env, timeout=60)
    if "--features mpi" not in r.stderr and r.returncode == 0:
        pytest.skip("QUILL_BIN is an MPI build")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "built without MPI" in lines[0] and "--features mpi" in lines[0], r.stderr
    assert not (tmp_path / "x").exists()
