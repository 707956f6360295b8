#!/usr/bin/env python
"""Benchmark `distill generate` against the server's ideal throughput and open-r1's scheduling.

Side by side in one run, against `distill serve-teacher --capacity 64` with heavy-tailed latency
(log-normal, sigma 1.0: p99 = 10.2x median), same problems, same N, same concurrency budget:

1. ours: `distilled.generate.runner.run_generate` (request-level concurrency, one request per generation);
2. open-r1 batch-of-500: our re-implementation of open-r1 ``scripts/generate_reasoning.py``'s
   scheduling (a task per problem that ``asyncio.gather``s its N generations, each preceded by a
   0-0.1 s random sleep, a fixed 10 s sleep after any exception, an aiohttp connector limited to
   ``max_concurrent`` connections, results appended by reopening the file per line), run over the
   dataset in consecutive batches of 500 problems, each batch gathered before the next starts;
3. open-r1 task pool: the same code with the published script's pool (at most ``max_concurrent``
   problem tasks, refilled on FIRST_COMPLETED);

and reports throughput vs ideal (capacity / realised mean latency; the steady-state window is
measured from the server's own completion counter), ours vs open-r1, client CPU per request
against a zero-latency server, and problems lost under 3% injected 429/500 faults.

The open-r1 code below is written from a reading of the script (not copied) to reproduce its
scheduling and error handling faithfully; aiofiles/uvloop are not used (plain appends instead).

Run: ``.venv/bin/python bench/generate.py`` (about 8 minutes; ``--quick`` for a 1-minute smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import resource
import sys
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distilled.generate.runner import GenerateConfig, run_generate  # noqa: E402
from distilled.generate.problems import synth  # noqa: E402
from distilled.generate.teacher_server import SpawnedTeacher, spawn_teacher  # noqa: E402


# --- server management --------------------------------------------------------------------------
def serve(*flags: str) -> AbstractContextManager[SpawnedTeacher]:
    """`distill serve-teacher` in its own process (so its CPU is not the client's), stopped on exit."""
    return spawn_teacher(list(flags), cwd=REPO)


class Sampler(threading.Thread):
    """Polls the server's completion counter, so throughput can be read over any window."""

    def __init__(self, server: SpawnedTeacher, every: float = 0.25):
        super().__init__(daemon=True)
        self.server, self.every, self.points = server, every, []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.points.append((time.perf_counter(), self.server.stats()["completed"]))
            except OSError:
                pass
            self._halt.wait(self.every)

    def halt(self) -> None:
        self._halt.set()
        self.join()

    def rate(self, t0: float, t1: float) -> float:
        pts = [p for p in self.points if t0 <= p[0] <= t1]
        if len(pts) < 2:
            return float("nan")
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


# --- open-r1 re-implementation ------------------------------------------------------------------
async def _openr1_completion(session, url: str, prompt: str, a) -> dict | None:
    budget = 10
    while budget > 0:
        try:
            await asyncio.sleep(random.uniform(0.0, 0.1))
            async with session.post(url, json={"model": a.model, "messages": [{"role": "user", "content": prompt}],
                                               "max_tokens": a.max_tokens, "temperature": 0.6, "top_p": 0.95},
                                    headers={"Authorization": "Bearer EMPTY"}) as resp:
                return await resp.json(content_type=None)  # no status check, as in the script
        except Exception:
            budget -= 1
            await asyncio.sleep(10)
    return None


async def _openr1_example(example: dict, session, url: str, a, out: str, lock, counters: dict) -> None:
    prompt = a.template.format(prompt=example["problem"])
    try:
        comps = await asyncio.gather(*[_openr1_completion(session, url, prompt, a) for _ in range(a.n)])
        if any(c is None for c in comps):
            counters["dropped"] += 1
            return
        result = {**example, "generations": [c["choices"][0]["message"]["content"] for c in comps],
                  "finish_reasons": [c["choices"][0]["finish_reason"] for c in comps],
                  "api_metadata": [c["usage"] for c in comps]}
        async with lock:
            with open(out, "a") as f:  # reopened per line, no fsync (as the script does with aiofiles)
                f.write(json.dumps(result) + "\n")
        counters["written"] += 1
    except Exception:  # e.g. KeyError 'choices' on a 429/500 body: the whole problem is dropped
        counters["dropped"] += 1


async def run_openr1(problems: list[dict], addr: str, a, out: str, mode: str) -> dict:
    import aiohttp

    url = f"http://{addr}/v1/chat/completions"
    lock = asyncio.Lock()
    counters = {"written": 0, "dropped": 0}
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600),
                                     connector=aiohttp.TCPConnector(limit=a.concurrency, ttl_dns_cache=300,
                                                                    keepalive_timeout=3600)) as session:
        if mode == "batch":
            for i in range(0, len(problems), a.batch):
                await asyncio.gather(*[_openr1_example(ex, session, url, a, out, lock, counters)
                                       for ex in problems[i:i + a.batch]])
        else:
            active: set = set()
            for ex in problems:
                while len(active) >= a.concurrency:
                    _done, active = await asyncio.wait(active, return_when=asyncio.FIRST_COMPLETED)
                t = asyncio.create_task(_openr1_example(ex, session, url, a, out, lock, counters))
                active.add(t)
                t.add_done_callback(active.discard)
            if active:
                await asyncio.gather(*active, return_exceptions=True)
    return {"seconds": time.perf_counter() - t0, **counters}


