#!/usr/bin/env python3
"""AMS-Build benchmarks. Run `cargo build --release` first (only the small `bare_run` baseline of
(a) is built here when missing).

    python3 scripts/bench.py            # all of them, writes BENCHMARKS.md
    python3 scripts/bench.py --runs 30  # more runs for (a)

(a) trigger-to-finish of a one-command pipeline vs plain `docker run --rm` of the same image and
    command and vs the bare Engine API sequence (bollard alone), interleaved in the same run; (f) a build that restores its cache vs the one that
    filled it; (b) preparation of a 200 MB / 10,000-file git repository
    vs `cp -a` of it; (c) host RSS when idle with 1,000 finished builds recorded; (d) webhook
    intake with wrk, against an empty delivery log and one of 1,000,000 deliveries; (e) the
    JSON API's build list with 10,000 builds, the dashboard's size and the host's RSS under that
    load; (g) the packer against `7z a -mx=5 -mmt=2` of 56 MB of crate sources; (h) the size of
    the release binary;
    (i) 60 builds that sleep 2 s drained by one engine vs three, and trigger-to-finish over an
    engine on TCP with mutual TLS vs `docker -H … run` (root); (j) queue drain of 200 dummy builds
    of a git project vs a project without git; (k) 200 one-command container builds with 4 slots
    vs 200 `docker run --rm` 4 at a time.
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("AMSBUILD_BIN", os.path.join(ROOT, "target", "release", "amsbuild"))
IMAGE = "ams-busybox:latest"


def req(sock, obj):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall((json.dumps(obj) + "\n").encode())
    f = s.makefile()
    line = f.readline()
    s.close()
    return json.loads(line)


def follow(sock, name):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall((json.dumps({"cmd": "follow", "build": name}) + "\n").encode())
    f = s.makefile()
    for line in f:
        v = json.loads(line)
        if "status" in v or "error" in v:
            s.close()
            return v.get("status", v.get("error"))
    return None


class Host:
    def __init__(self, data, conf):
        self.data = data
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(data, "web_conf.json"), "w") as f:
            json.dump(conf, f)
        self.sock = os.path.join(data, "amsbuild.sock")
        self.proc = None

    def cli(self, *args):
        return subprocess.run([BIN, "--data-dir", self.data, *args], check=True,
                              capture_output=True, text=True)

    def start(self):
        self.proc = subprocess.Popen([BIN, "--data-dir", self.data, "serve"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if req(self.sock, {"cmd": "ping"}).get("ok"):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise SystemExit("host did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def rss_kb(self, field="VmRSS"):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    def project(self, name, pipeline):
        self.cli("project", "init", name)
        path = os.path.join(self.data, "projects", name, "master", "project_source", "pipeline.json")
        with open(path, "w") as f:
            json.dump(pipeline, f)

    def build(self, project):
        v = req(self.sock, {"cmd": "build", "project": project, "actor": "bench"})
        assert v["ok"], v
        return v["build"]["name"]

    def log(self, project, name):
        with open(os.path.join(self.data, "projects", project, "builds", name, "output.txt")) as f:
            return f.read()


def pipeline(stages, **extra):
    p = {"docker": {"image": IMAGE, "project-dest": "/root/project",
                    "build-output-dest": "/root/project/Builds"},
         "pipeline": stages}
    p.update(extra)
    return p


def ms(x):
    return f"{x * 1000:.1f} ms" if x < 0.01 else f"{x * 1000:.0f} ms"


def ensure_build_network():
    """`ams-build` as the host makes it, for the baselines on that network: on an engine whose
    default bridge keeps containers apart no build makes it."""
    if subprocess.run(["docker", "network", "inspect", "ams-build"],
                      capture_output=True).returncode != 0:
        subprocess.run(["docker", "network", "create", "--driver", "bridge",
                        "-o", "com.docker.network.bridge.enable_icc=false",
                        "--label", "io.ams-build.network=builds", "ams-build"],
                       check=True, capture_output=True)


def bare_run_bin():
    """The bollard-only baseline (crates/ams-docker/examples/bare_run.rs), built if out of date."""
    path = os.path.join(ROOT, "target", "release", "examples", "bare_run")
    subprocess.run(["cargo", "build", "-q", "--release", "--example", "bare_run", "-p", "ams-docker"],
                   cwd=ROOT, check=True)
    return path


def bench_a(host, runs):
    host.project("one", pipeline([{"name": "s", "commands": ["true"]}]))
    bare = bare_run_bin()
    # Builds join the default bridge when it keeps containers apart (dockerd --icc=false).
    icc = subprocess.run(["docker", "network", "inspect", "bridge", "--format",
                          '{{index .Options "com.docker.network.bridge.enable_icc"}}'],
                         capture_output=True, text=True).stdout.strip()
    build_net = "bridge" if icc == "false" else "ams-build"
    ensure_build_network()
    ours, plain, api, api_net, api_same = [], [], [], [], []
    for i in range(runs + 2):
        t0 = time.perf_counter()
        status = follow(host.sock, host.build("one"))
        t1 = time.perf_counter()
        assert status == "pass", status
        subprocess.run(["docker", "run", "--rm", IMAGE, "sh", "-c", "true"], check=True)
        t2 = time.perf_counter()
        # The same container through the Engine API alone (timed inside the bench binary), on
        # the default bridge and on the build network.
        one = float(subprocess.run([bare, IMAGE, "1"], check=True, capture_output=True,
                                   text=True).stdout.split()[0])
        net = float(subprocess.run([bare, IMAGE, "1", "ams-build"], check=True,
                                   capture_output=True, text=True).stdout.split()[0])
        # The same sequence for a container set up as a build's is (its mounts, limits and
        # hardening), on the network builds join on this engine.
        same = float(subprocess.run([bare, IMAGE, "1", build_net, "--as-build"], check=True,
                                    capture_output=True, text=True).stdout.split()[0])
        if i >= 2:  # two warm-up rounds
            ours.append(t1 - t0)
            plain.append(t2 - t1)
            api.append(one)
            api_net.append(net)
            api_same.append(same)
    mo, mp = statistics.median(ours), statistics.median(plain)
    ma, mn, ms = statistics.median(api), statistics.median(api_net), statistics.median(api_same)
    p90 = lambda xs: sorted(xs)[int(len(xs) * 0.9) - 1]
    return {"ours": mo, "plain": mp, "overhead": mo - mp, "api": ma, "api_net": mn,
            "api_as_build": ms, "build_network": build_net,
            "over_api": mo - ma, "over_api_net": mo - mn, "over_api_as_build": mo - ms,
            "ours_p90": p90(ours), "plain_p90": p90(plain), "api_p90": p90(api),
            "api_net_p90": p90(api_net), "api_as_build_p90": p90(api_same), "runs": runs}


def bench_b(host, tmp, runs):
    repo = os.path.join(tmp, "bigrepo")
    os.makedirs(repo)
    for d in range(100):
        sub = os.path.join(repo, f"d{d:03}")
        os.makedirs(sub)
        for i in range(100):
            with open(os.path.join(sub, f"f{i:03}.bin"), "wb") as f:
                f.write(os.urandom(20_000))
    with open(os.path.join(repo, "pipeline.json"), "w") as f:
        json.dump(pipeline([{"name": "s", "commands": ["true"]}],
                           cleanup={"remove_build_source": True, "7z_build": False}), f)
    git = ["git", "-c", "user.email=b@example.com", "-c", "user.name=B"]
    subprocess.run(git + ["init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(git + ["add", "."], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "big"], cwd=repo, check=True)
    host.cli("project", "add", "big", "--git", repo, "--branch", "main")
    src = os.path.join(host.data, "projects", "big", "master", "project_source")
    size = int(subprocess.run(["du", "-sb", "--exclude=.git", src], capture_output=True,
                              text=True).stdout.split()[0])
    files = sum(len(f) for _, _, f in os.walk(src)) - sum(
        len(f) for _, _, f in os.walk(os.path.join(src, ".git")))
    def one_build():
        name = host.build("big")
        status = follow(host.sock, name)
        log = host.log("big", name)
        assert status == "pass", log
        p = float(log.split("source prepared in ")[1].split(" s")[0])
        line = log.split("source for builds/")[1].split("\n")[0]
        c = float(line.rsplit(" in ", 1)[1].split(" s")[0])
        return p, c, line

    prep, copy, cp, clone = [], [], [], []
    kind = ""
    for i in range(runs + 1):
        p, c, line = one_build()
        kind = line.split(": ", 1)[1].split(" (")[0]
        dest = os.path.join(tmp, f"cpa{i}")
        t0 = time.perf_counter()
        subprocess.run(["cp", "-a", src, dest], check=True)
        t1 = time.perf_counter()
        subprocess.run(["rm", "-rf", dest], check=True)
        if i >= 1:
            prep.append(p)
            copy.append(c)
            cp.append(t1 - t0)
    # The fallback where overlay mounts are not possible: a clone of every file.
    cfg = os.path.join(host.data, "projects", "big", "master", "config", "pipeline-config.json")
    with open(cfg, "w") as f:
        json.dump({"branch": "main", "source-copy": "copy"}, f)
    for i in range(2):
        p, c, _ = one_build()
        if i >= 1:
            clone.append(p)
    mp, mc, mcp = statistics.median(prep), statistics.median(copy), statistics.median(cp)
    return {"prep": mp, "copy": mc, "cp": mcp, "ratio": mp / mcp, "size": size,
            "files": files, "runs": runs, "kind": kind, "clone": statistics.median(clone),
            "clone_ratio": statistics.median(clone) / mcp}


def bench_c(host, n):
    host.project("dummy", pipeline([{"name": "s", "commands": ["true"]}], **{"dummy-build": True}))
    names = [host.build("dummy") for _ in range(n)]
    for name in names:
        assert follow(host.sock, name) == "dummy"
    busy = host.rss_kb()
    host.stop()
    host.start()
    time.sleep(2)
    idle = host.rss_kb()
    # Private memory, and the pages of the binary (and libraries) mapped from the page cache.
    anon, mapped = host.rss_kb("RssAnon"), host.rss_kb("RssFile")
    snap = req(host.sock, {"cmd": "builds", "project": "dummy", "limit": 1000})
    assert len(snap["builds"]) == n
    return {"idle_kb": idle, "after_burst_kb": busy, "builds": n, "anon_kb": anon,
            "file_kb": mapped}


def prefill_deliveries(db_path, n, body, with_body=10_000):
    """Writes `n` recorded deliveries of project `p` (most accepted, some pings and ignored
    events), the oldest first: the newest `with_body` are younger than the body age and keep
    the fixture's body, the older ones kept none (as the host's upkeep leaves them)."""
    import sqlite3
    db = sqlite3.connect(db_path)
    now = time.time()
    headers = json.dumps({"content-type": "application/json", "x-github-event": "push"})
    verdicts = ["accepted"] * 8 + ["ping", "ignored"]

    def rows():
        for i in range(n):
            keep = i >= n - with_body
            verdict = "accepted" if keep else verdicts[i % len(verdicts)]
            at = now - 3600 + i * 3600 / n if keep else now - 30 * 86400 + i * (20 * 86400) / n
            yield (f"old-{i}", "p", "gh", at, "github", "push", verdict, None,
                   json.dumps([f"p_{i:040x}_build_{i}"]) if verdict == "accepted" else "[]",
                   headers, body if keep else None)
    db.executemany(
        "INSERT INTO deliveries (delivery_id, project, webhook, received_at, sender, event, "
        "verdict, reason, builds, headers, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def bench_d(tmp, seconds=10, prefill=0):
    """Webhook intake: signed GitHub pushes with wrk on loopback, 2 threads, 50 connections,
    against an empty delivery log or one of `prefill` deliveries."""
    import hashlib
    import hmac
    import shutil
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                       stdout=subprocess.DEVNULL)
    host = Host(os.path.join(tmp, f"hooks{prefill}"), {"max_active_builds": 2, "webhook_ip": "127.0.0.1",
                                             "webhook_port": 0,
                                                "web_interface_ip": "127.0.0.1", "web_interface_port": 0})
    host.project("p", pipeline([{"name": "s", "commands": ["true"]}], **{"dummy-build": True}))
    cfg = os.path.join(host.data, "projects", "p", "master", "config")
    with open(os.path.join(cfg, "pipeline-config.json"), "w") as f:
        json.dump({"only-build-latest": True}, f)
    with open(os.path.join(cfg, "webhooks.json"), "w") as f:
        json.dump({"in-webhooks": [{"name": "gh", "authorized-actors": ["codertocat"],
                                    "secret": "bench-secret"}]}, f)
    fixture = os.path.join(ROOT, "crates", "amsbuild", "tests", "fixtures", "webhooks",
                           "github_push_new_branch.json")
    with open(fixture, "rb") as f:
        body = f.read()
    sig = "sha256=" + hmac.new(b"bench-secret", body, hashlib.sha256).hexdigest()
    lua = os.path.join(tmp, "push.lua")
    with open(lua, "w") as f:
        f.write(f"""
