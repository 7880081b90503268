"""Plain absl flags mirrored from an ml_collections config, so that both
`--config=configs/x.py --config.num_tokens=256` and plain `--num_tokens=256` work,
and `--help` lists every field with its default."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import sys

import jax
import ml_collections
from absl import app, flags


import configs

# The ml_collections config files ship as the `configs` package (installed with hq_jax).
CONFIG_DIR = os.path.dirname(os.path.abspath(configs.__file__))
# A clone's root (relative defaults such as the trace path are tried from it).
REPO_ROOT = os.path.dirname(CONFIG_DIR)


def config_path(name: str) -> str:
  """The path of a config file shipped in `configs/`."""
  return os.path.join(CONFIG_DIR, name)


# Help of the fields every script shares; a script's own text for a field wins.
COMMON_HELPS = {
    "model": "'shipped', a preset name (seeded random weights), a .gguf file or an HF dir",
    "block_size": "KV block size in tokens",
    "chunk_size": "prefill chunk (a multiple of block_size)",
    "dtype": "float32 | bfloat16",
    "kv_dtype": "K/V cache dtype: empty = --dtype, float32, bfloat16, float16, float8_e4m3fn "
                "(e4m3 values and one float32 scale per token and kv head, counted as K/V "
                "bytes; read by the XLA path and the Triton kernels)",
    "attention": "prefill/decode attention: auto (pallas on a GPU, the XLA reference "
                 "elsewhere), reference, pallas (the fastest of our kernels on this GPU: "
                 "Mosaic GPU prefill on Hopper, else Triton; paged and dedup decode on "
                 "Triton), triton (the Triton kernels only), mosaic (Mosaic GPU prefill "
                 "and paged decode always), pallas_interpret",
    "decode_attention": "decode over shared prefixes: paged, dedup (read a shared prefix "
                        "once per tile of its requests; the same logits as paged), auto",
    "overwrite": "replace this script's earlier outputs in --output_dir (else refused)",
    "allow_long_context": "run requests longer than the model's max_position_embeddings",
    "decode_rows": "rows of every decode step (the batch-invariant default: a request's "
                   "logits do not depend on its batch); 0 = the bucketed opt-out (a batch "
                   "padded to a power of two: fewer padded rows, bits that depend on the "
                   "batch). Recorded in rows as `invariance`",
    "mesh": "devices as data:D,model:M (tensor parallel over kv heads on model, one cache "
            "per data shard); empty = one device",
}
REQUEST_TEXT_HELP = ("UTF-8 text the requests are cut from; empty = the shipped Wikipedia "
                     "articles")


def define_flags(defaults: ml_collections.ConfigDict, helps: dict[str, str]) -> None:
  """Defines one flag per top-level field, defaulting to None (= keep the config's value)."""
  helps = {**COMMON_HELPS, **helps}
  for name, value in defaults.items():
    help_ = f"{helps.get(name, '')} (config default: {value!r})"
    if isinstance(value, bool):
      flags.DEFINE_boolean(name, None, help_)
    elif isinstance(value, int):
      flags.DEFINE_integer(name, None, help_)
    elif isinstance(value, float):
      flags.DEFINE_float(name, None, help_)
    elif isinstance(value, (list, tuple)):
      flags.DEFINE_list(name, None, help_)
    else:
      flags.DEFINE_string(name, None, help_)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with every plain flag that was given on the command line applied."""
  config = ml_collections.ConfigDict(config.to_dict())
  for name, default in config.items():
    value = flags.FLAGS[name].value if name in flags.FLAGS else None
    if value is None:
      continue
    if isinstance(default, (list, tuple)):
      elem = type(default[0]) if default else str
      try:
        value = [elem(v) for v in value]
      except ValueError:
        raise app.UsageError(f"--{name}={','.join(value)}: each value must be "
                             f"{'a number' if elem is float else 'an integer' if elem is int else elem.__name__}"
                             ) from None
    config[name] = value
  return config


def code_version() -> str | None:
  """The commit the code came from: `$HQ_JAX_COMMIT` (set it where the tree travels without
  its .git, e.g. a device machine), else `git rev-parse` of this checkout (with "-dirty" if
  tracked files differ), else None."""
  import subprocess
  if os.environ.get("HQ_JAX_COMMIT"):
    return os.environ["HQ_JAX_COMMIT"]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                          capture_output=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           text=True, capture_output=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ("-dirty" if dirty else "") if head else None


def run_metadata() -> dict:
  """Where, when and from which code a result was produced (goes into every output file)."""
  dev = jax.devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": code_version(),
          "jax_version": jax.__version__, "backend": jax.default_backend(),
          "platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
          "host": platform.node(), "python": platform.python_version()}


def write_json(path: str, obj) -> None:
  """Strict JSON (NaN/Inf refused), written atomically."""
  from hq_jax.study import outputs
  outputs.write_json(path, obj)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks every flag a config has before anything is loaded or computed; each error
  names its flag. (The sweeps check their own arguments again, for notebook callers.)"""
  from hq_jax.serve.engine import ATTENTION, DECODE_ATTENTION
  from hq_jax.study import memory, outputs, workloads

  def at_least(name, minimum):
    if name in cfg and cfg[name] < minimum:
      raise ValueError(f"--{name} must be >= {minimum}, got {cfg[name]}")

  if "output_dir" in cfg:
    outputs.check_output_dir(cfg.output_dir)
  if "mesh" in cfg:
    from hq_jax.mesh import MeshSpec
    MeshSpec.parse(cfg.mesh)  # devices and the model's heads: checked where they are known
  if "dtype" in cfg and cfg.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
  if cfg.get("kv_dtype"):
    from hq_jax.kv.paged import KV_DTYPES
    if cfg.kv_dtype not in KV_DTYPES:
      raise ValueError(f"--kv_dtype must be empty (= --dtype) or one of "
                       f"{', '.join(KV_DTYPES)}, got {cfg.kv_dtype!r}")
  for name, minimum in (("block_size", 1), ("chunk_size", 1), ("seed", 0), ("max_seq_len", 0),
                        ("repeats", 1), ("warmup", 0), ("num_tokens", 2), ("decode_rows", 0)):
    at_least(name, minimum)
  if "chunk_size" in cfg and "block_size" in cfg and cfg.chunk_size % cfg.block_size:
    raise ValueError(f"--chunk_size={cfg.chunk_size} must be a multiple of "
                     f"--block_size={cfg.block_size}")
  if "chunk_size_at" in cfg:
    memory.parse_chunk_size_at(cfg.chunk_size_at, block_size=cfg.block_size)
  if "attention" in cfg and cfg.attention not in ATTENTION:
    raise ValueError(f"--attention must be one of {', '.join(ATTENTION)}, got "
                     f"{cfg.attention!r}")
  if "decode_attention" in cfg and cfg.decode_attention not in DECODE_ATTENTION:
    raise ValueError(f"--decode_attention must be one of "
                     f"{', '.join(DECODE_ATTENTION)}, got {cfg.decode_attention!r}")
  if "context_lengths" in cfg:
    points = memory.check_grid(
        context_lengths=cfg.context_lengths, concurrency=cfg.concurrency,
        shared_prefix_fractions=cfg.shared_prefix_fractions,
        num_prefixes=cfg.get("num_prefixes", (1,)))
    longest = max(n for n, *_ in points)
    if cfg.get("max_seq_len", 0) and cfg.max_seq_len < longest:
      raise ValueError(f"--max_seq_len={cfg.max_seq_len} is below the longest "
                       f"--context_lengths value {longest}")
  if cfg.get("workloads", False):
    workloads.check_sizes({k: cfg[k] for k in workloads.SIZE_MINIMUM})


def model_mesh(cfg, model_cfg=None, what: str = "this command"):
  """The jax Mesh of `--mesh` for a command that runs one Engine (one data shard): None for
  one device; ValueError (one line naming the flag) for data > 1, a model size that does not
  split `model_cfg`, or more devices than present. Without `model_cfg`, only the syntax and
  the devices are checked (call again once the model is known)."""
  from hq_jax.mesh import MeshSpec
  spec = MeshSpec.parse(cfg.mesh)
  if spec.data != 1:
    raise ValueError(f"--mesh={spec.label}: {what} runs one data shard (data:1); data "
                     "shards hold independent caches (hq-jax replay --mesh=data:D)")
  return data_meshes(cfg, model_cfg)[0]


def data_meshes(cfg, model_cfg=None) -> list:
  """One jax Mesh per data row of `--mesh` (each what one Engine runs on), or [None] for
  one device; ValueError (one line) as `model_mesh`'s, data > 1 allowed."""
  from hq_jax import mesh as mesh_lib
  spec = mesh_lib.MeshSpec.parse(cfg.mesh)
  spec.check(model_cfg)
  return [None] if spec.num_devices == 1 else mesh_lib.data_shards(spec.make())


def exit_on_error(main):
  """Wraps a command's main: an expected failure (bad flag, bad file, bad model, unusable
  output directory, failed check) ends it with ONE line on stderr naming the input, status
  1, or 2 for a usage error (a bad or missing flag; without the whole --help), never a
  traceback."""
  from hq_jax import weights
  from hq_jax.study import outputs
  from hq_jax.study.errors import HarnessError
  expected = (ValueError, OSError, outputs.OutputError, HarnessError, weights.WeightsError)

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except expected as e:
      sys.exit(f"error: {_one_line(e)}")
  return wrapped


def _one_line(e: BaseException) -> str:
  """An exception as one line; an OS error names its file (a raw `OSError` often lacks it
  in str(), e.g. a failed write)."""
  if isinstance(e, OSError) and e.filename and e.filename not in str(e):
    text = f"{e.filename}: {e.strerror or e}"
  elif isinstance(e, UnicodeDecodeError):
    text = f"not UTF-8 text ({e.reason} at byte {e.start})"
  else:
    text = str(e) or type(e).__name__
  return " ".join(text.split())


def load_model_and_stream(cfg):
  """(params, model config, token stream of the text) for a sweep config."""
  from absl import logging

  from hq_jax import data, tokenizer, weights
  from hq_jax.study.requests import TokenStream

  text = data.read_text(cfg.text_file)
  logging.info("loading model %s (%s)", cfg.model, cfg.dtype)
  params, model_cfg, tok = weights.load_model(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
  ids = tokenizer.encode_text(tok, text, vocab_size=model_cfg.vocab_size)
  stream = TokenStream(ids, model_cfg.vocab_size)
  logging.info("text: %d tokens (%s)", len(stream), tok.name)
  return params, model_cfg, stream


def command_line() -> str:
  import shlex
  import sys
  return " ".join(shlex.quote(a) for a in sys.argv)


def run_command(main, module_name: str, argv=None) -> None:
  """Runs the absl app `main` of the command module `module_name`, whether it was started as
  `hq-jax NAME` or `scripts/NAME.py`: `--help` shows that module's docstring and flags."""
  module = sys.modules[module_name]
  sys.modules["__main__"].__doc__ = module.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's flag parsing, a bad value (`--seed=abc`) one usage line, status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)


def open_run(cfg: ml_collections.ConfigDict, script: str, files, **record):
  """The command's `outputs.Run` in cfg.output_dir, checked (`preflight`) but not opened:
  its record holds the command line, the resolved config, the run metadata and `record`.
  A command calls this after `validate` and before loading anything heavy, and opens the
  run (`with run:`) only once every input has been checked."""
  from hq_jax.mesh import MeshSpec
  from hq_jax.study import outputs
  mesh = {"mesh": MeshSpec.parse(cfg.mesh).label} if "mesh" in cfg else {}
  run = outputs.Run(cfg.output_dir, script, list(files), overwrite=cfg.overwrite,
                    record={"command": command_line(), "config": cfg.to_dict(),
                            **run_metadata(), **mesh, **record})
  run.preflight()
  return run
