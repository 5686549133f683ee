"""Measures a glue.py command as a whole: its wall time, the peak memory of its whole process
tree (the command and every run process it starts, their proportional set sizes summed, so that
library pages they share count once; sampled every 0.2 s), the command's own peak, and what a
run costs before it trains: from the end of the previous run (its last line) to the run's first
epoch header, in seconds, read from the command's output timestamped line by line. `timeline`
keeps every output line with its time.

    python benchmarks/sweep.py --out=result.json -- python glue.py --task_name=wnli --seed=1,2

Used for benchmarks/RESULTS.md ("One process per run"): the memory of a sweep, the start cost of
a run's process, and `--parallel_runs`.
"""

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

HEADER = re.compile(r"^(\S+(?: lr \S+ seed \d+)?)  epoch 1/\d+: \d+ steps")
RESULT = re.compile(r"^(\S+(?: lr \S+ seed \d+)?): (validation|train|trained)")


def tree_pss_mb(root):
    """`(the summed PSS of root and all its descendants, root's own PSS)`, in MB (Linux /proc)."""
    children, pss = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as file:
                parent = int(file.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/smaps_rollup") as file:
                pss[int(pid)] = next(int(line.split()[1]) for line in file
                                     if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(pid))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += pss.get(pid, 0)
        todo += children.get(pid, [])
    return total / 1024, pss.get(root, 0) / 1024


def cpu_description():
    fields = {}
    with open("/proc/cpuinfo") as file:
        for line in file:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "family": fields.get("cpu family"),
            "model_number": fields.get("model"), "cores": len(os.sched_getaffinity(0)),
            "speed_flags": sorted(flags & {"avx512f", "avx512_bf16", "amx_bf16"})}


def measure(command):
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    peak, own, lines = [0.0], [0.0], []

    def sample():
        while process.poll() is None:
            tree, root = tree_pss_mb(process.pid)
            peak[0], own[0] = max(peak[0], tree), max(own[0], root)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in process.stdout:
        lines.append((time.perf_counter() - start, line.rstrip("\n")))
        sys.stdout.write(line)
    process.wait()
    sampler.join()
    wall = time.perf_counter() - start
    # A run's start: from the previous run's result line (or the command's start) to its first
    # epoch header.
    gaps, last = [], 0.0
    for moment, line in lines:
        if HEADER.match(line):
            gaps.append(round(moment - last, 2))
        if RESULT.match(line) and "TFLOP/s" not in line:
            last = moment
    return {"command": command, "exit": process.returncode, "wall_seconds": round(wall, 1),
            "peak_tree_pss_mb": round(peak[0]), "peak_command_pss_mb": round(own[0]),
            "start_to_first_epoch_seconds": gaps,
            "timeline": [(round(moment, 2), line) for moment, line in lines],
            "cpu": cpu_description(), "python": platform.python_version()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the result here, as JSON")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    result = measure(command)
    print(json.dumps({key: value for key, value in result.items()
                      if key not in ("command", "timeline")}))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
