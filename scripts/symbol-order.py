#!/usr/bin/env python3
"""Writes crates/amsbuild/symbol-order.txt: the functions a release host runs from its start until
it is idle and stopped, which the linker places side by side (crates/amsbuild/build.rs).

    python3 scripts/symbol-order.py

It links the release binary in the compiler's own order with a linker map, records a host that has 200 dummy builds in its
database under `valgrind --tool=callgrind` from its start, through two seconds of idling, to its
stop, and turns every instruction address the host ran into the name of the function section
that holds it. Run it again after a compiler or dependency update: Rust symbol names carry a
hash of the compiler version, so another compiler matches only the C (SQLite) names of the
list. Names the binary lacks are skipped at link time: a stale list loosens the layout without
breaking the build.
Needs valgrind (`apt-get install valgrind`); no Docker engine is needed.
"""

import bisect
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench  # noqa: E402  (the Host driver and the control-socket client)

OUT = os.path.join(ROOT, "crates", "amsbuild", "symbol-order.txt")
BIN = os.path.join(ROOT, "target", "release", "amsbuild")


def link_with_map(path):
    """Links the binary in the compiler's own order, with the map of where each function is."""
    env = dict(os.environ, AMS_LINK_MAP=path, AMS_SYMBOL_ORDER="off")
    if os.path.exists(path):
        os.remove(path)
    subprocess.run(["cargo", "build", "--release", "--bin", "amsbuild"], cwd=ROOT, env=env,
                   check=True)
    if not os.path.exists(path):
        raise SystemExit(f"the linker wrote no map to {path}: is crates/amsbuild/build.rs in use?")


def text_sections(map_path):
    """(start, end, section name) of every input section of `.text`, by address."""
    line = re.compile(r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+\s+\S.*:\(\.text\.(\S+)\)$")
    out = []
    with open(map_path) as f:
        for row in f:
            m = line.match(row)
            if m:
                start, size = int(m.group(1), 16), int(m.group(2), 16)
                # The compiler puts cold, start-up and exit code in `.text.unlikely.NAME`
                # and the like: the symbol is the NAME.
                name = re.sub(r"^(unlikely|hot|startup|exit|split)\.", "", m.group(3))
                if size:
                    out.append((start, start + size, name))
    out.sort()
    return out


def record(data, callgrind_out):
    """Runs the host under callgrind from its start to its stop."""
    cmd = ["valgrind", "--tool=callgrind", "--dump-instr=yes", "--compress-pos=no",
           "--compress-strings=no", f"--callgrind-out-file={callgrind_out}", BIN, "--data-dir",
           data, "serve"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = os.path.join(data, "amsbuild.sock")
    deadline = time.time() + 120
    while True:
        try:
            if bench.req(sock, {"cmd": "ping"}).get("ok"):
                break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("the host did not start under valgrind")
        time.sleep(0.1)
    time.sleep(2)
    bench.req(sock, {"cmd": "ping"})
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def executed(callgrind_out, object_path):
    """Instruction addresses the recorded process ran in `object_path`, as the linker placed them
    (callgrind writes them before relocation, so they match the linker's map)."""
    real = os.path.realpath(object_path)
    addrs = set()
    in_object = False
    with open(callgrind_out) as f:
        for row in f:
            if row.startswith("ob="):
                in_object = os.path.realpath(row[3:].strip()) == real
            elif in_object and row.startswith("0x"):
                addrs.add(int(row.split()[0], 16))
    return addrs


def main():
    map_path = os.path.join(ROOT, "target", "release", "amsbuild.map")
    link_with_map(map_path)
    sections = text_sections(map_path)
    starts = [s[0] for s in sections]
    with tempfile.TemporaryDirectory() as tmp:
        host = bench.Host(os.path.join(tmp, "data"), {"max_active_builds": 1,
                                                      "webhook_ip": "127.0.0.1",
                                                      "webhook_port": 0,
                                                      "web_interface_ip": "127.0.0.1",
                                                      "web_interface_port": 0})
        bench.BIN = BIN
        host.start()
        host.project("dummy", bench.pipeline([{"name": "s", "commands": ["true"]}],
                                             **{"dummy-build": True}))
        for name in [host.build("dummy") for _ in range(200)]:
            assert bench.follow(host.sock, name) == "dummy"
        host.stop()
        out = os.path.join(tmp, "callgrind.out")
        record(host.data, out)
        ran = set()
        addrs = executed(out, BIN)
        placed = 0
        for addr in addrs:
            i = bisect.bisect_right(starts, addr) - 1
            if i >= 0 and addr < sections[i][1]:
                ran.add(i)
                placed += 1
    # In the compiler's order: callers stay beside the functions they call, as LTO left them.
    names = [sections[i][2] for i in sorted(ran)]
    if placed < 0.9 * len(addrs):
        raise SystemExit(f"{len(addrs) - placed} of {len(addrs)} addresses are outside the map's code")
    if len(names) < 500:
        raise SystemExit(f"only {len(names)} functions recorded: did the host start and run?")
    rustc = subprocess.run(["rustc", "-V"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    size = sum(sections[i][1] - sections[i][0] for i in ran)
    with open(OUT, "w") as f:
        f.write("# Written by scripts/symbol-order.py: the functions a release host runs from its\n"
                "# start until it is idle and stopped, placed first by the linker (build.rs).\n"
                f"# Recorded with {rustc}; the Rust names change with the compiler.\n")
        for name in names:
            f.write(name + "\n")
    print(f"{len(names)} functions, {size / 1e6:.2f} MB of {sum(e - s for s, e, _ in sections) / 1e6:.2f} MB"
          f" of code -> {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
