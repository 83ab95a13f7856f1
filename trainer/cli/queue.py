"""``python -m trainer queue list|add|remove|requeue|run``: the reserved training runs."""

from __future__ import annotations

import signal
import sys

from trainer.training.queue import JobQueue, QueueError, format_table


def queue_command(args) -> int:
    """``python -m trainer queue list|add FILE|remove ID|requeue ID|run [--output-dir DIR]``."""
    queue = JobQueue(args.queue_file, recover=args.action == "run")
    try:
        if args.action == "list":
            rows = format_table(queue.items())
            owner = queue.runner()
            if owner is not None:
                print(f"the queue is being run by {owner.describe() if owner.pid else 'another program'}")
            if not rows:
                print("the queue is empty")
            for row in rows:
                print(f"{row[0]:>3}  {row[4]:<8} {row[2]:<12} {row[1]}" + (f"  -- {row[5]}" if row[5] else ""))
            return 0
        if args.action == "add":
            from trainer.config import ConfigError, TrainConfig

            try:
                config = TrainConfig.from_json(args.target)
            except ConfigError as error:
                print(f"error: {error}", file=sys.stderr)
                return 2
            item = queue.add(config)
            print(f"Added to Queue: item {item.id} ('{item.name}', {item.mode})")
            return 0
        if args.action in ("remove", "requeue"):
            item = queue.remove(args.target) if args.action == "remove" else queue.requeue(args.target)
            print(f"{'removed' if args.action == 'remove' else 'pending again'}: item {item.id} ('{item.name}')")
            return 0
        return _run_command(queue, args)
    except QueueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run_command(queue: JobQueue, args) -> int:
    from trainer.compat import import_diffusers_without_bitsandbytes, quiet_library_output

    import_diffusers_without_bitsandbytes()  # this process is ours: skip what training never uses
    loud_again = quiet_library_output()
    from trainer.hosts.standalone import StandaloneHost
    from trainer.training.control import TrainControl

    control = TrainControl(on_log=print)

    def on_sigint(signum, frame):
        control.stop()
        print("\nStopping after this step; the rest of the queue stays pending...")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        host = StandaloneHost(args.models_dir, output_dir=args.output_dir or "output")
        done = queue.run_pending(host=host, output_dir=args.output_dir, logs_dir=args.logs_dir, control=control,
                                 on_item=lambda i: print(f"[{i.id}] {i.name}: {i.status} {i.message}".rstrip()))
    finally:
        signal.signal(signal.SIGINT, previous)
        loud_again()
    if not done:
        print("nothing to run: no pending items")
    return 1 if any(i.status == "failed" for i in done) else 0
