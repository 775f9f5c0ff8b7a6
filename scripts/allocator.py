"""glibc's default malloc against the settings LESSONS.md describes, on the in-process batched generation.

    python scripts/allocator.py --model embedded --population 30 --shots 16 --classes 10 --rounds 4

The settings must hold from a process's first large allocation, so each measurement is its own child
process: rounds alternate default, tuned, default, tuned, ... Each child loads the model (as ``serve``
would, in the served dtype), runs one generation of ``bptvlm perf``'s workload (joint prompts,
``--population`` candidates on ``shots x classes`` images) to warm up, then times ``--generations``
more and prints the median wall time and its user and system CPU seconds. The parent prints each
setting's median over the rounds and the ratio default / tuned (> 1: the settings pay).

The settings (``mallopt``, as the ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_TOP_PAD_`` environment variables would at start-up): blocks up to 32 MiB from the heap instead
of fresh ``mmap``s, freed memory kept up to 2 GiB, the heap grown 256 MiB at a time. LESSONS.md measured
them 2.2x faster when joint tuning evaluated candidates one by one and spent its time in the kernel; the
server's batched forward spends ~0.01 s of system time per generation, and this script measured no gain
(BENCHMARKS.md, "The CPU form of the encoders"), so ``serve`` does not apply them.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

SETTINGS = ("default", "tuned")
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
MALLOPT = {
    M_MMAP_THRESHOLD: 32 * 2**20,  # the ceiling of glibc's own dynamic threshold on 64-bit
    M_TRIM_THRESHOLD: 2**31 - 1,  # mallopt takes a C int
    M_TOP_PAD: 256 * 2**20,
}


def tune_malloc() -> bool:
    """Apply :data:`MALLOPT` to this process's glibc malloc; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in MALLOPT.items())


def child(args: argparse.Namespace) -> None:
    from bptvlm.perf import InProcess, make_workload
    from bptvlm.server.loading import load_model
    from bptvlm.server.model import PromptedCLIP
    from bptvlm.server.precision import resolve_dtype

    applied = tune_malloc() if args.child == "tuned" else False
    model = PromptedCLIP(load_model(args.model), dtype=resolve_dtype(args.dtype, torch.device("cpu")))
    work = make_workload(model, args.population, args.shots, args.classes)
    local = InProcess(model, work)
    local.batched(work.text_context, work.visual_prompt)  # warm-up
    walls, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.generations):
        start = time.perf_counter()
        local.batched(work.text_context, work.visual_prompt)
        walls.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"setting": args.child, "applied": applied, "wall": statistics.median(walls),
                      "user": (after.ru_utime - before.ru_utime) / args.generations,
                      "system": (after.ru_stime - before.ru_stime) / args.generations,
                      "max_rss_mib": after.ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--population", type=int, default=30)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--generations", type=int, default=5, help="timed generations per child")
    parser.add_argument("--rounds", type=int, default=4, help="children per setting, alternated")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    flags = list(sys.argv[1:])
    seen: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            out = subprocess.run([sys.executable, __file__, *flags, "--child", setting], check=True,
                                 capture_output=True, text=True).stdout
            seen[setting].append(json.loads(out.strip().splitlines()[-1]))
            print(out.strip().splitlines()[-1], flush=True)
    med = {s: {k: statistics.median(r[k] for r in runs) for k in ("wall", "user", "system", "max_rss_mib")}
           for s, runs in seen.items()}
    for s, m in med.items():
        print(f"{s:<8} median generation {m['wall']:.3f} s wall, {m['user']:.3f} s user, {m['system']:.3f} s system "
              f"CPU; peak RSS {m['max_rss_mib']:.0f} MiB")
    print(f"default / tuned (wall): {med['default']['wall'] / med['tuned']['wall']:.2f}")


if __name__ == "__main__":
    main()
