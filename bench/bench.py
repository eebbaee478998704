#!/usr/bin/env python3
"""pacegate benchmark suite (run through bench/run.sh; see BENCHMARKS.md).

End to end, against real processes; benches/ holds the in-process
`cargo bench` figures, which need nothing installed.

Every scenario runs on loopback, bounded in requests and time, with the
release pacegate binary and the project's mock upstream
(examples/mock_upstream.rs, the same code the tests use). Results go to
bench/results/latest.json, charts to bench/results/*.svg, and the tables
between the markers in BENCHMARKS.md are regenerated. Scenarios named on the
command line only print, unless `--update` is given too: then they replace
their own figures in latest.json, charts and tables, and keep the others'.
The token scenario (issue 17) runs the LLM mock (examples/llm_mock.rs) and
two small Python pieces below: the workers' client recipe and a post-paid
counter as LiteLLM's limiter works.
"""

import asyncio
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# PACEGATE_BIN: another build to measure (bench/compare.sh sets it).
PACEGATE = Path(os.environ.get("PACEGATE_BIN", ROOT / "target" / "release" / "pacegate"))
# The profile-guided build the image ships (scripts/build-pgo.sh), measured
# beside the plain one in the overhead scenario; not when PACEGATE_BIN
# names another build to measure.
PACEGATE_PGO = None if "PACEGATE_BIN" in os.environ else ROOT / "target" / "pgo" / "pacegate"
MOCK = ROOT / "target" / "release" / "examples" / "mock_upstream"
LLM_MOCK = ROOT / "target" / "release" / "examples" / "llm_mock"
# hyper 1 on both sides and nothing else: the floor under pacegate's pass-through.
FLOOR = ROOT / "target" / "release" / "examples" / "hyper_floor"
# The floor built as PACEGATE_PGO is (scripts/build-pgo.sh --floor), measured beside it.
FLOOR_PGO = ROOT / "target" / "pgo" / "hyper_floor"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WORK = Path(tempfile.mkdtemp(prefix="pacegate-bench-"))


# --- processes -------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def await_line(stream, pattern, timeout=15):
    """Reads lines until one matches; returns the match (bounded in time)."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        if m := regex.search(line):
            return m
    raise RuntimeError(f"timed out waiting for {pattern!r}")


def drain(stream):
    """Keeps reading a pipe so the child never blocks on a full one."""
    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()


class Mock:
    def __init__(self, limit=None, resources=(), outage=None, latency_ms=0):
        args = [str(MOCK), "--listen", "127.0.0.1:0", "--ignore-stdin", "--latency-ms", str(latency_ms)]
        if outage:  # (start s, duration s): 500 to everything meanwhile
            args += ["--outage", f"{outage[0] * 1000}/{outage[1] * 1000}"]
        if limit:
            args += ["--limit", f"{limit[0]}/{limit[1]}"]
        for resource in resources:  # e.g. "name=writes,limit=20/1000,methods=POST"
            args += ["--resource", resource]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.addr = await_line(self.proc.stdout, r"listening (\S+)").group(1)
        self.url = f"http://{self.addr}"

    def stop(self):
        """Stops the mock and returns its summary (arrival times, statuses)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])


