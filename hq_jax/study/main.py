"""`hq-jax COMMAND [flags]`: every script of the project from one console entry point.

  hq-jax perplexity --num_tokens=256 --output_dir=DIR
  hq-jax sweep --model=tiny --context_lengths=256 --output_dir=DIR
  hq-jax latency | replay | report | bench kernels | bench e2e | bench blocks | bench host
  hq-jax bench mosaic decode|prefill|shared
  hq-jax COMMAND --help

Each command is an absl app; only the chosen one is imported, so its flags alone are
defined.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "perplexity": "hq_jax.study.commands.perplexity",
    "sweep": "hq_jax.study.commands.sweep",
    "latency": "hq_jax.study.commands.latency",
    "replay": "hq_jax.study.commands.replay",
    "report": "hq_jax.study.commands.report",
    "bench kernels": "hq_jax.study.commands.bench_kernels",
    "bench e2e": "hq_jax.study.commands.bench_e2e",
    "bench blocks": "hq_jax.bench.block_manager",
    "bench host": "hq_jax.bench.host_tier",
    "bench mosaic": "hq_jax.bench.mosaic",
}


def usage() -> str:
  names = "\n".join(f"  hq-jax {name}" for name in COMMANDS)
  return f"usage: hq-jax COMMAND [flags]   (hq-jax COMMAND --help lists its flags)\n{names}"


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  words = argv[1:]
  if not words or words[0] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0 if words else 2)
  name = words[0]
  if name == "bench":
    name = " ".join(words[:2])
  if name not in COMMANDS:
    print(f"error: hq-jax: unknown command {name!r}; the commands are "
          f"{', '.join(COMMANDS)} (hq-jax --help)", file=sys.stderr)
    sys.exit(2)
  rest = words[len(name.split()):]
  module = importlib.import_module(COMMANDS[name])
  module.run([f"hq-jax {name}", *rest])


if __name__ == "__main__":
  main()