async def run_ours(path: str, addr: str, a, out: str, **kw) -> dict:
    cfg = GenerateConfig(dataset_name=path, output_file=out, endpoints=[addr], model=a.model, uuid_column="id",
                         num_generations=a.n, max_tokens=a.max_tokens, max_concurrent=a.concurrency,
                         progress=False, request_timeout=600, **kw)
    t0 = time.perf_counter()
    s = await run_generate(cfg, warn=lambda m: None)
    return {"seconds": time.perf_counter() - t0, "written": s.written, "dropped": s.failed_problems,
            "retries": s.retries}


# --- scenarios ----------------------------------------------------------------------------------
def throughput_scenario(a, tmp: Path) -> dict:
    probs = synth(a.problems, seed=0)
    ppath = tmp / "problems.jsonl"
    ppath.write_text("".join(json.dumps(p) + "\n" for p in probs))
    res = {}
    with serve("--capacity", str(a.capacity), "--latency-ms", str(a.latency_ms), "--latency-dist", "lognormal",
               "--latency-sigma", str(a.sigma), "--seed", "0") as srv:
        for name in ("ours", "open-r1 batch-of-500", "open-r1 task pool"):
            if a.only and name not in a.only.split(","):
                continue
            srv.reset_stats()
            out = str(tmp / f"out-{name.replace(' ', '_')}.jsonl")
            sampler = Sampler(srv)
            sampler.start()
            if name == "ours":
                r = asyncio.run(run_ours(str(ppath), srv.addr, a, out))
            else:
                r = asyncio.run(run_openr1(probs, srv.addr, a, out, "batch" if "batch" in name else "pool"))
            sampler.halt()
            st = srv.stats()
            mean_lat = st["latency_sum"] / max(1, st["latency_count"])
            ideal = a.capacity / mean_lat
            t0 = sampler.points[0][0]
            # steady state: from 10% into the run until the last 20% (before the unavoidable drain)
            steady = sampler.rate(t0 + 0.1 * r["seconds"], t0 + 0.8 * r["seconds"])
            gens = a.problems * a.n
            r.update(gen_per_s=gens / r["seconds"], ideal_per_s=ideal, realised_mean_latency_ms=mean_lat * 1000,
                     steady_per_s=steady, whole_vs_ideal=gens / r["seconds"] / ideal, steady_vs_ideal=steady / ideal,
                     max_in_flight=st["max_in_flight"])
            res[name] = r
            print(f"  {name:22s} {r['seconds']:6.1f}s  {r['gen_per_s']:7.1f} gen/s  "
                  f"steady {steady:7.1f}/s  ideal {ideal:7.1f}/s  steady/ideal {r['steady_vs_ideal']:.3f}  "
                  f"whole-run/ideal {r['whole_vs_ideal']:.3f}  written {r['written']}", flush=True)
    return res


def cpu_scenario(a, tmp: Path) -> dict:
    """Client CPU per request against a zero-latency server (its CPU is in another process)."""
    from distilled.generate.client import ChatClient, map_requests

    out = {}
    with serve("--seed", "0") as srv:
        async def raw(n: int) -> None:
            async with ChatClient([srv.addr], a.model, max_concurrent=64) as c:
                msgs = [{"role": "user", "content": "What is 20% of 45?"}]
                await map_requests(c, range(n), lambda _: c.chat(msgs, max_tokens=1000))

        asyncio.run(raw(300))  # warm-up
        for name, fn in (("ChatClient.chat", lambda: asyncio.run(raw(a.cpu_requests))),
                         ("distill generate (N=1)", None)):
            if fn is None:
                probs = synth(a.cpu_requests, seed=1)
                p = tmp / "cpu.jsonl"
                p.write_text("".join(json.dumps(x) + "\n" for x in probs))
                a2 = argparse.Namespace(**{**vars(a), "n": 1, "concurrency": 64})
                fn = lambda: asyncio.run(run_ours(str(p), srv.addr, a2, str(tmp / "cpu-out.jsonl")))  # noqa: E731
            r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
            out[name] = {"requests": a.cpu_requests, "wall_s": w1 - w0, "client_cpu_s": cpu,
                         "req_per_client_cpu_s": a.cpu_requests / cpu, "wall_req_per_s": a.cpu_requests / (w1 - w0)}
            print(f"  {name:22s} {a.cpu_requests / cpu:7.0f} requests per client CPU-second "
                  f"({a.cpu_requests / (w1 - w0):6.0f} req/s wall, server and other jobs sharing the 2 cores)",
                  flush=True)
    return out