class Pacegate:
    def __init__(self, upstreams, server="", preload=None, binary=PACEGATE):
        self.config = WORK / f"pacegate-{time.monotonic_ns()}.toml"
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n{server}\n{upstreams}')
        started = time.monotonic()
        env = {**os.environ, "PACEGATE_LOG": "warn,pacegate=info"}
        if preload:  # another allocator, e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
            env["LD_PRELOAD"] = preload
        self.proc = subprocess.Popen([str(binary), "--config", str(self.config), "--log-format", "json"],
                                     stderr=subprocess.PIPE, text=True, env=env)
        m = await_line(self.proc.stderr, r"listening proxy=(\S+) admin=([0-9.:]+)", timeout=60)
        self.startup = time.monotonic() - started
        drain(self.proc.stderr)
        self.proxy, self.admin = m.group(1), m.group(2)

    def rss_kib(self):
        return self.status_kib("VmRSS")

    def anon_kib(self):
        """Anonymous resident memory: what requests and connections hold.
        RSS also counts the binary's code pages as they are first run, which
        differ between builds (an LTO build faulted in about 0.5 MB more of
        them while queueing 10 000 requests) and are no request's cost."""
        return self.status_kib("RssAnon")

    def status_kib(self, field):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", status).group(1))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class Redis:
    """One redis-server (or, with program="redis-sentinel", one sentinel)."""

    def __init__(self, options=(), program="redis-server"):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"redis://{self.address}"
        folder = Path(tempfile.mkdtemp(dir=WORK))
        args = [program]
        if program == "redis-sentinel":  # a sentinel needs a config file it may rewrite
            (folder / "sentinel.conf").write_text("")
            args.append(str(folder / "sentinel.conf"))
        else:
            args += ["--save", "", "--appendonly", "no"]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), *options]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        await_line(self.proc.stdout, r"Ready to accept connections|Sentinel ID is")
        drain(self.proc.stdout)

    def section(self):
        return f'[redis]\nurl = "{self.url}"\non_error = "local"\n'

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=30).stdout

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def settle(what, ready, timeout=30):
    """Polls (bounded) until ready() holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def toml_list(urls):
    return "[" + ", ".join(f'"{url}"' for url in urls) + "]"


class RedisCluster:
    """Three masters in cluster mode, joined by redis-cli --cluster create."""

    def __init__(self, masters=3):
        options = lambda: ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-port", str(free_port())]
        self.nodes = [Redis(options()) for _ in range(masters)]
        subprocess.run(["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        settle("cluster_state:ok", lambda: all("cluster_state:ok" in n.cli("cluster", "info") for n in self.nodes))

    def section(self):
        return f'[redis]\ncluster = {toml_list(n.url for n in self.nodes)}\non_error = "local"\n'

    def stop(self):
        for node in self.nodes:
            node.stop()


class RedisSentinels:
    """A master, its replica, and three sentinels (quorum 2, down after 1 s)."""
    NAME = "bench"

    def __init__(self):
        self.master = Redis()
        self.replica = Redis(["--replicaof", "127.0.0.1", str(self.master.port)])
        lines = [f"monitor {self.NAME} 127.0.0.1 {self.master.port} 2", f"down-after-milliseconds {self.NAME} 1000",
                 f"failover-timeout {self.NAME} 10000"]
        options = [word for line in lines for word in ["--sentinel", *line.split()]]
        self.sentinels = [Redis(options, "redis-sentinel") for _ in range(3)]
        settle("replica in sync", lambda: "master_link_status:up" in self.replica.cli("info", "replication"))

        def known(sentinel):
            fields = sentinel.cli("sentinel", "master", self.NAME).split()
            info = dict(zip(fields[::2], fields[1::2]))
            return info.get("num-slaves") == "1" and info.get("num-other-sentinels") == "2"
        settle("sentinels know the replica and each other", lambda: all(known(s) for s in self.sentinels))

    def section(self):
        urls = toml_list(s.url for s in self.sentinels)
        return f'[redis]\nsentinels = {urls}\nmaster = "{self.NAME}"\non_error = "local"\n'

    def stop(self):
        for server in [*self.sentinels, self.master, self.replica]:
            if server.proc.poll() is None:
                server.stop()


def admin(pg, path):
    import urllib.request
    with urllib.request.urlopen(f"http://{pg.admin}{path}", timeout=10) as answer:
        return answer.read().decode()


def admin_json(pg, path):
    return json.loads(admin(pg, path))


def metric(pg, series):
    """The value of one unlabelled series in /metrics."""
    return float(re.search(rf"^{series} (\S+)$", admin(pg, "/metrics"), re.M).group(1))


def upstream(name, base_url, rate, extra=""):
    return (f'[[upstream]]\nname = "{name}"\nbase_url = "{base_url}"\nroute = "/{name}"\nhosts = []\n'
            f'rate = "{rate}"\nqueue_size = 200000\nqueue_timeout = "10m"\n{extra}\n')


# --- load ------------------------------------------------------------------

async def fire(urls, concurrency):
    """GETs every URL with at most `concurrency` in flight; returns statuses."""
    import aiohttp
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(url):
            async with sem:
                try:
                    async with session.get(url) as response:
                        await response.read()
                        return response.status
                except aiohttp.ClientError:
                    return 0
        return await asyncio.gather(*(one(u) for u in urls))


def accepted_times(summary):
    return [t / 1000 for t, s in zip(summary["arrivals_ms"], summary["statuses"]) if s == 200]


def max_in_window(times, window):
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


# --- scenarios -------------------------------------------------------------

def wrk(url, seconds=4, threads=2, connections=64, script=None):
    # `script`: a Lua file that sets the request (the forward targets' absolute-form URIs).
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
                          "-s", str(script or ROOT / "bench" / "wrk_report.lua"), url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    report = json.loads(out.strip().splitlines()[-1])
    report["rps"] = report["requests"] / (report["duration_us"] / 1e6)
    return report


# --- pass-through against other proxies (issue 23) ---------------------------

# 100 bytes, the answer every target passes through.
STATIC_BODY = "x" * 99 + "\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid):
    """`pid` and its descendants (nginx and squid workers, haproxy's master)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, p in parents.items() if p == parent and child not in tree]
        tree.update(children)
        frontier += children
    return tree


def cpu_ticks(pids):
    """User and system ticks of these processes, all their threads included."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user, system = user + int(fields[11]), system + int(fields[12])
    return user, system


def measured(pid, run):
    """Runs `run()` (a load returning a report with `requests`) and adds the
    CPU that the process tree of `pid` spent per request, in µs."""
    pids = process_tree(pid)
    before = cpu_ticks(pids)
    report = run()
    after = cpu_ticks(pids)
    n = max(report["requests"], 1)
    report["user_us"] = (after[0] - before[0]) / CLK_TCK * 1e6 / n
    report["system_us"] = (after[1] - before[1]) / CLK_TCK * 1e6 / n
    return report


def curl_through(proxy, ca, seconds, parallel=8, most=200_000):
    """HTTPS GETs through `proxy` (CONNECT, TLS to the proxy's certificate)
    from one curl process with `parallel` tunnels kept alive, for `seconds`
    (or `most` requests, whichever ends first)."""
    argv = ["curl", "-s", "--http1.1", "-x", f"http://{proxy}", "--cacert", str(ca), "-Z", "--parallel-max",
            str(parallel), "-w", r"\nT %{http_code} %{time_total}\n", f"https://bench.test/[1-{most}]"]
    lines = []
    spent = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    curl = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    reader = threading.Thread(target=lambda: lines.extend(line.split() for line in curl.stdout
                                                          if line.startswith("T ")), daemon=True)
    reader.start()
    try:
        curl.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        curl.terminate()
        curl.wait(timeout=30)
    took = time.monotonic() - started
    reader.join(timeout=30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    times = sorted(float(t) * 1e6 for _, _, t in lines)
    ok = sum(1 for line in lines if line[1] == "200")
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] if times else 0
    client_us = (after.ru_utime + after.ru_stime - spent.ru_utime - spent.ru_stime) * 1e6 / max(len(lines), 1)
    return {"requests": len(lines), "duration_us": took * 1e6, "rps": len(lines) / took, "errors": 0,
            "non_2xx": len(lines) - ok, "p50": pick(0.5), "p99": pick(0.99), "p999": pick(0.999),
            "client_us": client_us}


class Peer:
    """A proxy under test started from its own config; stopped by SIGTERM."""

    def __init__(self, argv, ready, name):
        log = open(WORK / f"{name}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        settle(f"{name} accepting", ready, timeout=60)

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def answers(url, proxy=None):
    """Whether one GET to `url` (through `proxy`) gets a 200 now."""
    import urllib.request
    handlers = [urllib.request.ProxyHandler({"http": f"http://{proxy}"} if proxy else {})]
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def nginx_conf(name, worker_processes, server):
    folder = WORK / name
    folder.mkdir(exist_ok=True)
    conf = folder / "nginx.conf"
    conf.write_text(f"""
worker_processes {worker_processes}; daemon off; pid {folder}/nginx.pid; error_log {folder}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {folder}; proxy_temp_path {folder}; fastcgi_temp_path {folder};
  uwsgi_temp_path {folder}; scgi_temp_path {folder};
  {server}
}}""")
    return [NGINX, "-c", str(conf), "-p", str(folder)]


def pass_through_overhead(cores=2, rounds=3, seconds=4):
    """pacegate against the proxies users would pick instead, each its own
    process with `cores` workers, in front of a static upstream in its own
    nginx (one worker), targets interleaved round by round."""
    static = free_port()
    origin = Peer(nginx_conf("upstream", 1, f'server {{ listen 127.0.0.1:{static}; '
                                              f'location / {{ return 200 "{STATIC_BODY.strip()}\\n"; }} }}'),
                    lambda: answers(f"http://127.0.0.1:{static}/"), "upstream")
    peers, targets = {}, {}
    try:
        port = free_port()
        peers["nginx"] = Peer(nginx_conf("nginx", cores, f"""
  upstream backend {{ server 127.0.0.1:{static}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}"""),
                              lambda: answers(f"http://127.0.0.1:{port}/"), "nginx")
        targets["nginx"] = ("reverse", "nginx", f"http://127.0.0.1:{port}/")
        port = free_port()
        (WORK / "haproxy.cfg").write_text(f"""
global
  nbthread {cores}
  maxconn 4096
defaults
  mode http
  timeout connect 10s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server static 127.0.0.1:{static}
""")
        peers["haproxy"] = Peer([shutil.which("haproxy") or "/usr/sbin/haproxy", "-W", "-db", "-f", str(WORK / "haproxy.cfg")],
                                lambda: answers(f"http://127.0.0.1:{port}/"), "haproxy")
        targets["haproxy"] = ("reverse", "haproxy", f"http://127.0.0.1:{port}/")

        def floor(name, binary):
            listen = f"127.0.0.1:{free_port()}"
            url = f"http://{listen}/"
            peers[name] = Peer([str(binary), listen, f"127.0.0.1:{static}", str(cores)], lambda: answers(url), name)
            targets[name] = ("reverse", name, url)

        floor("hyper floor", FLOOR)
        if PACEGATE_PGO and FLOOR_PGO.exists():
            floor("hyper floor, PGO", FLOOR_PGO)
        port = free_port()
        squid = WORK / "squid"
        squid.mkdir(exist_ok=True)
        if os.geteuid() == 0:  # squid drops to its own user, which must reach its folder
            WORK.chmod(0o755)
            shutil.chown(squid, "proxy", "proxy")
        (WORK / "squid.conf").write_text(f"""
workers {cores}
http_port 127.0.0.1:{port}
http_access allow localhost
http_access deny all
cache deny all
cache_mem 0
access_log none
cache_store_log none
cache_log {squid}/cache.log
pid_filename {squid}/squid.pid
coredump_dir {squid}
server_persistent_connections on
client_persistent_connections on
shutdown_lifetime 1 seconds
""")
        peers["squid"] = Peer([shutil.which("squid") or "/usr/sbin/squid", "-f", str(WORK / "squid.conf"), "--foreground"],
                              lambda: answers(f"http://127.0.0.1:{static}/", f"127.0.0.1:{port}"), "squid")
        targets["squid"] = ("forward", "squid", f"http://127.0.0.1:{port}/")
        confdir = WORK / "mitmproxy"
        confdir.mkdir(exist_ok=True)
        # The peer's counterpart of pacegate's base_url: every intercepted
        # request goes to the static upstream over plain HTTP.
        (confdir / "to_static.py").write_text(
            "def request(flow):\n"
            f"    flow.request.scheme, flow.request.host, flow.request.port = 'http', '127.0.0.1', {static}\n")
        port = free_port()
        peers["mitmproxy"] = Peer([shutil.which("mitmdump") or "mitmdump", "--listen-host", "127.0.0.1",
                                   "--listen-port", str(port), "--set", f"confdir={confdir}",
                                   "--set", "connection_strategy=lazy", "-q", "-s", str(confdir / "to_static.py")],
                                  lambda: (confdir / "mitmproxy-ca-cert.pem").exists()
                                  and answers("http://bench.test/", f"127.0.0.1:{port}"), "mitmproxy")
        targets["mitmproxy"] = ("interception", "mitmproxy", f"127.0.0.1:{port}")
        # pacegate: one upstream claims the route (reverse), 127.0.0.1:static
        # (forward) and bench.test (interception).
        unlimited = upstream("static", f"http://127.0.0.1:{static}", "1000000/s",
                             "burst = 100000\nmax_concurrency = 1024")
        pg = Pacegate(unlimited.replace("hosts = []", f'hosts = ["127.0.0.1:{static}", "bench.test"]'),
                      server=f"workers = {cores}")
        targets["pacegate reverse"] = ("reverse", "pacegate", f"http://{pg.proxy}/static/")
        pgo = None
        if PACEGATE_PGO and PACEGATE_PGO.exists():  # reverse only: the issue-23 target
            pgo = Pacegate(unlimited, server=f"workers = {cores}", binary=PACEGATE_PGO)
            targets["pacegate reverse, PGO"] = ("reverse", "pacegate PGO", f"http://{pgo.proxy}/static/")
        targets["pacegate forward"] = ("forward", "pacegate", f"http://{pg.proxy}/")
        targets["pacegate interception"] = ("interception", "pacegate", pg.proxy)
        forward_lua = WORK / "forward.lua"
        forward_lua.write_text(f'wrk.path = "http://127.0.0.1:{static}/"\n'
                               + (ROOT / "bench" / "wrk_report.lua").read_text())
        pids = {name: peer.proc.pid for name, peer in peers.items()} | {"pacegate": pg.proc.pid}
        if pgo:
            pids["pacegate PGO"] = pgo.proc.pid
        cas = {"mitmproxy": confdir / "mitmproxy-ca-cert.pem", "pacegate": pg.config.parent / "ca.pem"}

        def load(name, seconds, connections=64):
            mode, proxy, url = targets[name]
            if mode == "interception":
                # wrk speaks no CONNECT; one curl process keeps 8 tunnels alive
                # and is measured too (its CPU per request is in the report).
                return lambda: curl_through(url, cas[proxy], seconds)
            script = forward_lua if mode == "forward" else None
            return lambda: wrk(url, seconds, threads=1, connections=connections, script=script)

        targets = {"direct": ("reverse", None, f"http://127.0.0.1:{static}/"), **targets}
        reverse = [name for name in targets if targets[name][0] == "reverse"]
        order = reverse + ["squid", "pacegate forward", "mitmproxy", "pacegate interception"]
        for name in order:  # warm connections, pools and TLS sessions
            load(name, 1)()
        runs = {name: [] for name in order}
        for _ in range(rounds):  # interleaved, so drift on a noisy machine hits all alike
            for name in order:
                mode, proxy, _ = targets[name]
                run = load(name, seconds)
                runs[name].append(measured(pids[proxy], run) if proxy else run())
        # Added latency at one connection: a closed loop, nothing queues.
        single = {name: [] for name in reverse}
        for _ in range(rounds):
            for name in single:
                single[name].append(load(name, 2, connections=1)())
        pg.stop()
        if pgo:
            pgo.stop()
    finally:
        for peer in peers.values():
            peer.stop()
        origin.stop()
    mean = lambda rs, key: statistics.mean(r[key] for r in rs)
    result = {}
    for name in order:
        rs = runs[name]
        row = {"mode": targets[name][0], "rps": mean(rs, "rps"), "rps_runs": [r["rps"] for r in rs],
               "p50_us": mean(rs, "p50"), "p99_us": mean(rs, "p99"), "p999_us": mean(rs, "p999"),
               "errors": sum(r["errors"] + r["non_2xx"] for r in rs)}
        if targets[name][1]:
            row |= {"user_us": mean(rs, "user_us"), "system_us": mean(rs, "system_us")}
        if "client_us" in rs[0]:
            row["client_us"] = mean(rs, "client_us")
        result[name] = row
    for name, rs in single.items():
        result[name]["single_p50_us"] = statistics.median(r["p50"] for r in rs)
        result[name]["single_rps"] = statistics.mean(r["rps"] for r in rs)
    return result


def pacing(rate, k):
    mock = Mock()
    pg = Pacegate(upstream("api", mock.url, f"{rate}/s"))
    statuses = asyncio.run(fire([f"http://{pg.proxy}/api/r{i}" for i in range(k)], 200))
    pg.stop()
    times = accepted_times(mock.stop())
    span = times[-1] - times[0]
    ideal = (k - 1) / rate
    return {"rate": rate, "k": k, "makespan_s": span, "ideal_s": ideal, "vs_ideal_pct": (span / ideal - 1) * 100,
            "max_in_1s_window": max_in_window(times, 1.0), "quota_per_window": rate,
            "caller_failures": sum(s != 200 for s in statuses), "arrivals_s": [t - times[0] for t in times]}


# A rate set above the upstream's real limit, with and without adaptive pacing:
# (configured rate, real limit, real window ms, seconds of load at the real limit).
WRONG_RATES = [("15/s", 10, 1000, 60), ("150/s", 100, 1000, 60), ("900/min", 600, 60000, 180)]


def wrong_rate(configured, real, window_ms, seconds, adaptive):
    """Callers always waiting (enough requests for `seconds` at the real limit),
    through pacegate at `configured` to a mock allowing `real` per `window_ms`."""
    k = real * seconds * 1000 // window_ms
    mock = Mock(limit=(real, window_ms))
    pg = Pacegate(upstream("api", mock.url, configured, f"adaptive = {str(adaptive).lower()}"))
    statuses = asyncio.run(fire([f"http://{pg.proxy}/api/r{i}" for i in range(k)], 100))
    pg.stop()
    summary = mock.stop()
    times = accepted_times(summary)
    span = times[-1] - times[0]
    quota_per_s = real * 1000 / window_ms
    arrivals = len(summary["statuses"])
    return {"configured": configured, "real": f"{real} per {window_ms // 1000} s", "adaptive": adaptive, "k": k,
            "makespan_s": span, "delivered_pct": (len(times) - 1) / span / quota_per_s * 100,
            "upstream_429": summary["statuses"].count(429), "upstream_429_pct": summary["statuses"].count(429) / arrivals * 100,
            "caller_failures": sum(s != 200 for s in statuses)}


def wrong_rates():
    return [wrong_rate(*case, adaptive) for case in WRONG_RATES for adaptive in (True, False)]


CLIENT = r"""
import asyncio, sys, aiohttp
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, wait_random_exponential
url, n, rate, limited = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
async def main():
    limiter = AsyncLimiter(rate, 1) if limited else None
    failures = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def call(i):
            if limiter:
                async with limiter:
                    async with session.get(f"{url}/r{i}") as r:
                        await r.read(); return r.status
            async with session.get(f"{url}/r{i}") as r:
                await r.read(); return r.status
        async def one(i):
            if not limited:
                return await call(i)
            # tenacity with exponential jitter, as the popular articles recommend;
            # after the last attempt the caller gets the last answer (a 429).
            retrying = AsyncRetrying(retry=retry_if_result(lambda s: s == 429),
                                     wait=wait_random_exponential(multiplier=0.5, max=10),
                                     stop=stop_after_attempt(8),
                                     retry_error_callback=lambda state: state.outcome.result())
            return await retrying(call, i)
        sem = asyncio.Semaphore(50)
        async def bounded(i):
            async with sem:
                return await one(i)
        statuses = await asyncio.gather(*(bounded(i) for i in range(n)))
    print(sum(s != 200 for s in statuses))
asyncio.run(main())
"""


def client_side_vs_pacegate(workers=4, k=1000, real=100):
    results = {}
    for mode in ("client_side", "pacegate"):
        mock = Mock(limit=(real, 1000))
        pg = Pacegate(upstream("api", mock.url, f"{real}/s")) if mode == "pacegate" else None
        url = f"http://{pg.proxy}/api" if pg else mock.url
        # Each worker believes it owns the key's whole quota: it does not know the others.
        procs = [subprocess.Popen([sys.executable, "-c", CLIENT, url, str(k // workers), str(real),
                                   "1" if mode == "client_side" else "0"], stdout=subprocess.PIPE, text=True)
                 for _ in range(workers)]
        failures = sum(int(p.communicate(timeout=600)[0].strip() or k) for p in procs)
        if pg:
            pg.stop()
        summary = mock.stop()
        times = accepted_times(summary)
        results[mode] = {"makespan_s": times[-1] - times[0] if times else None, "ideal_s": (k - 1) / real,
                         "upstream_429": summary["statuses"].count(429), "caller_failures": failures}
    return results


# Where the scale figures park requests: behind one attempt the upstream holds
# for ten minutes (`max_concurrency = 1`). A slow quota would not do: pacegate
# answers at once a request that its quota cannot serve within its wait.
PARKED = 'max_concurrency = 1\ntimeout = "10m"\n'


def parking():
    """A mock upstream that holds every request ten minutes, and the upstream entry parking behind it."""
    mock = Mock(latency_ms=600_000)
    return mock, upstream("slow", mock.url, "1000/s", PARKED)


def queued_per_connection(queued):
    """Memory growth (anonymous RSS) per request parked in a queue, each request on its
    own HTTP/1.1 client connection (so the figure includes a connection)."""
    mock, parked = parking()
    pg = Pacegate(parked, server="max_connections = 100000")
    before = pg.anon_kib()

    async def hold():
        import aiohttp
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as s:
            async def one(i):
                try:
                    async with s.get(f"http://{pg.proxy}/slow/q{i}") as r:
                        await r.read()
                except Exception:
                    pass
            tasks = [asyncio.create_task(one(i)) for i in range(queued)]
            depth = await await_depth(pg, queued - 1)
            rss = pg.anon_kib()
            pg.proc.send_signal(signal.SIGKILL)
            for t in tasks:
                t.cancel()
            return depth, rss

    depth, after = asyncio.run(hold())
    pg.proc.wait()
    mock.stop()
    return {"queued": depth, "bytes_per_queued_request": (after - before) * 1024 / max(depth, 1)}


async def await_depth(pg, wanted):
    """Polls /status until the queue holds `wanted` requests (bounded: 60 s)."""
    import aiohttp
    async with aiohttp.ClientSession() as s:
        depth = 0
        for _ in range(600):
            await asyncio.sleep(0.1)
            status = json.loads(await (await s.get(f"http://{pg.admin}/status")).text())
            depth = status["upstreams"][0]["queue"]["depth"]
            if depth >= wanted:
                break
        await asyncio.sleep(0.5)  # let allocations settle before RSS is read
        return depth


def queued_multiplexed(connections=50, streams=200):
    """Memory growth (anonymous RSS) per request parked in a queue, the requests
    multiplexed as h2c streams over a few connections (200 each, hyper's
    default stream limit). Memory is read once the connections are open and
    again once every stream is queued, so the figure is the cost of a
    queued request alone, without its share of a connection."""
    import h2.config
    import h2.connection
    import h2.events
    mock, parked = parking()
    pg = Pacegate(parked)
    host, port = pg.proxy.rsplit(":", 1)

    async def open_h2():
        reader, writer = await asyncio.open_connection(host, int(port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        # The server's SETTINGS carry its stream limit: wait for them (bounded).
        for _ in range(100):
            data = await asyncio.wait_for(reader.read(65536), 10)
            events = conn.receive_data(data)
            writer.write(conn.data_to_send())
            if any(isinstance(e, h2.events.RemoteSettingsChanged) for e in events):
                break
        return reader, writer, conn

    def send_streams(writer, conn, first):
        for i in range(streams):
            conn.send_headers(conn.get_next_available_stream_id(),
                              [(":method", "GET"), (":scheme", "http"), (":authority", pg.proxy),
                               (":path", f"/slow/m{first + i}")], end_stream=True)
        writer.write(conn.data_to_send())

    async def hold():
        opened = [await open_h2() for _ in range(connections)]
        await asyncio.sleep(1)  # connections settle: their cost is in `before`
        before = pg.anon_kib()
        for n, (_, writer, conn) in enumerate(opened):
            send_streams(writer, conn, n * streams)
            await writer.drain()
        # The first request takes the one attempt in flight, the others wait.
        depth = await await_depth(pg, connections * streams - 1)
        after = pg.anon_kib()
        pg.proc.send_signal(signal.SIGKILL)
        for _, writer, _ in opened:
            writer.close()
        return depth, before, after

    depth, before, after = asyncio.run(hold())
    pg.proc.wait()
    mock.stop()
    return {"connections": connections, "queued": depth,
            "bytes_per_queued_request": (after - before) * 1024 / max(depth, 1)}


def scale(queued=10000, upstreams=10000):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * queued)), hard))
    result = {"per_connection": queued_per_connection(queued), "multiplexed": queued_multiplexed()}
    blocks = "".join(f'[[upstream]]\nname = "u{i}"\nbase_url = "http://127.0.0.1:9/{i}"\nroute = "/u{i}"\n'
                     f'hosts = []\nrate = "10/s"\n' for i in range(upstreams))
    big = Pacegate(blocks)
    result.update({"upstreams": upstreams, "startup_s": big.startup, "rss_mib": big.rss_kib() / 1024})
    big.stop()
    return result


ALLOCATORS = {"glibc": None, "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
              "mimalloc": "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2"}


def flood_rss(pg, commands):
    """Runs `commands` (curl uploads) at once; pacegate's peak RSS while
    they run and its RSS 3 s after the last ended, in MiB."""
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], pg.rss_kib())
            time.sleep(0.01)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for c in commands]
    outputs = [p.communicate(timeout=300) for p in procs]
    done.set()
    sampler.join()
    time.sleep(3)
    # curl --fail exits non-zero on a failure; h2load reports "N succeeded".
    failures = 0
    for proc, (out, _) in zip(procs, outputs):
        if m := re.search(r"(\d+) total, \d+ started, \d+ done, (\d+) succeeded", out or ""):
            failures += int(m.group(1)) - int(m.group(2))
        elif proc.returncode:
            failures += 1
    return {"peak_mib": peak[0] / 1024, "after_mib": pg.rss_kib() / 1024, "client_failures": failures}


def flood(connections=150, streams=60, body_mib=9):
    """Memory under body floods (issue 22): `connections` HTTP/1.1 clients
    each POSTing a `body_mib` MiB body (buffered: under max_body_bytes) at
    once (curl), then one h2c connection carrying `streams` such uploads
    at once (h2load); with the
    default max_buffered_bytes (256 MiB), with the bound lifted (as before
    it existed), and with jemalloc or mimalloc preloaded instead of glibc's
    allocator."""
    body = WORK / "flood.bin"
    body.write_bytes(os.urandom(body_mib << 20))
    mock = Mock()
    runs = {}
    for bound, allocator in (("bounded", "glibc"), ("unbounded", "glibc"), ("bounded", "jemalloc"),
                             ("unbounded", "jemalloc"), ("bounded", "mimalloc")):
        if ALLOCATORS[allocator] and not Path(ALLOCATORS[allocator]).exists():
            continue
        server = "max_buffered_bytes = 1_099_511_627_776\n" if bound == "unbounded" else ""
        pg = Pacegate(upstream("api", mock.url, "100000/s", "max_concurrency = 1000\n"), server=server,
                      preload=ALLOCATORS[allocator])
        url = f"http://{pg.proxy}/api/echo"
        idle = pg.rss_kib() / 1024
        h1 = flood_rss(pg, [["curl", "-s", "-o", "/dev/null", "--fail", "--http1.1", "--max-time", "120",
                             "--data-binary", f"@{body}", url] for _ in range(connections)])
        h2 = flood_rss(pg, [["h2load", "-n", str(streams), "-c", "1", "-m", str(streams), "-d", str(body), url]])
        pg.stop()
        runs[f"{bound}_{allocator}"] = {"bound": bound, "allocator": allocator, "idle_mib": idle, "h1": h1, "h2": h2}
    mock.stop()
    return {"connections": connections, "streams": streams, "body_mib": body_mib, "runs": runs}


def flood_table(f):
    lines = ["", f"### Body floods ({f['connections']} HTTP/1.1 uploads of {f['body_mib']} MiB at once; then one h2c "
             f"connection with {f['streams']} such uploads; pacegate's RSS)", "",
             "| max_buffered_bytes | allocator | idle | HTTP/1.1 flood: peak | 3 s after | h2c flood: peak | 3 s after | "
             "client failures |", "|---|---|---|---|---|---|---|---|"]
    for v in f["runs"].values():
        bound = "256 MiB (default)" if v["bound"] == "bounded" else "none (as before it existed)"
        lines.append(f"| {bound} | {v['allocator']} | {v['idle_mib']:.0f} MiB | {v['h1']['peak_mib']:.0f} MiB | "
                     f"{v['h1']['after_mib']:.0f} MiB | {v['h2']['peak_mib']:.0f} MiB | {v['h2']['after_mib']:.0f} MiB | "
                     f"{v['h1']['client_failures'] + v['h2']['client_failures']} |")
    return lines


def redis_ha(k=900, real=50):
    """Requests/s and p99 through one pacegate sharing an unlimited quota
    through one server, a 3-master cluster and Sentinel; then two replicas
    at a shared quota through Sentinel while its master is killed."""
    mock = Mock()
    unlimited = upstream("api", mock.url, "1000000/s", "burst = 100000\nmax_concurrency = 1024")
    throughput = {}
    for name, make in (("server", Redis), ("cluster", RedisCluster), ("sentinel", RedisSentinels)):
        redis = make()
        pg = Pacegate(unlimited, redis.section())
        report = wrk(f"http://{pg.proxy}/api/x")
        throughput[name] = {"rps": report["rps"], "p99_us": report["p99"], "errors": report["errors"] + report["non_2xx"],
                            "shared": admin_json(pg, "/status")["redis"]["up"]}
        pg.stop(), redis.stop()
    mock.stop()

    # The failover: k requests from 100 callers over two replicas at a shared
    # `real`/s; the master is SIGKILLed once a third of them went out. Times
    # are on the mock's clock (ms since it started listening).
    sentinels, mock = RedisSentinels(), Mock()
    mock_started = time.monotonic()
    replicas = [Pacegate(upstream("api", mock.url, f"{real}/s"), sentinels.section()) for _ in range(2)]
    urls = [f"http://{replicas[i % 2].proxy}/api/f{i}" for i in range(k)]
    marks = {}

    def shared_through(address):
        states = [admin_json(pg, "/status")["redis"] for pg in replicas]
        return all(state["up"] and state["master"] == address for state in states)

    def kill_then_watch():
        time.sleep(k / real / 3)
        marks["killed"] = time.monotonic() - mock_started
        sentinels.master.proc.kill()
        settle("shared again through the promoted replica", lambda: shared_through(sentinels.replica.address), 60)
        marks["resumed"] = time.monotonic() - mock_started
    # Each replica's redis.up every 50 ms, for the allowance below.
    polls, polling = [[] for _ in replicas], threading.Event()

    def poll():
        while not polling.is_set():
            for seen, pg in zip(polls, replicas):
                seen.append((time.monotonic() - mock_started, admin_json(pg, "/status")["redis"]["up"]))
            time.sleep(0.05)
    watcher, poller = threading.Thread(target=kill_then_watch), threading.Thread(target=poll)
    watcher.start(), poller.start()
    statuses = asyncio.run(fire(urls, 100))
    watcher.join()
    polling.set(), poller.join()
    fallbacks = sum(metric(pg, "pacegate_redis_fallbacks_total") for pg in replicas)
    for pg in replicas:
        pg.stop()
    summary = mock.stop()
    sentinels.stop()
    times = accepted_times(summary)
    killed, resumed = marks["killed"], marks["resumed"]
    worst = over_allowance(times, real, [fallback_spans(seen) for seen in polls])
    return {"throughput": throughput,
            "failover": {"replicas": 2, "rate": real, "k": k, "caller_failures": sum(s != 200 for s in statuses),
                         "shared_again_after_s": resumed - killed, "fallbacks": fallbacks,
                         "max_in_1s_window_before": max_in_window([t for t in times if t < killed], 1.0),
                         "max_in_1s_window_during": max_in_window([t for t in times if killed <= t < resumed + 1], 1.0),
                         "max_in_1s_window_after": max_in_window([t for t in times if t >= resumed + 1], 1.0),
                         "fallback_spans_s": [[(round(a, 2), round(b - a, 2)) for a, b, _, _ in fallback_spans(seen)]
                                              for seen in polls],
                         "worst_vs_allowance": worst}}


def fallback_spans(polls):
    """One replica's fallbacks from (t, up) polls: (outer start, outer end,
    inner start, inner end), outer from the last poll that saw it shared to
    the first that saw it shared again, inner from the first poll that saw
    it alone to the last."""
    spans, last_up, down = [], polls[0][0] if polls else 0.0, None
    for t, up in polls:
        if up and down:
            spans.append((last_up, t, *down))
            down = None
        elif not up:
            down = (down[0], t) if down else (t, t)
        if up:
            last_up = t
    if down:
        spans.append((last_up, polls[-1][0], *down))
    return spans


def over_allowance(times, rate, replicas):
    """The allowance docs/operations.md states (and tests/redis.rs checks),
    on every 1 s window of arrival `times` at a shared `rate`/s: the shared
    schedule while some replica shares (one more per stretch of it), plus
    rate x t + 1 for each replica that paced alone for t of the window
    (grants made then may arrive 50 ms later), plus one late arrival.
    Returns the window whose count came closest to (or went over) its
    allowance: start, count, allowance."""
    overlap = lambda spans, a, b: sum(max(0.0, min(y, b) - max(x, a)) for x, y in spans)
    both = [(max(p[2], q[2]), min(p[3], q[3])) for p in replicas[0] for q in replicas[1]]
    all_down = [(a, b) for a, b in both if a < b]
    worst = None
    for i, start in enumerate(times):
        end = start + 1.0
        count = sum(1 for t in times[i:] if t < end)
        stretches = 1 + sum(1 for a, b in all_down if a > start and b < end)
        allowance = math.ceil(rate * (1.0 - overlap(all_down, start, end))) + stretches + 1
        for spans in replicas:
            alone = overlap([(a, b + 0.05) for a, b, _, _ in spans], start, end)
            if alone > 0:
                allowance += math.ceil(rate * alone) + 1
        if worst is None or count - allowance > worst["count"] - worst["allowance"]:
            worst = {"start_s": round(start, 2), "count": count, "allowance": allowance}
    return worst


# --- report ----------------------------------------------------------------

def redis_mode(k=500, real=50):
    """Throughput with an unlimited quota, local vs Redis (interleaved), and
    two replicas sharing one quota through Redis."""
    redis, mock = Redis(), Mock()
    unlimited = upstream("api", mock.url, "1000000/s", "burst = 100000\nmax_concurrency = 1024")
    local, shared = Pacegate(unlimited), Pacegate(unlimited, redis.section())
    runs = {"local": [], "redis": []}
    for _ in range(2):
        for name, pg in (("local", local), ("redis", shared)):
            runs[name].append(wrk(f"http://{pg.proxy}/api/x"))
    local.stop(), shared.stop(), mock.stop()
    throughput = {name: {"rps": statistics.mean(r["rps"] for r in rs), "p99_us": statistics.mean(r["p99"] for r in rs),
                         "errors": sum(r["errors"] + r["non_2xx"] for r in rs)} for name, rs in runs.items()}
    mock = Mock(limit=(real, 1000))
    replicas = [Pacegate(upstream("api", mock.url, f"{real}/s"), redis.section()) for _ in range(2)]
    urls = [f"http://{replicas[i % 2].proxy}/api/r{i}" for i in range(k)]
    statuses = asyncio.run(fire(urls, 100))
    for pg in replicas:
        pg.stop()
    summary = mock.stop()
    redis.stop()
    times = accepted_times(summary)
    ideal = (k - 1) / real
    return {"throughput": throughput,
            "replicas": {"replicas": 2, "rate": real, "k": k, "makespan_s": times[-1] - times[0], "ideal_s": ideal,
                         "vs_ideal_pct": ((times[-1] - times[0]) / ideal - 1) * 100,
                         "max_in_1s_window": max_in_window(times, 1.0),
                         "upstream_429": summary["statuses"].count(429),
                         "caller_failures": sum(s != 200 for s in statuses)}}


# --- endpoint limits (issue 18) ---------------------------------------------

async def fire_timed(requests, spacing):
    """Sends the (method, url) list in order, one every `spacing` seconds
    whatever the answers; returns (status, seconds from its send to its answer)."""
    import aiohttp
    connector = aiohttp.TCPConnector(limit=len(requests))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        started = time.monotonic()

        async def one(i, method, url):
            await asyncio.sleep(max(0.0, started + i * spacing - time.monotonic()))
            sent = time.monotonic()
            try:
                async with session.request(method, url, data=b"{}" if method == "POST" else None) as response:
                    await response.read()
                    return response.status, time.monotonic() - sent
            except aiohttp.ClientError:
                return 0, time.monotonic() - sent
        return await asyncio.gather(*(one(i, m, u) for i, (m, u) in enumerate(requests)))


def max_units_in_window(times, units, window):
    """Most units accepted within any sliding `window` (times sorted)."""
    best, total, j = 0, 0, 0
    for i, t in enumerate(times):
        total += units[i]
        while times[j] <= t - window:
            total -= units[j]
            j += 1
        best = max(best, total)
    return best


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def endpoint_limits(k=400, arrive_s=2.0, posts=0.2, points=180, writes=20, post_cost=5):
    """GitHub-shaped traffic (80 % reads, 20 % writes, arriving in `arrive_s`,
    far faster than the limits) against a mock with GitHub's two per-minute
    limits scaled to one second: points (a POST costs 5) and writes (POSTs
    only), in GitHub's proportions (900 points and 80 writes a minute). pacegate with `[[upstream.limit]]`
    tables modelling them, against pacegate with one request rate."""
    rng = random.Random(18)
    methods = ["POST"] * int(k * posts) + ["GET"] * (k - int(k * posts))
    rng.shuffle(methods)
    mean_cost = posts * post_cost + (1 - posts)
    limit_tables = lambda points_rate: (
        f'[[upstream.limit]]\nname = "points"\nrate = "{points_rate}/s"\ncost = {{ default = 1, POST = {post_cost} }}\n'
        f'[[upstream.limit]]\nname = "writes"\nmethods = ["POST"]\nrate = "{writes}/s"\n')
    # Even pacing by cost lets a window see N plus one request's cost: leave
    # the costliest request's units free, as docs/tokens.md advises.
    configs = {
        "limits": ("1000/s", points - post_cost),
        "limits_exact": ("1000/s", points),
        # All-POST traffic at this rate breaks no limit: the safe single rate.
        "single_rate": (f"{min(writes, points // post_cost)}/s", None),
        # The mix's average fits both limits on average, not in every window.
        "average_rate": (f"{int(min(points / mean_cost, writes / posts))}/s", None),
    }
    results = {}
    for name, (rate, points_rate) in configs.items():
        extra = limit_tables(points_rate) if points_rate else ""
        mock = Mock(resources=[f"name=points,limit={points}/1000,cost.POST={post_cost}",
                               f"name=writes,limit={writes}/1000,methods=POST"])
        pg = Pacegate(upstream("github", mock.url, rate, extra))
        requests = [(m, f"http://{pg.proxy}/github/repos/o/r/issues" + ("" if m == "POST" else f"/{i}"))
                    for i, m in enumerate(methods)]
        answers = asyncio.run(fire_timed(requests, arrive_s / k))
        pg.stop()
        summary = mock.stop()
        ok = [(t / 1000, m) for t, s, m in zip(summary["arrivals_ms"], summary["statuses"], summary["methods"])
              if s == 200]
        times = [t for t, _ in ok]
        reads = [lat for (s, lat), m in zip(answers, methods) if m == "GET" and s == 200]
        writes_done = [lat for (s, lat), m in zip(answers, methods) if m == "POST" and s == 200]
        results[name] = {
            "rate": rate, "limits": f"points {points_rate}/s, writes {writes}/s" if points_rate else "-",
            "makespan_s": times[-1] - times[0], "upstream_429": summary["statuses"].count(429),
            "caller_failures": sum(s != 200 for s, _ in answers),
            "read_p50_s": percentile(reads, 0.5), "read_p95_s": percentile(reads, 0.95),
            "write_p50_s": percentile(writes_done, 0.5), "last_read_s": max(reads, default=None),
            "max_points_in_1s": max_units_in_window(times, [post_cost if m == "POST" else 1 for _, m in ok], 1.0),
            "max_writes_in_1s": max_in_window([t for t, m in ok if m == "POST"], 1.0),
            "accepted_s": {m: [t - times[0] for t, mm in ok if mm == m] for m in ("GET", "POST")}}
    return {"k": k, "arrive_s": arrive_s, "posts": posts, "points": points, "writes": writes, "post_cost": post_cost,
            "ideal_s": max(k * mean_cost / points, k * posts / writes), "runs": results}


# --- token quotas (issue 17) ------------------------------------------------

class LlmMock:
    """examples/llm_mock.rs: the tests' mock LLM API with a strict token window."""

    def __init__(self, limit, window_ms, output_len, latency_ms=100, stream_chunks="16/20"):
        self.proc = subprocess.Popen([str(LLM_MOCK), "--listen", "127.0.0.1:0", "--token-limit", f"{limit}/{window_ms}",
                                      "--output-len", str(output_len), "--latency-ms", str(latency_ms),
                                      "--stream-chunks", stream_chunks], stdout=subprocess.PIPE, text=True)
        self.url = "http://" + await_line(self.proc.stdout, r"listening (\S+)").group(1)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])


