"""Command line: ``python -m trainer <command>`` (also installed as ``traintrain``).

One module of this package per command (train, check_config, buckets, layout, queue, plot, ui, demo);
each is imported only when its command runs, so ``--help`` is instant.
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

    lay = sub.add_parser("layout", help="list the modules a network setting trains on a full-size model")
    lay.add_argument("--family", required=True, choices=["sd1", "sd2", "sdxl", "flux", "zimage"])
    lay.add_argument("--network-type", default="lierla", help="lierla, c3lier or loha")
    lay.add_argument("--element", default="Full", help="Full, CrossAttention or SelfAttention")
    lay.add_argument("--blocks", default=None,
                     help="comma-separated block ids, e.g. BASE,IN04,M00 or CLIP,T5,D00 "
                          "(default all; on flux/zimage all but the text encoders)")

    t = sub.add_parser("train", help="train a network from a settings JSON")
    t.add_argument("config", help="settings JSON (reference preset format)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (JSON key or attribute name); repeatable")
    t.add_argument("--output-dir", default=None, help="where the network is saved (default ./output)")
    t.add_argument("--resume", action="store_true", help="continue the last stopped run of this name")
    t.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    t.add_argument("--logs-dir", default=None, help="where CSV logs and resumable states go (default ./logs)")
    t.add_argument("--debug", action="store_true", help="show the full traceback on failure")

    u = sub.add_parser("ui", help="serve the TrainTrain page on its own (standalone web UI)")
    u.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    u.add_argument("--models-dir", default=None,
                   help="models root: checkpoints in StableDiffusion/ or Stable-Diffusion/, VAEs in VAE/")
    u.add_argument("--output-dir", default=None, help="where networks are saved (default ./output)")
    u.add_argument("--browser", action="store_true", help="open the page in a browser")
    u.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require this login (use it whenever --host is not 127.0.0.1)")
    u.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="a folder Load JSON may read besides presets/ and jsons/; repeatable. Pages bound "
                        "beyond localhost read only those folders")

    q = sub.add_parser("queue", help="list, add, remove or run the reserved training runs")
    q.add_argument("action", choices=["list", "add", "remove", "requeue", "run"])
    q.add_argument("target", nargs="?", default=None, help="settings JSON for add, item id for remove/requeue")
    q.add_argument("--queue-file", default=None, help="queue file (default jsons/queue.json)")
    q.add_argument("--models-dir", default=None, help="models root for run (as for ui)")
    q.add_argument("--output-dir", default=None, help="where run saves networks (default ./output)")
    q.add_argument("--logs-dir", default=None, help="where run writes CSV logs (default logs/)")

    d = sub.add_parser("demo", help="a first run without a model: train a LoRA on a tiny built-in model (~1 min on CPU)")
    d.add_argument("--folder", default=None, help="where to write everything (default: a new temporary folder)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default 200)")
    d.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")

    g = sub.add_parser("plot", help="draw the loss chart of a CSV log as an image")
    g.add_argument("log", nargs="?", default=None, help="log path or file name under logs/ (default: newest)")
    g.add_argument("--smoothing", type=float, default=0.6, help="loss smoothing 0..0.99 (default 0.6)")
    g.add_argument("--out", default=None, help="image file to write (default <log name>.png here)")
    g.add_argument("--logs-dir", default=None, help="folder searched for logs (default logs/)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "check-config":
            from trainer.cli.check_config import check_config_command

            return check_config_command(args.file)
        if args.command == "buckets":
            from trainer.cli.buckets import buckets_command

            return buckets_command(args.size, args.step, args.min_length, args.max_ratio)
        if args.command == "layout":
            from trainer.cli.layout import layout_command

            return layout_command(args.family, args.network_type, args.element, args.blocks)
        if args.command == "train":
            from trainer.cli.train import train_command

            return train_command(args)
        if args.command == "ui":
            from trainer.cli.ui import serve

            return serve(args)
        if args.command == "queue":
            from trainer.cli.queue import queue_command

            if args.action in ("add", "remove", "requeue") and not args.target:
                parser.error(f"queue {args.action} needs a {'settings JSON' if args.action == 'add' else 'item id'}")
            return queue_command(args)
        if args.command == "demo":
            from trainer.cli.demo import demo_command

            return demo_command(args)
        if args.command == "plot":
            from trainer.cli.plot import plot_command

            return plot_command(args)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
