"""How to launch `omlx serve --distributed` (shown by `omlx serve --help`; no MLX import)."""

SERVE_EPILOG = """\
one model across several processes or machines (--distributed; tensor parallel through the
model's own shard(): llama, qwen2/3, deepseek and others), launched by MLX's mlx.launch:

  two ranks on one machine (ring backend over loopback):
    mlx.launch --backend ring -n 2 --python .venv/bin/python -- \\
        -m omlx serve --distributed --model-dir DIR --no-demo --port 8000

  two hosts (passwordless SSH from this machine to both, the same paths on both):
    mlx.launch --backend ring --hostfile hosts.json --python /path/to/omlx/.venv/bin/python -- \\
        -m omlx serve --distributed --model-dir /same/path/models --no-demo --host 0.0.0.0
    where hosts.json lists the machines, rank 0 first (it runs the HTTP server):
    [{"ssh": "mac1.local", "ips": ["10.0.0.1"]}, {"ssh": "mac2.local", "ips": ["10.0.0.2"]}]
    (`mlx.distributed_config --hosts mac1.local,mac2.local --over ethernet --output-hostfile
    hosts.json` writes one).

Rank 0 serves HTTP, schedules and samples; the other ranks run each step on their shard.  A
rank that dies or hangs ends every request in flight with an error and rank 0 exits 1 (let a
supervisor restart the group); SIGTERM to rank 0 stops every rank (exit 0).
"""
