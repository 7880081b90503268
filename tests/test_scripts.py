"""The absl entry points run end to end (on `tiny`, with seeded random weights)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def test_perplexity_script(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
  proc = _run("scripts/perplexity.py", "--model=tiny", f"--text_file={text}",
              "--num_tokens=200", "--chunk_size=32", f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads((tmp_path / "out" / "perplexity.json").read_text())
  assert out["num_tokens"] == 200 and len(out["token_ids"]) == 200
  assert len(out["dense"]["nll"]) == len(out["hq"]["nll"]) == 199
  assert out["max_abs_logit_diff"] == {"full_prefill": 0.0, "prefix_reuse": 0.0}
  assert out["logit_mismatches"] == {"full_prefill": 0, "prefix_reuse": 0}
  assert out["dense"]["ppl"] == out["hq"]["ppl"] > 1.0
  # What ran is recorded (issue 11 item 1): "auto" resolves to the XLA reference on CPU.
  record = json.loads((tmp_path / "out" / "perplexity.run.json").read_text())
  assert out["attention"] == record["attention"] == "reference"
  assert record["backend"] == "cpu" and record["run_id"] == out["run_id"]
  assert record["status"] == "complete" and record["config"]["attention"] == "auto"
  # A second run into the same directory is refused before any compute (defect 4).
  proc = _run("scripts/perplexity.py", "--model=tiny", f"--text_file={text}",
              "--num_tokens=200", f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode == 1 and "--overwrite" in proc.stderr
  assert json.loads((tmp_path / "out" / "perplexity.json").read_text()) == out


def test_perplexity_script_errors_and_help(tmp_path):
  proc = _run("scripts/perplexity.py", "--model=tiny", "--text_file=/no/such/file",
              f"--output_dir={tmp_path}")
  assert proc.returncode != 0 and "does not exist" in proc.stderr
  assert not os.path.exists(tmp_path / "perplexity.json")
  proc = _run("scripts/perplexity.py", "--help")
  # (absl exits with status 1 after --help.)
  assert "--num_tokens" in proc.stdout and "--text_file" in proc.stdout


def test_sweep_flags_fail_before_any_compute(tmp_path):
  """Issue 14 defect 7: bad flags failed lazily (after rows, or after all the compute)."""
  a_file = tmp_path / "file"
  a_file.write_text("x")
  for args, message in [
      ([f"--output_dir={a_file}"], f"--output_dir={a_file} is a file"),
      (["--context_lengths=64,0"], "--context_lengths=64,0: 0 is below 1"),
      (["--context_lengths="], "--context_lengths is empty"),
      (["--system_tokens=-5"], "--system_tokens must be an integer >= 0"),
      (["--attention=fast"], "--attention must be one of auto, reference"),
  ]:
    out = args[0].split("=", 1)[1] if args[0].startswith("--output_dir") else tmp_path / "o"
    proc = _run("scripts/memory_sweep.py", "--model=tiny", f"--output_dir={out}",
                *[a for a in args if not a.startswith("--output_dir")])
    assert proc.returncode == 1, (args, proc.stderr[-2000:])
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}" or message in proc.stderr
    assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "o") and a_file.read_text() == "x"
  proc = _run("scripts/latency.py", "--concurrency=0", f"--output_dir={tmp_path / 'o'}")
  assert proc.returncode == 1 and "--concurrency=0: 0 is below 1" in proc.stderr


def test_kernel_bench_flags(tmp_path):
  """GPU-only script: on CPU only its flag checks run, and they name the bad value."""
  proc = _run("scripts/kernel_bench.py", "--sections=decode,bogus", f"--output_dir={tmp_path}")
  assert proc.returncode != 0 and "bogus" in proc.stderr
  proc = _run("scripts/kernel_bench.py", "--shared_configs=exact,nope",
              f"--output_dir={tmp_path}")
  assert proc.returncode != 0 and "nope" in proc.stderr
  assert not os.listdir(tmp_path)
  proc = _run("scripts/kernel_bench.py", "--help")
  assert "--shared_points" in proc.stdout and "--sections" in proc.stdout


def test_bench_mosaic_help_and_bad_arguments(capsys):
  """`hq-jax bench mosaic prefill --help` printed nothing and ran the whole benchmark (a GPU
  one: on the CPU every variant failed); an argument a subcommand does not take was
  ignored. Now --help prints the usage (status 0), a bad argument is one usage error (2)."""
  from hq_jax.bench import mosaic
  with pytest.raises(SystemExit) as e:
    mosaic.main(["prefill", "--help"])
  assert e.value.code == 0 and "hq-jax bench mosaic prefill" in capsys.readouterr().out
  for argv, named in ((["prefill", "--bogus"], "'--bogus'"), (["decode", "7bx"], "'7bx'"),
                      (["prefill", "--chunks=a"], "--chunks"), (["sweep"], "'sweep'")):
    with pytest.raises(SystemExit) as e:
      mosaic.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and named in err.splitlines()[0], argv