local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
local counter = 0
wrk.method = "POST"
wrk.body = {json.dumps(body.decode())}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-GitHub-Event"] = "push"
wrk.headers["X-Hub-Signature-256"] = "{sig}"
request = function()
  counter = counter + 1
  wrk.headers["X-GitHub-Delivery"] = tid .. "-" .. counter
  return wrk.format(nil, "/ams-build/request?name=gh&project=p")
end
""")
    host.start()
    addr = None
    # The host logs its listener address; find it through the socket-less route: the log file.
    host.stop()
    db_path = os.path.join(host.data, "ams.db")
    t0 = time.perf_counter()
    if prefill:
        prefill_deliveries(db_path, prefill, body)
    fill_secs = time.perf_counter() - t0
    db_before = file_size(db_path)
    logpath = os.path.join(tmp, f"hooks{prefill}-host.log")
    logf = open(logpath, "w")
    host.proc = subprocess.Popen([BIN, "--data-dir", host.data, "serve"],
                                 stdout=logf, stderr=logf)
    deadline = time.time() + 30
    while time.time() < deadline and addr is None:
        with open(logpath) as f:
            for line in f:
                if "webhooks listening on http://" in line:
                    addr = line.split("http://")[1].split("/")[0]
        time.sleep(0.05)
    # The write-ahead log's largest size during the run, sampled every 100 ms.
    import threading
    wal_peak = [0]
    stop = threading.Event()

    def sample_wal():
        while not stop.is_set():
            wal_peak[0] = max(wal_peak[0], file_size(db_path + "-wal"))
            time.sleep(0.1)
    sampler = threading.Thread(target=sample_wal)
    sampler.start()
    out = subprocess.run(["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", "-s", lua,
                          f"http://{addr}"], capture_output=True, text=True, check=True).stdout
    stop.set()
    sampler.join()
    rss = host.rss_kb()
    host.stop()
    rate = float(out.split("Requests/sec:")[1].split()[0])
    total = int(out.split(" requests in ")[0].split()[-1])
    def lat(p):
        v = out.split(f" {p}%")[1].split()[0]
        return float(v[:-2]) / 1000 if v.endswith("ms") else float(v[:-2]) / 1e6 if v.endswith("us") else float(v[:-1])
    non2xx = int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0
    import sqlite3
    db = sqlite3.connect(os.path.join(host.data, "ams.db"))
    accepted = db.execute("SELECT COUNT(*) FROM deliveries WHERE verdict='accepted'").fetchone()[0]
    rows = db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    builds = dict(db.execute("SELECT status, COUNT(*) FROM builds GROUP BY status").fetchall())
    db.close()
    return {"rate": rate, "p50": lat(50), "p99": lat(99), "total": total, "non2xx": non2xx,
            "accepted": accepted, "builds": builds, "rss_kb": rss, "seconds": seconds,
            "prefill": prefill, "rows": rows, "fill_secs": fill_secs, "db_before": db_before,
            "db_after": file_size(db_path), "wal_peak": wal_peak[0]}


def web_addr(logpath):
    deadline = time.time() + 30
    while time.time() < deadline:
        with open(logpath) as f:
            for line in f:
                if "web interface listening on http://" in line:
                    return line.split("http://")[1].split("/")[0]
        time.sleep(0.05)
    raise SystemExit("no web listener in " + logpath)


def wrk(url, seconds, headers=(), script=None):
    """Runs wrk -t2 -c50; returns rate, p50, p99 (seconds), requests, non-2xx."""
    args = ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency"]
    for h in headers:
        args += ["-H", h]
    if script:
        args += ["-s", script]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout

    def lat(p):
        v = out.split(f" {p}%")[1].split()[0]
        return float(v[:-2]) / 1000 if v.endswith("ms") else float(v[:-2]) / 1e6 if v.endswith("us") else float(v[:-1])
    return {"rate": float(out.split("Requests/sec:")[1].split()[0]), "p50": lat(50), "p99": lat(99),
            "total": int(out.split(" requests in ")[0].split()[-1]),
            "non2xx": int(out.split("Non-2xx or 3xx responses:")[1].split()[0]) if "Non-2xx" in out else 0}


def bench_e(tmp, seconds=10, n=10_000):
    """The JSON API: /api/projects/name/X/builds with 10,000 builds recorded, wrk -t2 -c50, a
    bearer token; against a static file of the same host (the HTTP floor), in the same run."""
    import shutil
    import sqlite3
    import threading
    if not shutil.which("wrk"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                       stdout=subprocess.DEVNULL)
    host = Host(os.path.join(tmp, "api"), {"webhook_ip": "127.0.0.1", "webhook_port": 0,
                                           "web_interface_ip": "127.0.0.1", "web_interface_port": 0})
    host.project("X", pipeline([{"name": "s", "commands": ["true"]}], **{"dummy-build": True}))
    # Fifty more projects, so the dashboard lists a realistic number of them.
    for i in range(50):
        host.project(f"other-{i:02}", pipeline([{"name": "s", "commands": ["true"]}],
                                              **{"dummy-build": True}))
    # The schema comes from a first start; the 10,000 finished builds are written in one go.
    host.start()
    host.stop()
    db = sqlite3.connect(os.path.join(host.data, "ams.db"))
    stages = json.dumps([{"name": "build", "exit_code": 0, "passed": True,
                          "started_at": 1.7e9, "duration_secs": 1.5}])
    t0 = 1.7e9
    rows = [("X", i, f"X_{i:040x}_build_{i}", f"{i:040x}", f"{i * 7:040x}",
             ["pass", "fail", "warn"][i % 3], "webhook", "main", f"dev{i % 5}",
             t0 + i * 60, t0 + i * 60 + 1, t0 + i * 60 + 30, stages, f"X_build_{i}.7z",
             f"{i * 13:040x}", "SHA1", f"Commit number {i}\n\nA longer body.")
            for i in range(1, n + 1)]
    db.executemany(
        "INSERT INTO builds (project, build_index, name, hash, git_hash, status, trigger_kind, "
        "branch, created_by, created_at, started_at, finished_at, stages, archive_name, "
        "archive_hash, archive_hash_kind, commit_message) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("UPDATE projects SET latest_build_index = ?, latest_build_key = ? WHERE name = 'X'",
               (n, f"X_{n:040x}_build_{n}"))
    db.commit()
    db.close()
    subprocess.run([BIN, "--data-dir", host.data, "user", "add", "bench", "--level", "5",
                    "--password-stdin"], input="bench password 1\n", text=True, check=True,
                   capture_output=True)
    token = subprocess.run([BIN, "--data-dir", host.data, "token", "create", "--user", "bench", "--label", "bench"],
                           capture_output=True, text=True, check=True).stdout.strip()
    logpath = os.path.join(tmp, "api-host.log")
    logf = open(logpath, "w")
    host.proc = subprocess.Popen([BIN, "--data-dir", host.data, "serve"], stdout=logf, stderr=logf)
    addr = web_addr(logpath)
    base = f"http://{addr}/ams-build"
    # The dashboard of a logged-in user: its size.
    import urllib.parse
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    form = urllib.parse.urlencode({"username": "bench", "password": "bench password 1"}).encode()
    try:
        opener.open(urllib.request.Request(base + "/login", data=form))
        raise SystemExit("login did not redirect")
    except urllib.error.HTTPError as e:
        cookie = e.headers["Set-Cookie"].split(";")[0]
    dash = urllib.request.urlopen(urllib.request.Request(base + "/", headers={"Cookie": cookie})).read()
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(host.rss_kb())
            time.sleep(0.1)
    idle = host.rss_kb()
    t = threading.Thread(target=sample)
    t.start()
    auth = [f"Authorization: Bearer {token}"]
    runs = {}
    # Interleaved: the floor, ours, the floor, ours; the second of each pair is kept.
    for _ in range(2):
        runs["static"] = wrk(base + "/static/app.css", seconds)
        runs["builds"] = wrk(base + "/api/projects/name/X/builds", seconds, auth)
    runs["filtered"] = wrk(base + "/api/projects/name/X/builds/created_by/dev3/status/fail", seconds, auth)
    # Every request a query: fill the response cache with other pages first (it keeps at most
    # 64 per data generation), then cycle through ten pages it no longer takes.
    for per in range(1, 65):
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/api/projects/name/X/builds?per_page={per}",
            headers={"Authorization": f"Bearer {token}"})).read()
    lua = os.path.join(tmp, "pages.lua")
    with open(lua, "w") as f:
        f.write("""
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/ams-build/api/projects/name/X/builds?page=" .. (counter % 10 + 1))
end
""")
    runs["uncached"] = wrk(base + "/", seconds, auth, lua)
    runs["dashboard"] = wrk(base + "/", seconds, [f"Cookie: {cookie}"])
    stop.set()
    t.join()
    host.stop()
    return {"runs": runs, "dashboard_bytes": len(dash), "rss_idle_kb": idle,
            "rss_peak_kb": max(samples), "builds": n, "seconds": seconds}


def bench_f(host, rounds=3):
    """Caches: the first build of a key fills the cache (a simulated dependency download), the
    second restores it. A new key per round, so every round has a miss and a hit."""
    fill = ("if [ ! -f /root/.cache/deps/done ]; then "
            "head -c 64000000 /dev/urandom > /root/.cache/deps/blob && sleep 2 && "
            "touch /root/.cache/deps/done; fi")
    host.project("cached", pipeline([{"name": "deps", "commands": [fill, "ls -l /root/.cache/deps"]}],
                                    caches=[{"key": "deps-{hash:deps.txt}", "path": "/root/.cache/deps"}]))
    src = os.path.join(host.data, "projects", "cached", "master", "project_source")
    miss, hit = [], []
    for r in range(rounds):
        with open(os.path.join(src, "deps.txt"), "w") as f:
            f.write(f"round {r} {time.time()}\n")
        for into in (miss, hit):
            t0 = time.perf_counter()
            name = host.build("cached")
            status = follow(host.sock, name)
            into.append(time.perf_counter() - t0)
            assert status == "pass", (status, host.log("cached", name))
        log = host.log("cached", name)
        assert ": restored" in log and "kept (the entry exists)" in log, log
    return {"miss": statistics.median(miss), "hit": statistics.median(hit),
            "speedup": statistics.median(miss) / statistics.median(hit), "rounds": rounds}


def crate_tree(dest, target=56_000_000):
    """A copy of Rust crate sources from ~/.cargo/registry/src: crates in name order (the
    `windows*`/`winapi*` import-library crates left out, they are mostly binary), each taken
    if it still fits under `target` bytes. Returns (bytes, files)."""
    import glob
    import shutil
    regs = sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/")))
    if not regs:
        raise SystemExit("no crate sources in ~/.cargo/registry/src: run cargo build first")
    os.makedirs(dest)
    total = files = 0
    for d in sorted(os.listdir(regs[0])):
        if d.startswith(("windows", "winapi")):
            continue
        src = os.path.join(regs[0], d)
        sizes = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(src) for f in fs
                 if not os.path.islink(os.path.join(r, f))]
        if total + sum(sizes) > target:
            continue
        shutil.copytree(src, os.path.join(dest, d), symlinks=True)
        total += sum(sizes)
        files += len(sizes)
    return total, files


def bench_g(tmp, rounds=3):
    """The packer (`amsbuild __pack`, as the host runs it) against `7z a -mx=5 -mmt=2` of the
    same tree, interleaved; then `7z t` of ours."""
    src = os.path.join(tmp, "crates")
    size, files = crate_tree(src)
    ours, ref, ours_size, ref_size = [], [], 0, 0
    entries = sorted(os.listdir(src))
    for r in range(rounds):
        a, b = os.path.join(tmp, f"ours{r}.7z"), os.path.join(tmp, f"ref{r}.7z")
        t0 = time.perf_counter()
        subprocess.run([BIN, "__pack", src, a], check=True, stdout=subprocess.DEVNULL)
        t1 = time.perf_counter()
        subprocess.run(["7z", "a", "-mx=5", "-mmt=2", b, *entries], cwd=src, check=True,
                       stdout=subprocess.DEVNULL)
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        ref.append(t2 - t1)
        ours_size, ref_size = os.path.getsize(a), os.path.getsize(b)
        tested = subprocess.run(["7z", "t", a], capture_output=True, text=True)
        assert tested.returncode == 0 and "Everything is Ok" in tested.stdout, tested.stdout
        os.remove(a)
        os.remove(b)
    return {"size": size, "files": files, "rounds": rounds, "ours": ours, "ref": ref,
            "ours_size": ours_size, "ref_size": ref_size,
            "time_ratio": statistics.median(ours) / statistics.median(ref),
            "size_ratio": ours_size / ref_size}


def bench_h():
    """The release binary's size (the profile strips it) and whether symbols are left."""
    out = subprocess.run(["file", BIN], capture_output=True, text=True).stdout
    return {"bytes": os.path.getsize(BIN), "stripped": "not stripped" not in out}


