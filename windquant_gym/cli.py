"""``windquant``: command-line entry point."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _train(argv: List[str]) -> int:
    from .agents.train import TrainArgs, train

    parser = argparse.ArgumentParser(prog="windquant train", description="Train MaskablePPO on WindQuant-v0.")
    defaults = TrainArgs()
    parser.add_argument("--model", default=defaults.model, help="preset name or local folder (default: %(default)s)")
    parser.add_argument("--preset", default=defaults.preset, help="block of agents/hyperparams.yml: WindQuant-v0 (paper), cpu, smoke")
    parser.add_argument("--out", default=defaults.out, help="run folder (default: %(default)s)")
    parser.add_argument("--episodes", type=int, help="override the preset's episode count")
    parser.add_argument("--gamma", type=float, help="override the discount (paper: 0.99)")
    parser.add_argument("--target-bits", type=float, help="one fixed target instead of the curriculum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--hyperparams", help="another hyperparameter YAML")
    parser.add_argument("--no-progress", action="store_true")
    ns = parser.parse_args(argv)
    train(TrainArgs(model=ns.model, preset=ns.preset, out=ns.out, episodes=ns.episodes, gamma=ns.gamma,
                    target_bits=ns.target_bits, seed=ns.seed, device=ns.device, hyperparams=ns.hyperparams,
                    progress=not ns.no_progress))
    return 0


def _bench(argv: List[str]) -> int:
    from .benchmark.bench import main as bench_main

    return bench_main(argv)


COMMANDS = {"train": _train, "bench": _bench}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: windquant {" + ",".join(COMMANDS) + "} [options]   (windquant COMMAND --help)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