def fault_scenario(a, tmp: Path) -> dict:
    probs = synth(a.fault_problems, seed=2)
    ppath = tmp / "fault.jsonl"
    ppath.write_text("".join(json.dumps(p) + "\n" for p in probs))
    out = {}
    with serve("--capacity", str(a.capacity), "--latency-ms", "50", "--latency-dist", "lognormal", "--seed", "0",
               "--fault-rate", "0.03", "--faults", "429,500", "--retry-after", "1") as srv:
        srv.reset_stats()
        out["ours"] = asyncio.run(run_ours(str(ppath), srv.addr, a, str(tmp / "f-ours.jsonl"), backoff_base=0.5))
        srv.reset_stats()
        out["open-r1 task pool"] = asyncio.run(run_openr1(probs, srv.addr, a, str(tmp / "f-o.jsonl"), "pool"))
        for k, v in out.items():
            print(f"  {k:22s} written {v['written']}/{len(probs)}  lost {len(probs) - v['written']}  "
                  f"({v['seconds']:.1f}s)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=500.0, help="mean service latency")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma (1.0: p99 = 10.2x median)")
    ap.add_argument("--problems", type=int, default=3000)
    ap.add_argument("--n", type=int, default=4, help="generations per problem")
    ap.add_argument("--concurrency", type=int, default=64, help="client budget (same for every client)")
    ap.add_argument("--batch", type=int, default=500, help="open-r1 batch size")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--cpu-requests", type=int, default=5000)
    ap.add_argument("--fault-problems", type=int, default=300)
    ap.add_argument("--model", default="stand-in-teacher")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only", default=None, help="comma list of clients to run in the throughput part")
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()
    a.template = ("You will be given a problem. Please reason step by step, and put your final answer within "
                  "\\boxed{{}}:\n{prompt}")
    if a.quick:
        a.problems, a.latency_ms, a.cpu_requests, a.fault_problems = 300, 200.0, 1500, 100
    p99_over_median = math.exp(2.3263 * a.sigma)
    print(f"server: capacity {a.capacity}, log-normal latency mean {a.latency_ms:g} ms, sigma {a.sigma:g} "
          f"(p99/median = {p99_over_median:.1f}); {a.problems} problems x {a.n} generations, "
          f"client concurrency {a.concurrency}; {os.cpu_count()} CPU cores", flush=True)
    results = {"setup": {k: v for k, v in vars(a).items() if k != "template"}, "p99_over_median": p99_over_median}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("throughput:", flush=True)
        results["throughput"] = t = throughput_scenario(a, tmp)
        if a.throughput_only:
            return 0
        print("client CPU overhead (zero-latency server):", flush=True)
        results["cpu"] = c = cpu_scenario(a, tmp)
        print("3% injected 429/500 faults:", flush=True)
        results["faults"] = fault_scenario(a, tmp)
    ours, batch, pool = t["ours"], t["open-r1 batch-of-500"], t["open-r1 task pool"]
    print("\nratios:")
    print(f"  ours steady-state / ideal            {ours['steady_vs_ideal']:.3f}   (target >= 0.95)")
    print(f"  ours whole run (incl. drain) / ideal {ours['whole_vs_ideal']:.3f}")
    print(f"  ours / open-r1 batch-of-500          {ours['gen_per_s'] / batch['gen_per_s']:.2f}x  (target >= 1.3x)")
    print(f"  ours / open-r1 task pool             {ours['gen_per_s'] / pool['gen_per_s']:.2f}x")
    rq = c["ChatClient.chat"]["req_per_client_cpu_s"]
    print(f"  client requests per CPU-second       {rq:.0f}   (target >= 2000)")
    results["ratios"] = {"steady_vs_ideal": ours["steady_vs_ideal"], "whole_vs_ideal": ours["whole_vs_ideal"],
                         "ours_vs_openr1_batch": ours["gen_per_s"] / batch["gen_per_s"],
                         "ours_vs_openr1_pool": ours["gen_per_s"] / pool["gen_per_s"], "client_req_per_cpu_s": rq}
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