WORDS = "the quota token window model answer stream request limit pace queue retry".split()


def llm_mix(k, output_len, seed=17):
    """K chat calls: prompts of 100 to 8 000 characters, log-uniform (many
    short, a few long, as chat traffic is), max_tokens 64 to 512
    (the mock answers at most `output_len`, so settling gives tokens back),
    a third streamed with usage. Returns the bodies and what the mock will
    charge each (its deterministic count: characters / 4, plus the output)."""
    rng = random.Random(seed)
    calls, costs = [], []
    for i in range(k):
        words, size = [], math.exp(rng.uniform(math.log(100), math.log(8000)))
        while sum(len(w) + 1 for w in words) < size:
            words.append(rng.choice(WORDS))
        content = " ".join(words)
        cap = rng.choice([64, 128, 256, 512])
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": cap}
        if i % 3 == 0:
            body.update(stream=True, stream_options={"include_usage": True})
        calls.append(body)
        costs.append(math.ceil((len("user") + len(content)) / 4) + min(cap, output_len))
    return calls, costs


def best_request_rate(costs, limit):
    """The most calls per window such that every run of that many
    consecutive calls fits the token limit: the fastest request-only rate
    that never breaks the window for this very sequence, in hindsight."""
    m = 1
    while m < len(costs) and max(sum(costs[i:i + m + 1]) for i in range(len(costs) - m)) <= limit:
        m += 1
    return m


