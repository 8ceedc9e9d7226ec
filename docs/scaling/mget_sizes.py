"""MGET throughput of one cluster primary by keys per MGET (256-byte values, one hash tag)."""
import re
import subprocess
import tempfile
from pathlib import Path

import redis

from mtrank import store_keys
from tests.cluster import LocalCluster

cluster = LocalCluster(Path(tempfile.mkdtemp())).start()
try:
    tag = "{t}"
    port = cluster.owner(store_keys.key_slot(tag))[1]
    r = redis.Redis(port=port)
    r.mset({f"{tag}k{i}": bytes(256) for i in range(500)})
    for n in (1, 20, 84, 167, 500):
        for c in (1, 4):
            keys = [f"{tag}k{i}" for i in range(n)]
            cmd = ["redis-benchmark", "-p", str(port), "-n", "5000", "-c", str(c), "-q", "MGET", *keys]
            text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            print(f"keys={n} clients={c} mget/s={float(re.findall(r'([0-9.]+) requests per second', text)[-1]):.0f}")
finally:
    cluster.stop()
