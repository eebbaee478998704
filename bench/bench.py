#!/usr/bin/env python3
"""pacegate benchmark suite (run through bench/run.sh; see BENCHMARKS.md).

End to end, against real processes; benches/ holds the in-process
`cargo bench` figures, which need nothing installed.

Every scenario runs on loopback, bounded in requests and time, with the
release pacegate binary and the project's mock upstream
(examples/mock_upstream.rs, the same code the tests use). Results go to
bench/results/latest.json, charts to bench/results/*.svg, and the tables
between the markers in BENCHMARKS.md are regenerated.
"""

import asyncio
import json
import os
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
MOCK = ROOT / "target" / "release" / "examples" / "mock_upstream"
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
    def __init__(self, limit=None):
        args = [str(MOCK), "--listen", "127.0.0.1:0", "--ignore-stdin"]
        if limit:
            args += ["--limit", f"{limit[0]}/{limit[1]}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.addr = await_line(self.proc.stdout, r"listening (\S+)").group(1)
        self.url = f"http://{self.addr}"

    def stop(self):
        """Stops the mock and returns its summary (arrival times, statuses)."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])


class Pacegate:
    def __init__(self, upstreams, server=""):
        self.config = WORK / f"pacegate-{time.monotonic_ns()}.toml"
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n{server}\n{upstreams}')
        started = time.monotonic()
        self.proc = subprocess.Popen([str(PACEGATE), "--config", str(self.config), "--log-format", "json"],
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, "PACEGATE_LOG": "warn,pacegate=info"})
        m = await_line(self.proc.stderr, r"listening proxy=(\S+) admin=([0-9.:]+)", timeout=60)
        self.startup = time.monotonic() - started
        drain(self.proc.stderr)
        self.proxy, self.admin = m.group(1), m.group(2)

    def rss_kib(self):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


class Redis:
    def __init__(self):
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(WORK)], stdout=subprocess.PIPE, text=True)
        await_line(self.proc.stdout, r"Ready to accept connections")
        drain(self.proc.stdout)
        self.url = f"redis://127.0.0.1:{self.port}"

    def section(self):
        return f'[redis]\nurl = "{self.url}"\non_error = "local"\n'

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


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

def wrk(url, seconds=4):
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "-s", str(ROOT / "bench" / "wrk_report.lua"), url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    report = json.loads(out.strip().splitlines()[-1])
    report["rps"] = report["requests"] / (report["duration_us"] / 1e6)
    return report


def pass_through_overhead():
    static, proxied = free_port(), free_port()
    (WORK / "nginx").mkdir(exist_ok=True)
    conf = WORK / "nginx" / "nginx.conf"
    conf.write_text(f"""
worker_processes 2; daemon off; pid {WORK}/nginx/nginx.pid; error_log {WORK}/nginx/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {WORK}/nginx; proxy_temp_path {WORK}/nginx;
  server {{ listen 127.0.0.1:{static}; location / {{ return 200 "ok\\n"; }} }}
  upstream backend {{ server 127.0.0.1:{static}; keepalive 64; }}
  server {{ listen 127.0.0.1:{proxied};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
}}""")
    nginx = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(WORK / "nginx")])
    time.sleep(0.5)  # nginx has no readiness signal; the first wrk run is a warm-up anyway
    pg = Pacegate(upstream("static", f"http://127.0.0.1:{static}", "1000000/s", "burst = 100000\nmax_concurrency = 1024"))
    targets = {"direct": f"http://127.0.0.1:{static}/", "nginx": f"http://127.0.0.1:{proxied}/",
               "pacegate": f"http://{pg.proxy}/static/"}
    for url in targets.values():
        wrk(url, 1)  # warm connections and pools
    runs = {name: [] for name in targets}
    for _ in range(2):  # interleaved, so drift on a noisy machine hits all alike
        for name, url in targets.items():
            runs[name].append(wrk(url))
    pg.stop()
    nginx.send_signal(signal.SIGQUIT)
    nginx.wait(timeout=30)
    return {name: {"rps": statistics.mean(r["rps"] for r in rs),
                   "p50_us": statistics.mean(r["p50"] for r in rs),
                   "p99_us": statistics.mean(r["p99"] for r in rs),
                   "p999_us": statistics.mean(r["p999"] for r in rs),
                   "errors": sum(r["errors"] + r["non_2xx"] for r in rs)} for name, rs in runs.items()}


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


def misconfigured(configured=150, real=100, k=1000):
    mock = Mock(limit=(real, 1000))
    pg = Pacegate(upstream("api", mock.url, f"{configured}/s"))
    statuses = asyncio.run(fire([f"http://{pg.proxy}/api/r{i}" for i in range(k)], 100))
    pg.stop()
    summary = mock.stop()
    times = accepted_times(summary)
    ideal = (k - 1) / real
    return {"configured": configured, "real_limit": real, "k": k, "makespan_s": times[-1] - times[0], "ideal_s": ideal,
            "vs_ideal_pct": ((times[-1] - times[0]) / ideal - 1) * 100,
            "upstream_429": summary["statuses"].count(429), "caller_failures": sum(s != 200 for s in statuses)}


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


def queued_per_connection(queued):
    """RSS growth per request parked in a "1/h" queue, each request on its
    own HTTP/1.1 client connection (so the figure includes a connection)."""
    mock = Mock()
    pg = Pacegate(upstream("slow", mock.url, "1/h"), server="max_connections = 100000")
    before = pg.rss_kib()

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
            rss = pg.rss_kib()
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
    """RSS growth per request parked in a "1/h" queue, the requests
    multiplexed as h2c streams over a few connections (200 each, hyper's
    default stream limit). RSS is read once the connections are open and
    again once every stream is queued, so the figure is the cost of a
    queued request alone, without its share of a connection."""
    import h2.config
    import h2.connection
    import h2.events
    mock = Mock()
    pg = Pacegate(upstream("slow", mock.url, "1/h"))
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
        before = pg.rss_kib()
        for n, (_, writer, conn) in enumerate(opened):
            send_streams(writer, conn, n * streams)
            await writer.drain()
        # Burst 1: the first request leaves at once, the others wait.
        depth = await await_depth(pg, connections * streams - 1)
        after = pg.rss_kib()
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


def charts(results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for p in results["pacing"]:
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
    o = results["overhead"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    names = list(o)
    a.bar(names, [o[n]["rps"] for n in names])
    a.set_title("requests/s (wrk, 64 connections)")
    for i, key in enumerate(["p50_us", "p99_us", "p999_us"]):
        b.bar([x + i * 0.25 for x in range(len(names))], [o[n][key] / 1000 for n in names], width=0.25, label=key[:-3])
    b.set_xticks([x + 0.25 for x in range(len(names))], names)
    b.set_title("latency (ms)")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "overhead.svg")
    plt.close(fig)


def tables(r):
    o = r["overhead"]
    lines = ["### Pass-through overhead (wrk -t2 -c64, 2 interleaved runs of 4 s, means)", "",
             "| target | req/s | p50 | p99 | p99.9 | errors |", "|---|---|---|---|---|---|"]
    for name, v in o.items():
        lines.append(f"| {name} | {v['rps']:.0f} | {v['p50_us']/1000:.2f} ms | {v['p99_us']/1000:.2f} ms | "
                     f"{v['p999_us']/1000:.2f} ms | {v['errors']} |")
    lines += ["", "### Pacing precision (burst 1, 200 callers)", "",
              "| quota | K | makespan | ideal (K-1)/rate | vs ideal | max in any 1 s window | caller failures |",
              "|---|---|---|---|---|---|---|"]
    for p in r["pacing"]:
        lines.append(f"| {p['rate']}/s | {p['k']} | {p['makespan_s']:.3f} s | {p['ideal_s']:.3f} s | "
                     f"{p['vs_ideal_pct']:+.2f} % | {p['max_in_1s_window']} (quota {p['quota_per_window']}) | {p['caller_failures']} |")
    m = r["misconfigured"]
    lines += ["", f"### Misconfigured quota (pacegate {m['configured']}/s, upstream allows {m['real_limit']} per 1 s window, K={m['k']})", "",
              "| makespan | ideal | vs ideal | 429s at the upstream | caller failures |", "|---|---|---|---|---|",
              f"| {m['makespan_s']:.2f} s | {m['ideal_s']:.2f} s | {m['vs_ideal_pct']:+.1f} % | {m['upstream_429']} | {m['caller_failures']} |"]
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
              f"{m['bytes_per_queued_request']:.0f} bytes of RSS per queued request (connections not counted).",
              f"- {c['queued']} requests queued, each with its own HTTP/1.1 client connection: "
              f"{c['bytes_per_queued_request']:.0f} bytes of RSS per queued request and connection.",
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
    return "\n".join(lines)


def main():
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cores": os.cpu_count(), "uname": " ".join(os.uname())}, "started": time.time()}
    steps = [("overhead", pass_through_overhead),
             ("pacing", lambda: [pacing(10, 40), pacing(100, 400), pacing(1000, 3000)]),
             ("misconfigured", misconfigured), ("client_side", client_side_vs_pacegate), ("scale", scale),
             ("redis", redis_mode)]
    only = set(sys.argv[1:])
    for name, step in steps:
        if only and name not in only:
            continue
        print(f"== {name}", flush=True)
        results[name] = step()
        shown = {k: v for k, v in results[name].items() if k != "arrivals_s"} if isinstance(results[name], dict) else \
            [{k: v for k, v in p.items() if k != "arrivals_s"} for p in results[name]]
        print(json.dumps(shown, indent=1), flush=True)
    if only:
        if out := os.environ.get("BENCH_OUT"):
            Path(out).write_text(json.dumps(results, indent=1))
        return
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1))
    charts(results)
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