# One worker process of the token scenario: its share of the calls, with at
# most 50 in flight; optionally an aiolimiter token bucket at the full limit
# (the estimate users write: characters / 4 plus max_tokens) and tenacity
# retrying 429s with exponential jitter. Prints failures, 429s seen, latencies.
LLM_CLIENT = r"""
import asyncio, json, math, sys, time, aiohttp
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, wait_random_exponential
url, calls_file, worker, workers, limit, window, retries = sys.argv[1:8]
calls = json.load(open(calls_file))[int(worker)::int(workers)]
limiter = AsyncLimiter(int(limit), float(window)) if int(limit) else None
seen_429 = 0
async def main():
    global seen_429
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def call(body):
            global seen_429
            if limiter:
                await limiter.acquire(math.ceil(len(body["messages"][0]["content"]) / 4) + body["max_tokens"])
            async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                await r.read()
                seen_429 += r.status == 429
                return r.status
        async def one(body):
            if retries == "0":
                return await call(body)
            retrying = AsyncRetrying(retry=retry_if_result(lambda s: s == 429),
                                     wait=wait_random_exponential(multiplier=0.5, max=10),
                                     stop=stop_after_attempt(8),
                                     retry_error_callback=lambda state: state.outcome.result())
            return await retrying(call, body)
        sem = asyncio.Semaphore(50)
        async def bounded(body):
            async with sem:
                try:
                    return await one(body)
                except aiohttp.ClientError:
                    return 0
        statuses = await asyncio.gather(*(bounded(b) for b in calls))
    print(json.dumps({"failures": sum(s != 200 for s in statuses), "seen_429": seen_429}))
asyncio.run(main())
"""

