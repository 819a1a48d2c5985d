"""What the capsid-vmm benchmarks (vmm-startup.py, vmm-snapshot.py) share:
the control socket's one-request client and the nearest-rank percentile.
Imported from the scripts' own directory (Python puts it on sys.path)."""

import json
import math
import socket
import time


def control(path, request, timeout=5.0):
    """Sends `request` (JSON, one line) to capsid-vmm's control socket at
    `path`, retrying the connect until `timeout` s: the decoded answer."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            break
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0005)
    with s:
        s.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def percentile(values, p):
    """Nearest-rank percentile: the smallest value with at least p% of the
    values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]
