"""Command line: ``python -m trainer <command>`` (also installed as ``traintrain``).

Each command imports what it needs only when it runs, so ``--help`` is instant.
Exit codes: 0 success, 1 the run failed, 2 bad input (config, arguments, files).
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="traintrain", description="TrainTrain: LoRA trainer for Stable Diffusion")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("check-config", help="parse and validate a settings JSON, print it or every problem")
    c.add_argument("file", help="preset / settings JSON (reference format)")

    b = sub.add_parser("buckets", help="print the bucket frames (h, w) that image-size settings make")
    b.add_argument("--size", default="512", help='image size, "S" or "H,W" (default 512)')
    b.add_argument("--step", type=int, default=256, help="bucket step in pixels (default 256)")
    b.add_argument("--min-length", type=int, default=512, help="smallest bucket side (default 512)")
    b.add_argument("--max-ratio", type=float, default=2.0, help="largest aspect ratio (default 2)")

    t = sub.add_parser("train", help="train a network from a settings JSON")
    t.add_argument("config", help="settings JSON (reference preset format)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (JSON key or attribute name); repeatable")
    t.add_argument("--output-dir", default=None, help="where the network is saved (default ./output)")
    t.add_argument("--resume", action="store_true", help="continue the last stopped run of this name")
    t.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    t.add_argument("--logs-dir", default=None, help="where CSV logs and resumable states go (default ./logs)")
    t.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "check-config":
            from trainer.config import check_config_command

            return check_config_command(args.file)
        if args.command == "buckets":
            from trainer.data.buckets import buckets_command

            return buckets_command(args.size, args.step, args.min_length, args.max_ratio)
        if args.command == "train":
            from trainer.jobs import train_command

            return train_command(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
