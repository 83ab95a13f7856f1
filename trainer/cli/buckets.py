"""``python -m trainer buckets``: print the bucket frames that image-size settings make."""

from __future__ import annotations

import sys

from trainer.data.buckets import format_frames

# The command's options, named next to the setting names the errors use.
_FLAGS = {"image_size(height, width)": "--size", "image_buckets_step": "--step",
          "image_min_length": "--min-length", "image_max_ratio": "--max-ratio"}


def buckets_command(size: str, step: int, min_length: int, max_ratio: float) -> int:
    """Print the bucket frames (height, width) one per line; 0 on success, 2 for bad input."""
    try:
        lines = format_frames(size, step, min_length, max_ratio)
    except ValueError as exc:
        message = str(exc)
        for key, flag in _FLAGS.items():
            if message.startswith(key):
                message = f"{flag} ({key}){message[len(key):]}"
        print(f"error: {message}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
