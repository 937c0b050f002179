"""Run a command and print its wall time and peak RSS (MiB) after its own stdout.

Used by the benchmarks: ``python _peak.py CMD ARGS...``.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

t0 = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE)
wall = time.perf_counter() - t0
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
sys.stdout.write(proc.stdout.decode())
print(f"WALL {wall:.6f}")
print(f"PEAK {peak_kib / 1024:.1f}")
sys.exit(proc.returncode)