def pack_section(g):
    ours = ", ".join(f"{x:.1f}" for x in g["ours"])
    ref = ", ".join(f"{x:.1f}" for x in g["ref"])
    return f"""## (g) Archiving a build output

{g['size'] / 1e6:.0f} MB / {g['files']:,} files of Rust crate sources (from `~/.cargo/registry/src`,
copied to a temporary folder), packed by `amsbuild __pack` (what the host runs after a build)
and by `7z a -mx=5 -mmt=2` of the same tree, interleaved, {g['rounds']} rounds; every archive of
ours passes `7z t`.

| | time (s), each round | median | size |
|---|---|---|---|
| amsbuild packer | {ours} | {statistics.median(g['ours']):.1f} s | {g['ours_size'] / 1e6:.2f} MB |
| `7z a -mx=5 -mmt=2` | {ref} | {statistics.median(g['ref']):.1f} s | {g['ref_size'] / 1e6:.2f} MB |
| **ratio** | | **{g['time_ratio']:.2f}×** (target ≤ 1.2×) | **{g['size_ratio']:.3f}×** (target ≤ 1.05×) |
"""


def caches_section(f):
    return f"""## (f) Caches

A project whose stage fills a cache (pipeline.json `caches`, key `deps-{{hash:deps.txt}}`) with a
simulated dependency download (64 MB from `/dev/urandom` and 2 s of waiting, standing in for
the network, which this machine's containers do not have) unless the cache already holds it.
Each of {f['rounds']} rounds changes `deps.txt` (a new key), then builds twice: the first build
misses and saves the entry, the second restores it (a clone of the entry into the build).

| build | median, trigger to final record |
|---|---|
| first build of a key (miss, fills and saves the cache) | {ms(f['miss'])} |
| **second build (hit, restored)** | **{ms(f['hit'])}** |
| **speed-up** | **{f['speedup']:.1f}×** |
"""


