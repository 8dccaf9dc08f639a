#!/usr/bin/env python3
"""Print the scalars of a TensorBoard log directory as JSON, read with TensorBoard's own
EventAccumulator, so tests can check that our event files are what TensorBoard reads.

Usage: read-tensorboard.py DIR
Output: {"tag": [[step, value, wall_time], ...], ...} on stdout.
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} DIR")
    # size_guidance 0 = keep every event (the default samples scalars down to 10000).
    acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
    acc.Reload()
    out = {
        tag: [[e.step, e.value, e.wall_time] for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