# Post-paid counting as LiteLLM's limiter does it: a fixed window of tokens
# per key; a call is refused (429) only when the window is already over the
# limit, and its tokens are added after its answer, from the usage reported.
# Streamed calls are counted too (LiteLLM's issue 41610 says they were not).
POSTPAID = r"""
import asyncio, json, math, sys, time
from aiohttp import web, ClientSession, ClientTimeout
upstream, limit, window = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
start, used = time.monotonic(), {}
def usage_of(data):
    total = 0
    for line in data.decode().splitlines():
        line = line[len("data: "):] if line.startswith("data: ") else line
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("usage"):
            total = doc["usage"].get("total_tokens", 0)
    return total
async def handle(request):
    now = time.monotonic() - start
    slot = int(now // window)
    if used.get(slot, 0) >= limit:
        return web.json_response({"error": {"message": "Max tpm limit reached"}}, status=429,
                                 headers={"retry-after": str(max(1, math.ceil((slot + 1) * window - now)))})
    body = await request.read()
    async with request.app["session"].post(upstream + request.path, data=body,
                                           headers={"content-type": "application/json"}) as r:
        reply = web.StreamResponse(status=r.status, headers={"content-type": r.headers.get("content-type", "")})
        await reply.prepare(request)
        data = b""
        async for chunk in r.content.iter_any():
            data += chunk
            await reply.write(chunk)
        await reply.write_eof()
    if r.status == 200:
        done = int((time.monotonic() - start) // window)
        used[done] = used.get(done, 0) + usage_of(data)
    return reply
async def main():
    app = web.Application()
    app["session"] = ClientSession(timeout=ClientTimeout(total=300))
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print("listening 127.0.0.1:%d" % site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def token_quotas(k=240, window_s=10, ideal_s=25, output_len=200, workers=4, only=None):
    """The same mixed LLM load (K chat calls from 4 worker processes) against
    a strict sliding token window, four ways: pacegate `tokens`; pacegate
    with the best request-only `rate`; client-side aiolimiter + tenacity
    per worker; a post-paid counter in front (LiteLLM's way). `only`: a subset
    of the approaches, to investigate one."""
    calls, costs = llm_mix(k, output_len)
    total = sum(costs)
    limit = round(total * window_s / ideal_s)  # the window's tokens: the run's ideal is `ideal_s`
    calls_file = WORK / "llm_calls.json"
    calls_file.write_text(json.dumps(calls))
    # Even pacing by cost lets a window see the quota plus one call: leave the
    # costliest call's reservation free (prompt + max_tokens), as docs/tokens.md says.
    largest = max(c - min(b["max_tokens"], output_len) + b["max_tokens"] for b, c in zip(calls, costs))
    best = best_request_rate(costs, limit)
    modes = {
        "pacegate_tokens": f'tokens = "{limit - largest}/{window_s}s"\n',
        "pacegate_tokens_exact": f'tokens = "{limit}/{window_s}s"\n',
        "pacegate_rate": None,
        "client_side": None,
        "post_paid": None,
    }
    results = {}
    for mode in only or modes:
        mock = LlmMock(limit, window_s * 1000, output_len)
        pg = proxy = None
        if mode.startswith("pacegate_tokens"):
            pg = Pacegate(upstream("llm", mock.url, "1000/s", modes[mode]))
        elif mode == "pacegate_rate":
            pg = Pacegate(upstream("llm", mock.url, f"{best}/{window_s}s"))
        elif mode == "post_paid":
            proxy = subprocess.Popen([sys.executable, "-c", POSTPAID, mock.url, str(limit), str(window_s)],
                                     stdout=subprocess.PIPE, text=True)
            proxy_url = "http://" + await_line(proxy.stdout, r"listening (\S+)").group(1)
        url = f"http://{pg.proxy}/llm" if pg else proxy_url if proxy else mock.url
        limited, retries = (limit, "1") if mode == "client_side" else (0, "1" if mode == "post_paid" else "0")
        started = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-c", LLM_CLIENT, url, str(calls_file), str(i), str(workers),
                                   str(limited), str(window_s), retries], stdout=subprocess.PIPE, text=True)
                 for i in range(workers)]
        reports = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
        wall = time.monotonic() - started
        if pg:
            pg.stop()
        if proxy:
            proxy.terminate()
            proxy.wait(timeout=30)
        summary = mock.stop()
        charged = [(t / 1000, c) for t, c in zip(summary["arrivals_ms"], summary["charged"]) if c]
        span = charged[-1][0] - charged[0][0]
        rate = limit / window_s
        results[mode] = {
            "makespan_s": span, "wall_s": wall, "vs_ideal_pct": (span / (summary["tokens_charged"] / rate) - 1) * 100,
            "tokens_charged": summary["tokens_charged"], "utilisation_pct": summary["tokens_charged"] / rate / span * 100,
            "max_tokens_in_window": summary["max_tokens_in_window"], "calls_sent": summary["count"],
            "upstream_429": summary["statuses"].count(429),
            "upstream_429_pct": summary["statuses"].count(429) / k * 100,
            "caller_429": sum(r["seen_429"] for r in reports),
            "caller_failures": sum(r["failures"] for r in reports),
            "charged_s": [[t - charged[0][0], c] for t, c in charged]}
    # The rate that is safe whatever the order: the largest calls back to back fit.
    safe = sum(1 for i in range(1, k + 1) if sum(sorted(costs, reverse=True)[:i]) <= limit)
    return {"k": k, "workers": workers, "window_s": window_s, "limit": limit, "tokens_quota": limit - largest,
            "best_rate_per_window": best, "safe_rate_per_window": safe,
            "safe_rate_makespan_s": (k - 1) * window_s / safe, "mix_tokens": total, "ideal_s": total / (limit / window_s),
            "output_len": output_len, "runs": results}


OUTAGE_LOAD = r"""
import asyncio, json, sys, time, aiohttp
from tenacity import AsyncRetrying, retry_if_result, stop_after_attempt, wait_random_exponential
url, n, rate, retried = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
async def main():
    results = []
    start = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def call(i):
            try:
                async with session.get(f"{url}/r{i}") as r:
                    await r.read(); return r.status
            except Exception:
                return 0
        async def one(i):
            if retried:
                # What users write today: tenacity, exponential backoff with jitter, per call.
                retrying = AsyncRetrying(retry=retry_if_result(lambda s: s == 0 or s >= 500),
                                         wait=wait_random_exponential(multiplier=0.5, max=8),
                                         stop=stop_after_attempt(6),
                                         retry_error_callback=lambda state: state.outcome.result())
                status = await retrying(call, i)
            else:
                status = await call(i)
            results.append((time.monotonic() - start, status))
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    print(json.dumps(results))
asyncio.run(main())
"""


def breaker(rate=20, seconds=20, outage=(5, 10)):
    """A steady load of `rate` requests a second for `seconds`, against an
    upstream that answers 500 to everything from outage[0] for outage[1]
    seconds: pacegate without a breaker (its retries as configured), with a
    breaker, and the client-side recipe (tenacity per call, no proxy)."""
    k = rate * seconds
    quota = f"{rate * 2}/s"
    breaker_section = ('[upstream.breaker]\nfailure_ratio = 0.5\nmin_attempts = 10\nwindow = "1s"\n'
                       'open_for = "2s"\nmax_open_for = "8s"\nprobes = 1\n')
    runs = {}
    for mode in ("no_breaker", "breaker", "client_tenacity"):
        mock = Mock(outage=outage)
        pg = None
        if mode != "client_tenacity":
            extra = breaker_section if mode == "breaker" else ""
            pg = Pacegate(upstream("api", mock.url, quota, extra))
        url = f"http://{pg.proxy}/api" if pg else mock.url
        load = subprocess.run([sys.executable, "-c", OUTAGE_LOAD, url, str(k), str(rate),
                               "1" if mode == "client_tenacity" else "0"],
                              capture_output=True, text=True, timeout=300)
        answers = json.loads(load.stdout)
        if pg:
            pg.stop()
        summary = mock.stop()
        down_from, down_until = outage[0] * 1000, (outage[0] + outage[1]) * 1000
        during = [s for t, s in zip(summary["arrivals_ms"], summary["statuses"]) if down_from <= t < down_until]
        ok = sum(1 for _, status in answers if status == 200)
        runs[mode] = {"upstream_arrivals_during_outage": len(during), "upstream_arrivals": summary["count"],
                      "caller_ok": ok, "caller_errors": len(answers) - ok,
                      "last_answer_s": max(t for t, _ in answers),
                      "drained_after_outage_s": max(t for t, _ in answers) - (outage[0] + outage[1]),
                      "arrivals_ms": summary["arrivals_ms"], "statuses": summary["statuses"]}
    return {"rate": rate, "seconds": seconds, "k": k, "outage_s": list(outage), "runs": runs}


async def timed_gets(urls, workers):
    """GETs `urls` in order from `workers` closed-loop workers; returns
    (status, seconds from start to answer, latency) per request."""
    import aiohttp
    connector = aiohttp.TCPConnector(limit=workers)
    timeout = aiohttp.ClientTimeout(total=600)
    queue = list(reversed(urls))
    results = []
    start = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker():
            while queue:
                url = queue.pop()
                sent = time.monotonic()
                try:
                    async with session.get(url) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = 0
                done = time.monotonic()
                results.append((status, done - start, done - sent))
        await asyncio.gather(*(worker() for _ in range(workers)))
    return results


def cache(k=400, distinct=150, zipf_s=1.1, workers=10, rate=20, crowd=100, latency_ms=200, seed=11):
    """The response cache. A crawl: `workers` closed-loop workers GET `k`
    URLs drawn from `distinct` with Zipf(`zipf_s`) popularity (fresh for 2 s,
    with an ETag), against a mock that allows `rate` a second, pacegate at
    the same rate: without a cache, and with one. A crowd: `crowd`
    identical GETs at once against an upstream answering in `latency_ms`."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** zipf_s for i in range(distinct)]
    picks = rng.choices(range(distinct), weights=weights, k=k)
    runs = {}
    for mode in ("no_cache", "cache"):
        mock = Mock(limit=(rate, 1000), latency_ms=latency_ms // 10)
        extra = "[upstream.cache]\n" if mode == "cache" else ""
        pg = Pacegate(upstream("api", mock.url, f"{rate}/s", extra))
        urls = [f"http://{pg.proxy}/api/cached?max_age=2&etag=e{n}&n={n}" for n in picks]
        answers = asyncio.run(timed_gets(urls, workers))
        pg.stop()
        summary = mock.stop()
        statuses = summary["statuses"]
        runs[mode] = {"makespan_s": max(t for _, t, _ in answers), "upstream_arrivals": summary["count"],
                      "upstream_304": statuses.count(304), "upstream_429": statuses.count(429),
                      "caller_failures": sum(1 for s, _, _ in answers if s != 200)}
    crowds = {}
    for mode in ("no_cache", "cache"):
        mock = Mock(latency_ms=latency_ms)
        extra = "[upstream.cache]\n" if mode == "cache" else ""
        pg = Pacegate(upstream("api", mock.url, f"{rate}/s", extra))
        answers = asyncio.run(timed_gets([f"http://{pg.proxy}/api/cached?max_age=60"] * crowd, crowd))
        pg.stop()
        summary = mock.stop()
        latencies = [latency for _, _, latency in answers]
        crowds[mode] = {"upstream_arrivals": summary["count"], "p50_s": percentile(latencies, 0.5),
                        "p99_s": percentile(latencies, 0.99),
                        "caller_failures": sum(1 for s, _, _ in answers if s != 200)}
    return {"k": k, "distinct": distinct, "distinct_drawn": len(set(picks)), "zipf_s": zipf_s, "workers": workers,
            "rate": rate, "crowd": crowd, "latency_ms": latency_ms, "crawl": runs, "crowd_runs": crowds}


def cache_chart(c, plt):
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    modes, colors = ("no_cache", "cache"), ("#c62828", "#2f5fd0")
    labels = ["no cache", "cache"]
    panels = [(axes[0], [c["crawl"][m]["upstream_arrivals"] for m in modes], "crawl: upstream requests"),
              (axes[1], [c["crawl"][m]["makespan_s"] for m in modes], "crawl: makespan (s)"),
              (axes[2], [c["crowd_runs"][m]["p99_s"] * 1000 for m in modes], f"{c['crowd']} identical GETs: p99 (ms)")]
    for ax, values, title in panels:
        ax.bar(labels, values, color=colors)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "cache.svg")
    plt.close(fig)


def cache_table(c):
    names = {"no_cache": "pacegate, no cache", "cache": "pacegate with [upstream.cache]"}
    lines = ["", f"### Response cache: a crawl ({c['k']} GETs from {c['workers']} workers over {c['distinct']} URLs, "
             f"Zipf s={c['zipf_s']} ({c['distinct_drawn']} distinct drawn), fresh 2 s with an ETag; upstream allows "
             f"{c['rate']}/s)", "",
             "| pacegate | makespan | upstream requests (quota used) | of which 304 | 429s at the upstream | caller failures |",
             "|---|---|---|---|---|---|"]
    for name, v in c["crawl"].items():
        lines.append(f"| {names[name]} | {v['makespan_s']:.2f} s | {v['upstream_arrivals']} | {v['upstream_304']} | "
                     f"{v['upstream_429']} | {v['caller_failures']} |")
    lines += ["", f"### Response cache: {c['crowd']} identical GETs at once (upstream answers in {c['latency_ms']} ms, "
              f"quota {c['rate']}/s)", "",
              "| pacegate | upstream requests | p50 | p99 | caller failures |", "|---|---|---|---|---|"]
    for name, v in c["crowd_runs"].items():
        lines.append(f"| {names[name]} | {v['upstream_arrivals']} | {v['p50_s'] * 1000:.0f} ms | "
                     f"{v['p99_s'] * 1000:.0f} ms | {v['caller_failures']} |")
    return lines


def breaker_chart(b, plt):
    fig, ax = plt.subplots(figsize=(8, 3))
    for mode, color in (("no_breaker", "#c62828"), ("breaker", "#2f5fd0"), ("client_tenacity", "#c77700")):
        times = b["runs"][mode]["arrivals_ms"]
        buckets = [0] * (int(max(times, default=0) / 500) + 1)
        for t in times:
            buckets[int(t / 500)] += 1
        ax.step([i / 2 for i in range(len(buckets))], [n * 2 for n in buckets], where="post",
                label=mode.replace("_", " "), color=color)
    ax.axvspan(b["outage_s"][0], sum(b["outage_s"]), color="#ddd", label="upstream down (500)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("arrivals/s at the upstream")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{b['rate']}/s steady load, upstream down {b['outage_s'][1]} s")
    fig.tight_layout()
    fig.savefig(RESULTS / "breaker.svg")
    plt.close(fig)


def charts(results, names):
    """Draws the charts of the scenarios in `names`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if "endpoint_limits" in names:
        endpoint_limits_chart(results["endpoint_limits"], plt)
    if "tokens" in names:
        tokens_chart(results["tokens"], plt)
    if "breaker" in names:
        breaker_chart(results["breaker"], plt)
    if "cache" in names:
        cache_chart(results["cache"], plt)
    for p in results["pacing"] if "pacing" in names else []:
        times, rate = p["arrivals_s"], p["rate"]
        buckets = [0] * (int(times[-1] * 10) + 1)
        for t in times:
            buckets[int(t * 10)] += 1
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.step([i / 10 for i in range(len(buckets))], buckets, where="post", label="arrivals per 100 ms")
        ax.axhline(rate / 10, color="red", linestyle="--", label=f"quota {rate}/s")
        ax.set_xlabel("seconds")
        ax.set_ylim(0, max(buckets) * 1.3 + 1)
        ax.legend(loc="upper right")
        ax.set_title(f"pacing at {rate}/s: arrivals at the upstream")
        fig.tight_layout()
        fig.savefig(RESULTS / f"pacing_{rate}.svg")
        plt.close(fig)
    if "overhead" in names:
        overhead_chart(results["overhead"], plt)


def overhead_chart(o, plt):
    """req/s, latency and CPU per request of every target, by mode."""
    names = list(o)
    colours = ["tab:orange" if n.startswith("pacegate") else "tab:grey" if n == "direct"
               else "tab:green" if n.startswith("hyper floor") else "tab:blue" for n in names]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4))
    a.bar(names, [o[n]["rps"] for n in names], color=colours)
    a.set_title("requests/s")
    for i, key in enumerate(["p50_us", "p99_us", "p999_us"]):
        b.bar([x + i * 0.27 for x in range(len(names))], [o[n][key] / 1000 for n in names], width=0.27,
              label=key[:-3])
    b.set_xticks([x + 0.27 for x in range(len(names))], names)
    b.set_yscale("log")
    b.set_title("latency (ms, log)")
    b.legend()
    cpu = [n for n in names if "user_us" in o[n]]
    c.bar(cpu, [o[n]["user_us"] for n in cpu], label="user", color="tab:blue")
    c.bar(cpu, [o[n]["system_us"] for n in cpu], bottom=[o[n]["user_us"] for n in cpu], label="system",
          color="tab:cyan")
    # Linear, cut above the compiled proxies: mitmproxy's bar is labelled instead.
    totals = {n: o[n]["user_us"] + o[n]["system_us"] for n in cpu}
    top = 1.2 * max(v for n, v in totals.items() if n != "mitmproxy")
    c.set_ylim(0, top)
    for i, n in enumerate(cpu):
        if totals[n] > top:
            c.text(i, top * 0.9, f"{totals[n]:.0f}", ha="center", fontsize=8)
    c.set_title("proxy CPU per request (µs)")
    c.legend()
    for ax in (a, b, c):
        ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    fig.suptitle("pass-through: wrk -t1 -c64 (interception: curl, 8 tunnels), 100-byte static upstream")
    fig.tight_layout()
    fig.savefig(RESULTS / "overhead.svg")
    plt.close(fig)


def overhead_table(o):
    d, ng = o["direct"], o["nginx"]
    lines = ["### Pass-through against other proxies (wrk -t1 -c64, 3 interleaved runs of 4 s, means; "
             "interception: curl with 8 tunnels)", "",
             "| mode | target | req/s | vs peer | p50 | p99 | p99.9 | CPU user µs/req | CPU system µs/req | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    peer = {"reverse": "nginx", "forward": "squid", "interception": "mitmproxy"}
    for name, v in o.items():
        measured = name.startswith(("pacegate", "hyper floor"))
        ratio = f"{v['rps'] / o[peer[v['mode']]]['rps']:.2f}×" if measured else ""
        cpu = (f"{v['user_us']:.1f} | {v['system_us']:.1f}") if "user_us" in v else "- | -"
        lines.append(f"| {v['mode']} | {name} | {v['rps']:.0f} | {ratio} | {v['p50_us']/1000:.2f} ms | "
                     f"{v['p99_us']/1000:.2f} ms | {v['p999_us']/1000:.2f} ms | {cpu} | {v['errors']} |")
    lines += ["", "One connection, closed loop (wrk -t1 -c1, 3 interleaved runs of 2 s, median p50):", "",
              "| target | req/s | p50 | added to direct |", "|---|---|---|---|"]
    for name, v in o.items():
        if "single_p50_us" in v:
            lines.append(f"| {name} | {v['single_rps']:.0f} | {v['single_p50_us']:.0f} µs | "
                         f"{v['single_p50_us'] - d['single_p50_us']:+.0f} µs |")
    if "client_us" in o.get("pacegate interception", {}):
        lines += ["", f"The interception client (curl) spent {o['pacegate interception']['client_us']:.0f} µs "
                  f"of CPU per request through pacegate: its req/s there are the client's and the proxy's "
                  f"together on shared cores; compare the CPU columns."]
    return "\n".join(lines)


def endpoint_limits_chart(e, plt):
    """Requests accepted by the upstream over time, reads and writes apart."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    shown = {"limits": ("tab:blue", "limits"), "single_rate": ("tab:orange", "single rate")}
    for name, (color, label) in shown.items():
        run = e["runs"][name]
        for method, style in (("GET", "-"), ("POST", "--")):
            times = run["accepted_s"][method]
            ax.step(times, range(1, len(times) + 1), where="post", color=color, linestyle=style,
                    label=f"{label} ({run['limits'] if run['limits'] != '-' else run['rate']}): {method}")
    ax.set_xlabel("seconds since the first request reached the upstream")
    ax.set_ylabel("requests accepted")
    ax.set_title(f"{e['k']} GitHub-shaped requests in {e['arrive_s']:g} s: reads and writes reaching the upstream")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "endpoint_limits.svg")
    plt.close(fig)