class Engines:
    """Extra Docker engines as if on other machines: each `dockerd` in its own network namespace
    (never the host's: it would take over docker0), joined by a veth pair, reached over TCP with
    mutual TLS (certificates made here with openssl), with the test image loaded. Needs root."""

    def __init__(self, tmp, n):
        self.tmp, self.n, self.procs = tmp, n, []
        self.pki = os.path.join(tmp, "pki")
        os.makedirs(self.pki)
        o = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
        k = lambda name: os.path.join(self.pki, name)
        o("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bench CA",
          "-keyout", k("ca-key.pem"), "-out", k("ca.pem"))
        self.tag = f"{os.getpid() % 10000}"
        for i in range(1, n + 1):
            ip = f"10.232.{i}.2"
            self._issue(f"e{i}", f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth")
        self._issue("client", "extendedKeyUsage=clientAuth")
        try:
            for i in range(1, n + 1):
                self._start(i)
        except BaseException:
            self.close()
            raise

    def _issue(self, name, ext):
        k = lambda f: os.path.join(self.pki, f)
        with open(k(name + ".ext"), "w") as f:
            f.write(ext.replace("\\n", "\n") + "\n")
        subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                        "-keyout", k(name + "-key.pem"), "-out", k(name + ".csr")],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", k(name + ".csr"), "-CA", k("ca.pem"),
                        "-CAkey", k("ca-key.pem"), "-CAcreateserial", "-days", "2",
                        "-extfile", k(name + ".ext"), "-out", k(name + ".pem")],
                       check=True, capture_output=True)

    def addr(self, i):
        return f"tcp://10.232.{i}.2:2376"

    def _start(self, i):
        ns, veth, peer = f"amsb{self.tag}{i}", f"amsbh{self.tag}{i}", f"amsbp{self.tag}{i}"
        d = os.path.join(self.tmp, f"engine{i}")
        os.makedirs(d)
        run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)
        run("ip", "netns", "add", ns)
        self.procs.append(("netns", ns, veth))
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", ns)
        run("ip", "addr", "add", f"10.232.{i}.1/24", "dev", veth)
        run("ip", "link", "set", veth, "up")
        run("ip", "-n", ns, "addr", "add", f"10.232.{i}.2/24", "dev", peer)
        run("ip", "-n", ns, "link", "set", peer, "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        k = lambda f: os.path.join(self.pki, f)
        log = open(os.path.join(d, "dockerd.log"), "w")
        p = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{ns}", "dockerd",
                              "--host", self.addr(i), "--host", f"unix://{d}/docker.sock",
                              "--data-root", f"{d}/root", "--exec-root", f"{d}/exec",
                              "--pidfile", f"{d}/pid", "--tlsverify", "--tlscacert", k("ca.pem"),
                              "--tlscert", k(f"e{i}.pem"), "--tlskey", k(f"e{i}-key.pem")],
                             stdout=log, stderr=log)
        self.procs.append(("dockerd", p, d))
        env = dict(os.environ, DOCKER_HOST=f"unix://{d}/docker.sock")
        deadline = time.time() + 90
        while subprocess.run(["docker", "version"], env=env, capture_output=True).returncode:
            if time.time() > deadline:
                raise SystemExit(f"engine {i} did not start; see {d}/dockerd.log")
            time.sleep(0.2)
        save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
        subprocess.run(["docker", "load"], stdin=save.stdout, env=env, check=True,
                       capture_output=True)
        save.wait()

    def docker_args(self, i):
        k = lambda f: os.path.join(self.pki, f)
        return ["docker", "-H", self.addr(i), "--tlsverify", "--tlscacert", k("ca.pem"),
                "--tlscert", k("client.pem"), "--tlskey", k("client-key.pem")]

    def conf(self, i, slots):
        k = lambda f: os.path.join(self.pki, f)
        return {"name": f"e{i}", "host": self.addr(i), "slots": slots,
                "tls": {"ca": k("ca.pem"), "cert": k("client.pem"), "key": k("client-key.pem")}}

    def close(self):
        for kind, a, b in reversed(self.procs):
            if kind == "dockerd":
                a.terminate()
                try:
                    a.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    a.kill()
                # Its containerd and shims, found by the engine's own folder.
                for pid in os.listdir("/proc"):
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            if b.encode() in f.read():
                                os.kill(int(pid), 9)
                    except (OSError, ValueError):
                        pass
                with open("/proc/self/mountinfo") as f:
                    mounts = [l.split()[4] for l in f if l.split()[4].startswith(b)]
                for m in sorted(mounts, key=len, reverse=True):
                    subprocess.run(["umount", "-l", m], capture_output=True)
            else:
                subprocess.run(["ip", "link", "del", b], capture_output=True)
                subprocess.run(["ip", "netns", "del", a], capture_output=True)
        self.procs = []


def bench_j(tmp, n=200, rounds=3):
    """Queue drain: `n` dummy builds of one git project queued at once (4 slots), from the last
    trigger until every record is final; the same for a project without git as the baseline."""
    out = {"n": n, "git": [], "plain": [], "git_total": [], "plain_total": []}
    host = Host(os.path.join(tmp, "drain"), {"max_active_builds": 4, "webhook_ip": "127.0.0.1",
                                             "webhook_port": 0, "web_interface_ip": "127.0.0.1",
                                             "web_interface_port": 0})
    repo = os.path.join(tmp, "drain-repo")
    os.makedirs(repo)
    git = lambda *a: subprocess.run(["git", "-C", repo, *a], check=True, capture_output=True)
    git("init", "-q", "-b", "main")
    with open(os.path.join(repo, "pipeline.json"), "w") as f:
        json.dump(pipeline([{"name": "s", "commands": ["true"]}], **{"dummy-build": True}), f)
    git("add", ".")
    git("-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "one")
    host.cli("project", "add", "withgit", "--git", repo, "--branch", "main")
    host.project("nogit", pipeline([{"name": "s", "commands": ["true"]}], **{"dummy-build": True}))
    host.start()
    try:
        for r in range(rounds + 1):
            for project, key in (("withgit", "git"), ("nogit", "plain")):
                t0 = time.perf_counter()
                names = [host.build(project) for _ in range(n)]
                t1 = time.perf_counter()
                for name in names:
                    assert follow(host.sock, name) == "dummy", host.log(project, name)
                t2 = time.perf_counter()
                if r >= 1:  # one warm-up round
                    out[key].append(t2 - t1)
                    out[key + "_total"].append(t2 - t0)
    finally:
        host.stop()
    return out


def bench_k(tmp, n=200, slots=4, rounds=2):
    """`n` one-command container builds with `slots` slots, from the first trigger until every
    record is final, against `n` `docker run --rm` with the same parallelism, interleaved."""
    import concurrent.futures
    out = {"n": n, "slots": slots, "ours": [], "plain": [], "plain_net": []}
    host = Host(os.path.join(tmp, "many"), {"max_active_builds": slots, "webhook_ip": "127.0.0.1",
                                            "webhook_port": 0, "web_interface_ip": "127.0.0.1",
                                            "web_interface_port": 0})
    host.project("one", pipeline([{"name": "s", "commands": ["true"]}]))
    host.start()
    run = lambda _: subprocess.run(["docker", "run", "--rm", IMAGE, "sh", "-c", "true"],
                                   check=True, capture_output=True)
    # The same on `ams-build`, the network builds join where the default bridge lets containers
    # reach each other (no traffic between containers there).
    ensure_build_network()
    run_net = lambda _: subprocess.run(["docker", "run", "--rm", "--network", "ams-build", IMAGE,
                                        "sh", "-c", "true"], check=True, capture_output=True)
    try:
        for r in range(rounds):
            t0 = time.perf_counter()
            names = [host.build("one") for _ in range(n)]
            for name in names:
                assert follow(host.sock, name) == "pass", host.log("one", name)
            out["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(slots) as ex:
                list(ex.map(run, range(n)))
            out["plain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(slots) as ex:
                list(ex.map(run_net, range(n)))
            out["plain_net"].append(time.perf_counter() - t0)
    finally:
        host.stop()
    return out


def drain_section(j, k):
    span = lambda xs: f"{min(xs):.2f}–{max(xs):.2f} s" if len(xs) > 1 else f"{xs[0]:.2f} s"
    rate = lambda xs, n: f"{n / max(xs):.0f}–{n / min(xs):.0f}/s"
    return f"""## (j) Queue drain

`python3 scripts/bench.py --only j`: {j['n']} dummy builds (prepared, no container) of one
project queued at once on the control socket, 4 slots, {len(j['git'])} rounds after a warm-up
round. "Drain" is from the last trigger until every record is final; "total" from the first.

| project | drain after the last trigger | total |
|---|---|---|
| **from git** (each build: the update of master, the source snapshot, the records) | **{span(j['git'])}** (target ≤ 1 s) | {span(j['git_total'])} |
| without git (baseline) | {span(j['plain'])} | {span(j['plain_total'])} |

## (k) Many container builds

`python3 scripts/bench.py --only k`: {k['n']} builds of a one-command pipeline (`true`, default
cleanup) with {k['slots']} slots, from the first trigger until every record is final, against
{k['n']} `docker run --rm {IMAGE} sh -c true` run {k['slots']} at a time, interleaved, {len(k['ours'])} rounds.

| | time | builds/s |
|---|---|---|
| amsbuild, {k['slots']} slots | {span(k['ours'])} | {rate(k['ours'], k['n'])} |
| `docker run --rm`, {k['slots']} at a time | {span(k['plain'])} | {rate(k['plain'], k['n'])} |
| `docker run --rm --network ams-build` (the build network), {k['slots']} at a time | {span(k['plain_net'])} | {rate(k['plain_net'], k['n'])} |
| **ratio of the medians** | **{statistics.median(k['ours']) / statistics.median(k['plain']):.2f}×** (target ≤ 1.10×) | |
| ratio against the same network | {statistics.median(k['ours']) / statistics.median(k['plain_net']):.2f}× | |
"""


def bench_i(tmp, builds=60, runs=10):
    """The engine pool: `builds` builds of a pipeline that sleeps 2 s drained by one local engine
    of 2 slots, then by it and two extra engines of 2 slots; and trigger-to-finish of a
    one-command build on an engine over TCP with mutual TLS against `docker -H … run --rm` on the
    same engine, interleaved."""
    engines = Engines(tmp, 2)
    out = {"builds": builds, "runs": runs}
    try:
        local = {"name": "local", "host": "unix:///var/run/docker.sock", "slots": 2}
        for key, pool in (("one", [local]), ("three", [local, engines.conf(1, 2), engines.conf(2, 2)])):
            host = Host(os.path.join(tmp, f"pool-{key}"), {"engines": pool, "webhook_ip": "127.0.0.1",
                                                           "webhook_port": 0, "web_interface_ip": "127.0.0.1",
                                                           "web_interface_port": 0})
            host.project("sleepy", pipeline([{"name": "s", "commands": ["sleep 2"]}]))
            host.start()
            try:
                # One warm-up build per engine, so the networks exist before the clock starts.
                for name in [host.build("sleepy") for _ in pool]:
                    follow(host.sock, name)
                t0 = time.perf_counter()
                names = [host.build("sleepy") for _ in range(builds)]
                for name in names:
                    assert follow(host.sock, name) == "pass", host.log("sleepy", name)
                out[key] = time.perf_counter() - t0
            finally:
                host.stop()
        host = Host(os.path.join(tmp, "pool-remote"), {"engines": [engines.conf(1, 1)],
                                                       "webhook_ip": "127.0.0.1", "webhook_port": 0,
                                                       "web_interface_ip": "127.0.0.1",
                                                       "web_interface_port": 0})
        host.project("one", pipeline([{"name": "s", "commands": ["true"]}]))
        host.start()
        ours, plain = [], []
        try:
            for r in range(runs + 2):
                t0 = time.perf_counter()
                name = host.build("one")
                assert follow(host.sock, name) == "pass", host.log("one", name)
                t1 = time.perf_counter()
                subprocess.run(engines.docker_args(1) + ["run", "--rm", IMAGE, "sh", "-c", "true"],
                               check=True, capture_output=True)
                t2 = time.perf_counter()
                if r >= 2:
                    ours.append(t1 - t0)
                    plain.append(t2 - t1)
        finally:
            host.stop()
        out["remote"] = statistics.median(ours)
        out["remote_plain"] = statistics.median(plain)
    finally:
        engines.close()
    return out


def engines_section(g):
    return f"""## (i) A pool of engines

`python3 scripts/bench.py --only i` (as root: it starts two extra `dockerd`s, each in its own
network namespace joined by a veth pair and reached over TCP with mutual TLS, as the engines
test does). All engines run on this one 2-core machine, so the pool adds slots, not CPUs; the
builds sleep, so slots are what they need.

{g['builds']} builds of a pipeline whose one stage is `sleep 2`, queued at once, from the first
trigger until the last record is final (after one warm-up build per engine):

| pool | drain time |
|---|---|
| one local engine, 2 slots | {g['one']:.1f} s |
| **the local engine and two engines over TCP+TLS, 2 slots each** | **{g['three']:.1f} s** ({g['one'] / g['three']:.2f}× faster) |

Trigger to final record of a one-command build on an engine over TCP with mutual TLS (the
source, the stage scripts and the output travel through the archive endpoint), against
`docker -H tcp://… --tlsverify run --rm {IMAGE} sh -c true` on the same engine, interleaved,
{g['runs']} runs each after two warm-up rounds:

| | median |
|---|---|
| amsbuild over the remote engine | {ms(g['remote'])} |
| `docker -H … run --rm` on it | {ms(g['remote_plain'])} |
| **overhead** | **{ms(g['remote'] - g['remote_plain'])}** |
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--only", choices=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"],
                    help="run one benchmark, print it, write nothing")
    ap.add_argument("--bin", help="the amsbuild binary (default: target/release/amsbuild)")
    args = ap.parse_args()
    global BIN
    if args.bin:
        BIN = os.path.abspath(args.bin)
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "image.sh")], check=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        host = Host(os.path.join(tmp, "data"), {"max_active_builds": 1, "webhook_ip": "127.0.0.1",
                                                "webhook_port": 0,
                                                "web_interface_ip": "127.0.0.1", "web_interface_port": 0})
        host.start()
        try:
            a = bench_a(host, args.runs) if args.only in (None, "a") else None
            print("a", a, flush=True)
            b = bench_b(host, tmp, 5) if args.only in (None, "b") else None
            print("b", b, flush=True)
            c = bench_c(host, 1000) if args.only in (None, "c") else None
            print("c", c, flush=True)
            d = bench_d(tmp) if args.only in (None, "d") else None
            print("d", d, flush=True)
            d1m = bench_d(tmp, prefill=1_000_000) if args.only in (None, "d") else None
            print("d 1M", d1m, flush=True)
            e = bench_e(tmp) if args.only in (None, "e") else None
            print("e", json.dumps(e, indent=1), flush=True)
            f = bench_f(host) if args.only in (None, "f") else None
            print("f", f, flush=True)
            g = bench_g(tmp) if args.only in (None, "g") else None
            print("g", g, flush=True)
            hb = bench_h() if args.only in (None, "h") else None
            print("h", hb, flush=True)
            i = bench_i(tmp) if args.only in (None, "i") else None
            if i:
                print(engines_section(i), flush=True)
            j = bench_j(tmp) if args.only in (None, "j") else None
            print("j", j, flush=True)
            k = bench_k(tmp) if args.only in (None, "k") else None
            print("k", k, flush=True)
            if j and k:
                print(drain_section(j, k), flush=True)
        finally:
            host.stop()
    if args.only:
        return
    r = e["runs"]
    docker = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                            capture_output=True, text=True).stdout.strip()
    out = f"""# Benchmarks

Made by `python3 scripts/bench.py` (after `cargo build --release`) on {time.strftime('%Y-%m-%d')},
{os.cpu_count()} cores, {platform.system()} {platform.release()}, Docker Engine {docker}.
Baselines ran in the same run, interleaved with ours, since these machines are noisy.

## (a) Trigger to finish, one-command pipeline

A build of a pipeline with one stage `true` in `{IMAGE}` (default cleanup: 7z of the output and
its SHA1), from the trigger on the control socket until the build's record is final, against
`docker run --rm {IMAGE} sh -c true`. {a['runs']} runs each after two warm-up rounds.

| | median | p90 |
|---|---|---|
| amsbuild trigger → final record | {ms(a['ours'])} | {ms(a['ours_p90'])} |
| plain `docker run --rm` | {ms(a['plain'])} | {ms(a['plain_p90'])} |
| the same container through the Engine API alone (create, start, wait, remove; `bare_run`) | {ms(a['api'])} | {ms(a['api_p90'])} |
| the same on the `ams-build` network | {ms(a['api_net'])} | {ms(a['api_net_p90'])} |
| **median overhead** over `docker run` | **{ms(a['overhead'])}** (target ≤ 150 ms) | |
| **median overhead** over the bare Engine API sequence | **{ms(a['over_api'])}** (target ≤ 10 ms); {ms(a['over_api_net'])} over it on the build network | |

The plain baseline pays for the `docker` CLI process and its separate API calls; amsbuild talks to
the engine directly, so its whole flow (database records, source copy, container, 7z and hash of
the output) can come out at or below `docker run` alone.

## (b) Preparing the source of a large repository

A git repository of {b['files']:,} files, {b['size'] / 1e6:.0f} MB (random content) as the project's
master. "Preparation" is everything before the container: git fetch and checkout of the branch
head, `git clean`, and the build's own source ({b['kind']}). {b['runs']} runs, warm cache,
against `cp -a` of the same tree.

| | median |
|---|---|
| amsbuild preparation (git update + build source) | {ms(b['prep'])} |
| of which the build's source (snapshot + overlay mount) | {ms(b['copy'])} |
| `cp -a` of the working tree | {ms(b['cp'])} |
| **ratio** | **{b['ratio']:.2f}× of cp -a** (target ≤ 0.1×) |
| fallback `source-copy: copy` (no overlay), preparation | {ms(b['clone'])} ({b['clone_ratio']:.2f}× of cp -a) |

The default source is copy-on-write: a hard-link snapshot of master (one `link(2)` per file) as
the lower layer of an overlay mount whose upper layer is the build's own, so nothing the build
writes reaches master. Without overlay (a host that cannot mount), every file is cloned: a
reflink where the filesystem has them, a byte copy here on ext4.

## (c) Host memory when idle

The release host after {c['builds']:,} finished builds are recorded (dummy builds), restarted, then
idle for 2 s.

| | RSS |
|---|---|
| **idle, {c['builds']:,} builds in the database** | **{c['idle_kb'] / 1024:.1f} MB** (target ≤ 10 MB) |
| of which private memory (`RssAnon`) | {c['anon_kb'] / 1024:.1f} MB |
| of which pages of the binary and libraries (`RssFile`, shared page cache) | {c['file_kb'] / 1024:.1f} MB |
| right after queueing and finishing them | {c['after_burst_kb'] / 1024:.1f} MB |

## (d) Webhook intake

Signed GitHub pushes (the `github_push_new_branch.json` fixture, HMAC-SHA256, a new delivery id
each) sent by `wrk -t2 -c50 -d{d['seconds']}s` on loopback to the release host, on the same 2 cores.
The project's builds are dummy builds with only-build-latest, so the builds run beside the
intake without containers.

The same run again against a delivery log of {d1m['prefill']:,} recorded deliveries (written
before the start: the newest 10,000 with their bodies, the older ones without, as the host's
upkeep leaves deliveries older than `delivery_body_max_age_days`).

| | empty log | {d1m['prefill']:,} deliveries |
|---|---|---|
| **deliveries/s** | **{d['rate']:.0f}** | **{d1m['rate']:.0f}** (target ≥ 5,000) |
| **p99 latency** | **{ms(d['p99'])}** | **{ms(d1m['p99'])}** (target ≤ 20 ms) |
| p50 latency | {ms(d['p50'])} | {ms(d1m['p50'])} |
| requests / non-2xx answers | {d['total']:,} / {d['non2xx']} | {d1m['total']:,} / {d1m['non2xx']} |
| deliveries recorded as accepted | {d['accepted']:,} | {d1m['accepted']:,} |
| `ams.db` before → after | {d['db_before'] / 1e6:.1f} → {d['db_after'] / 1e6:.1f} MB | {d1m['db_before'] / 1e6:.0f} → {d1m['db_after'] / 1e6:.0f} MB |
| `ams.db-wal`, largest during the run | {d['wal_peak'] / 1e6:.1f} MB | {d1m['wal_peak'] / 1e6:.1f} MB |
| host RSS at the end | {d['rss_kb'] / 1024:.1f} MB | {d1m['rss_kb'] / 1024:.1f} MB |

Accepted deliveries are written in group commits: the host loop takes every delivery waiting
in its channel into one transaction and answers each sender after the commit.

## (e) The JSON API and the dashboard

{e['builds']:,} finished builds of project `X` in the database; `wrk -t2 -c50 -d{e['seconds']}s` on
loopback with an API token (`Authorization: Bearer`), on the same 2 cores. The floor is a
static file of the same host (no database, no authentication), interleaved with the main run.

| request | requests/s | p50 | p99 |
|---|---|---|---|
| static `app.css` (the HTTP floor) | {r['static']['rate']:,.0f} | {ms(r['static']['p50'])} | {ms(r['static']['p99'])} |
| **`/api/projects/name/X/builds`** (50 builds) | **{r['builds']['rate']:,.0f}** | {ms(r['builds']['p50'])} | **{ms(r['builds']['p99'])}** (target ≤ 20 ms) |
| `…/builds/created_by/dev3/status/fail` | {r['filtered']['rate']:,.0f} | {ms(r['filtered']['p50'])} | {ms(r['filtered']['p99'])} |
| `…/builds?page=1…10`, every request a query | {r['uncached']['rate']:,.0f} | {ms(r['uncached']['p50'])} | {ms(r['uncached']['p99'])} |
| the dashboard (session cookie) | {r['dashboard']['rate']:,.0f} | {ms(r['dashboard']['p50'])} | {ms(r['dashboard']['p99'])} |

| | |
|---|---|
| **dashboard HTML** (SERVER ADMIN: 51 projects, 20 builds shown) | **{e['dashboard_bytes'] / 1024:.1f} KB** (target ≤ 100 KB) |
| host RSS before the load | {e['rss_idle_kb'] / 1024:.1f} MB |
| **host RSS, peak during the load** | **{e['rss_peak_kb'] / 1024:.1f} MB** |

Build lists are answered from a small response cache (64 pages, 2 MB) keyed on the store's
generation, which every committed write to builds raises; a script polling the same list is
served without a query until something changes. The "every request a query" row fills that
cache with other pages first, so each of its requests reads SQLite: one query returns the whole
page as one JSON row, and the response is serialized straight from the records. Filters on
columns run in SQL. Non-2xx answers across these runs: {sum(v["non2xx"] for v in r.values())}.

{caches_section(f)}
{pack_section(g)}
## (h) The release binary

`target/release/amsbuild` as `cargo build --release` leaves it (the profile has fat LTO, one
codegen unit and `strip`): **{hb['bytes'] / 1e6:.1f} MB**{'' if hb['stripped'] else ' (NOT stripped)'} (target ≤ 12 MB).

{engines_section(i)}
{drain_section(j, k)}"""
    with open(args.out, "w") as f:
        f.write(out)
    print(out)


if __name__ == "__main__":
    main()