def tokens_chart(t, plt):
    """Tokens charged by the upstream over time per approach, against the quota's slope."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    rate = t["limit"] / t["window_s"]
    end = max(run["charged_s"][-1][0] for run in t["runs"].values())
    ax.plot([0, t["mix_tokens"] / rate], [0, t["mix_tokens"]], color="grey", linestyle=":",
            label=f"ideal: {t['limit']} tokens per {t['window_s']} s")
    for name, run in t["runs"].items():
        times = [c[0] for c in run["charged_s"]]
        total, cumulative = 0, []
        for _, tokens in run["charged_s"]:
            total += tokens
            cumulative.append(total)
        ax.step(times, cumulative, where="post", label=f"{name.replace('_', ' ')} ({run['upstream_429']} upstream 429s)")
    ax.set_xlim(0, end * 1.02)
    ax.set_xlabel("seconds since the first call was charged")
    ax.set_ylabel("tokens charged by the upstream")
    ax.set_title(f"{t['k']} mixed LLM calls against a strict token window")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "tokens.svg")
    plt.close(fig)


def redis_ha_table(r):
    f = r["failover"]
    lines = ["", "### Redis Cluster and Sentinel", "",
             "| one pacegate, unlimited quota shared through (wrk -t2 -c64, 4 s) | req/s | p99 | errors | still shared at the end |",
             "|---|---|---|---|---|"]
    for name, v in r["throughput"].items():
        lines.append(f"| {name} | {v['rps']:.0f} | {v['p99_us']/1000:.2f} ms | {v['errors']} | "
                     f"{'yes' if v['shared'] else 'no'} |")
    lines += ["", f"Two replicas sharing one {f['rate']}/s quota through Sentinel, {f['k']} requests from 100 callers, "
              f"the master SIGKILLed a third of the way in (`down-after-milliseconds` 1 s):", "",
              "| caller failures | shared again after the kill | fallbacks (both replicas) | busiest 1 s before | "
              "during the failover | after | closest second to its allowance |",
              "|---|---|---|---|---|---|---|",
              f"| {f['caller_failures']} | {f['shared_again_after_s']:.2f} s | {f['fallbacks']:.0f} | "
              f"{f['max_in_1s_window_before']} | {f['max_in_1s_window_during']} | {f['max_in_1s_window_after']} | "
              + (f"{w['count']} of {w['allowance']}" if (w := f.get("worst_vs_allowance")) else "not measured") + " |"]
    return lines


def tables(r):
    lines = [overhead_table(r["overhead"])]
    lines += ["", "### Pacing precision (burst 1, 200 callers)", "",
              "| quota | K | makespan | ideal (K-1)/rate | vs ideal | max in any 1 s window | caller failures |",
              "|---|---|---|---|---|---|---|"]
    for p in r["pacing"]:
        lines.append(f"| {p['rate']}/s | {p['k']} | {p['makespan_s']:.3f} s | {p['ideal_s']:.3f} s | "
                     f"{p['vs_ideal_pct']:+.2f} % | {p['max_in_1s_window']} (quota {p['quota_per_window']}) | {p['caller_failures']} |")
    lines += ["", "### A rate set too high (callers always waiting; delivered = accepted requests/s over the real limit)", "",
              "| configured | upstream allows | adaptive | makespan | delivered | 429s at the upstream | caller failures |",
              "|---|---|---|---|---|---|---|"]
    for w in r["adaptive"]:
        lines.append(f"| {w['configured']} | {w['real']} | {'on' if w['adaptive'] else 'off'} | {w['makespan_s']:.1f} s | "
                     f"{w['delivered_pct']:.1f} % | {w['upstream_429']} ({w['upstream_429_pct']:.2f} %) | {w['caller_failures']} |")
    c = r["client_side"]
    lines += ["", "### Client-side limiting vs one pacegate (4 workers sharing one 100/s key, 1000 requests)", "",
              "| approach | makespan | ideal | 429s at the upstream | caller failures |", "|---|---|---|---|---|"]
    for name, v in c.items():
        span = f"{v['makespan_s']:.2f} s" if v["makespan_s"] is not None else "-"
        lines.append(f"| {name.replace('_', ' ')} | {span} | {v['ideal_s']:.2f} s | {v['upstream_429']} | {v['caller_failures']} |")
    s = r["scale"]
    c, m = s["per_connection"], s["multiplexed"]
    lines += ["", "### Scale", "",
              f"- {m['queued']} requests queued as h2c streams over {m['connections']} connections: "
              f"{m['bytes_per_queued_request']:.0f} bytes of anonymous RSS per queued request (connections not counted).",
              f"- {c['queued']} requests queued, each with its own HTTP/1.1 client connection: "
              f"{c['bytes_per_queued_request']:.0f} bytes of anonymous RSS per queued request and connection.",
              f"- A config of {s['upstreams']} upstreams: listening after {s['startup_s']:.2f} s, RSS {s['rss_mib']:.1f} MiB.",
              ""]
    if "redis" in r:
        t, rep = r["redis"]["throughput"], r["redis"]["replicas"]
        lines += ["### Redis mode", "",
                  "| limiter (unlimited quota, wrk -t2 -c64, 2 interleaved runs of 4 s) | req/s | p99 | errors |",
                  "|---|---|---|---|"]
        for name, v in t.items():
            lines.append(f"| {name} | {v['rps']:.0f} | {v['p99_us']/1000:.2f} ms | {v['errors']} |")
        lines += ["", f"Two replicas sharing one {rep['rate']}/s quota through Redis, {rep['k']} requests split "
                  f"across both, upstream allowing {rep['rate']} per 1 s window:", "",
                  "| makespan | ideal | vs ideal | max in any 1 s window | 429s at the upstream | caller failures |",
                  "|---|---|---|---|---|---|",
                  f"| {rep['makespan_s']:.2f} s | {rep['ideal_s']:.2f} s | {rep['vs_ideal_pct']:+.1f} % | "
                  f"{rep['max_in_1s_window']} | {rep['upstream_429']} | {rep['caller_failures']} |"]
    if "redis_ha" in r:
        lines += redis_ha_table(r["redis_ha"])
    if "endpoint_limits" in r:
        lines += endpoint_limits_table(r["endpoint_limits"])
    if "tokens" in r:
        lines += tokens_table(r["tokens"])
    if "breaker" in r:
        lines += breaker_table(r["breaker"])
    if "cache" in r:
        lines += cache_table(r["cache"])
    if "flood" in r:
        lines += flood_table(r["flood"])
    return "\n".join(lines)


def breaker_table(b):
    names = {"no_breaker": "pacegate, retries only", "breaker": "pacegate with [upstream.breaker]",
             "client_tenacity": "no proxy: tenacity per call (6 attempts, exponential backoff)"}
    lines = ["", f"### Circuit breaker ({b['k']} requests at {b['rate']}/s; the upstream answers 500 to everything "
             f"from {b['outage_s'][0]} s for {b['outage_s'][1]} s)", "",
             "| approach | arrivals at the dead upstream | arrivals in all | callers 200 | caller errors | "
             "last answer after the outage ended |", "|---|---|---|---|---|---|"]
    for name, v in b["runs"].items():
        lines.append(f"| {names[name]} | {v['upstream_arrivals_during_outage']} | {v['upstream_arrivals']} | "
                     f"{v['caller_ok']} | {v['caller_errors']} | {v['drained_after_outage_s']:.1f} s |")
    return lines


def endpoint_limits_table(e):
    names = {"limits": "endpoint limits", "limits_exact": "endpoint limits at the upstream's exact counts",
             "single_rate": "one rate, safe for any mix", "average_rate": "one rate, the mix's average"}
    lines = ["", f"### Endpoint limits (GitHub-shaped: {e['k']} requests arriving in {e['arrive_s']:g} s, "
             f"{e['posts'] * 100:.0f} % POST; upstream allows {e['points']} points/s with POST = {e['post_cost']} "
             f"and {e['writes']} writes/s)", "",
             "| pacegate | rate | limits | makespan | vs ideal | 429s at the upstream | caller failures | "
             "read p50 | read p95 | last read | max points / writes in any 1 s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in e["runs"].items():
        lines.append(f"| {names[name]} | {v['rate']} | {v['limits']} | {v['makespan_s']:.2f} s | "
                     f"{(v['makespan_s'] / e['ideal_s'] - 1) * 100:+.0f} % | {v['upstream_429']} | "
                     f"{v['caller_failures']} | {v['read_p50_s']:.2f} s | {v['read_p95_s']:.2f} s | "
                     f"{v['last_read_s']:.2f} s | {v['max_points_in_1s']} / {v['max_writes_in_1s']} |")
    lines += ["", f"Ideal: {e['ideal_s']:.2f} s (the binding limit's units at its rate)."]
    return lines


def tokens_table(t):
    names = {"pacegate_tokens": f"pacegate `tokens = \"{t['tokens_quota']}/{t['window_s']}s\"` (one call below)",
             "pacegate_tokens_exact": f"pacegate `tokens = \"{t['limit']}/{t['window_s']}s\"` (the exact limit)",
             "pacegate_rate": f"pacegate `rate = \"{t['best_rate_per_window']}/{t['window_s']}s\"` (best request-only rate)",
             "client_side": "client side: aiolimiter per worker + tenacity",
             "post_paid": "post-paid counter (LiteLLM's way) + tenacity"}
    lines = ["", f"### Token quotas ({t['k']} chat calls from {t['workers']} workers, "
             f"{t['mix_tokens']} tokens; upstream allows {t['limit']} tokens per sliding {t['window_s']} s)", "",
             "| approach | makespan | vs ideal | utilisation | 429s at the upstream | 429s seen by callers | "
             "caller failures | most tokens in any window |", "|---|---|---|---|---|---|---|---|"]
    for name, v in t["runs"].items():
        lines.append(f"| {names[name]} | {v['makespan_s']:.2f} s | {v['vs_ideal_pct']:+.1f} % | "
                     f"{v['utilisation_pct']:.1f} % | {v['upstream_429']} ({v['upstream_429_pct']:.1f} %) | "
                     f"{v['caller_429']} | {v['caller_failures']} | {v['max_tokens_in_window']} |")
    lines += ["", f"Ideal: {t['ideal_s']:.2f} s (tokens charged / the window's rate). The best request-only rate "
              f"is found in hindsight: the most calls per window such that every run of that many consecutive calls "
              f"of this very sequence fits. A rate safe whatever the order ({t['safe_rate_per_window']} calls per "
              f"{t['window_s']} s: the largest calls back to back fit) would take "
              f"{t['safe_rate_makespan_s']:.1f} s (computed, not run)."]
    return lines


def summarised(value):
    """A result without its per-arrival series, to print."""
    series = {"arrivals_s", "accepted_s", "charged_s", "arrivals_ms", "statuses"}
    if isinstance(value, dict):
        return {k: summarised(v) for k, v in value.items() if k not in series}
    if isinstance(value, list):
        return [summarised(v) for v in value]
    return value


def main():
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cores": os.cpu_count(), "uname": " ".join(os.uname())}, "started": time.time()}
    steps = [("overhead", pass_through_overhead),
             ("pacing", lambda: [pacing(10, 40), pacing(100, 400), pacing(1000, 3000)]),
             ("adaptive", wrong_rates), ("client_side", client_side_vs_pacegate), ("scale", scale),
             ("redis", redis_mode), ("redis_ha", redis_ha), ("endpoint_limits", endpoint_limits),
             ("tokens", token_quotas), ("breaker", breaker), ("cache", cache), ("flood", flood)]
    # --update: run the scenarios named, keep the others' figures from the last run.
    update = "--update" in sys.argv[1:]
    only = set(sys.argv[1:]) - {"--update"}
    if update:
        if not only:
            sys.exit("--update needs the scenarios to run")
        results = json.loads((RESULTS / "latest.json").read_text())
    for name, step in steps:
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        results[name] = step()
        if update:
            results.setdefault("updated", {})[name] = time.time()
        print(json.dumps(summarised(results[name]), indent=1), flush=True)
    if only and not update:
        if out := os.environ.get("BENCH_OUT"):
            Path(out).write_text(json.dumps(results, indent=1))
        return
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1))
    charts(results, only or {name for name, _ in steps})
    doc = ROOT / "BENCHMARKS.md"
    text = doc.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + "\n" + tables(results) + "\n" + end + rest.split(end, 1)[1])
    print("wrote bench/results/latest.json, bench/results/*.svg and BENCHMARKS.md")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
