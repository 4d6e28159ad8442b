"""The `meshlm serve` command line: arguments, then the server (imported only when serving)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshlm.errors import ConfigError
from meshlm.serve.config import ServerConfig

DEFAULT_NAME = "SmolLM2-135M-Instruct"
KEY_ENV = "MESHLM_REPLICA_KEY"  # the shared secret remote replicas authenticate with (HMAC challenge)


def add_parser(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `serve` subcommand."""
    p = sub.add_parser("serve", help="serve an OpenAI-compatible HTTP API",
                       description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics (Prometheus) over HTTP, with the engine loop in the background.")
    add_model_args(p)
    if not any("--pp" in a.option_strings for a in p._actions):
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default 1)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key-env", metavar="VAR", default=None,
                   help="name of the environment variable holding the API key; when set, every route but "
                        "/health needs 'Authorization: Bearer <key>'")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: from --model)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests computed at once (default 64)")
    p.add_argument("--fixed-threads", action="store_true",
                   help="run every step on --threads (default: a one-process replica times its decode steps on "
                        "--threads and one fewer, leaving a core to the server, and keeps the faster)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per step (default 2048)")
    p.add_argument("--max-waiting", type=int, default=128,
                   help="queued requests before new ones get 429 (default 128)")
    p.add_argument("--kv-cache-mb", type=float, default=None, help="KV cache per rank in MiB (default: 25%% "
                                                                    "of free memory)")
    p.add_argument("--max-n", type=int, default=16, help="choices per request at most (default 16)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds from a request's arrival to its last token, queueing included (default 600); "
                        "a client may ask for less with the X-Request-Timeout header")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request body before it gets 408 (default 30)")
    p.add_argument("--default-max-tokens", type=int, default=1024,
                   help="new tokens for a request that sends no max_tokens (default 1024; the context "
                        "length still bounds it)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests (default 30)")
    p.add_argument("--health-deadline", type=float, default=10.0,
                   help="seconds a restarted replica's probe request may take before it fails (default 10)")
    p.add_argument("--trace", default=None, metavar="OUT.json",
                   help="with --pp: record every rank's compute, transfers and idle time over the first "
                        "--trace-steps engine steps, then write them as a Chrome trace (ui.perfetto.dev)")
    p.add_argument("--trace-steps", type=int, default=200, metavar="N",
                   help="engine steps the --trace window holds (default 200)")
    p.add_argument("--allow-origin", action="append", default=[],
                   help="enable CORS for this origin (repeatable; CORS is off by default)")
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas, each with its own tp x pp ranks and engine, behind a router "
                        "(least outstanding tokens, prefix affinity); a failed one is restarted (default 1)")
    p.add_argument("--stall-timeout", type=float, default=1.25,
                   help="seconds a replica may send no heartbeat, or spend in one engine call, before it counts "
                        "as failed (default 1.25; raise it for a model one of whose layers can take longer)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="replicas a request may be moved off (after a failure) before it fails (default 3)")
    p.add_argument("--remote-replicas", type=int, default=0, metavar="K",
                   help="of the --dp replicas, K run on other hosts and connect to --replica-listen (start each "
                        "there with `meshlm serve --join HOST:PORT ...`, under torchrun for several ranks); "
                        f"both sides need the shared secret in ${KEY_ENV}")
    p.add_argument("--replica-listen", default=None, metavar="HOST:PORT",
                   help="address where remote replicas connect (with --remote-replicas)")
    p.add_argument("--join", default=None, metavar="HOST:PORT",
                   help="instead of serving HTTP, load the model and serve as a remote replica of the router "
                        "listening there (its --replica-listen)")
    p.add_argument("--join-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="with --join: keep trying to reach the router (backoff up to 5 s) for this long before "
                        "giving up, so replicas may start before the router (default 60)")
    p.add_argument("--exit-on-failure", action="store_true",
                   help="a failed replica ends the server (exit 1) instead of being restarted, for supervisors "
                        "that restart whole servers")


def parse_address(text: str, what: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), or a ConfigError naming the flag."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} must be HOST:PORT (e.g. 10.0.0.1:29600), got {text!r}.")
    return host, int(port)


def replica_key() -> bytes:
    """The shared secret of remote replicas, from the environment (both sides), or a ConfigError."""
    key = os.environ.get(KEY_ENV)
    if not key:
        raise ConfigError(f"Remote replicas authenticate with a shared secret: export {KEY_ENV} (the same "
                          "value) on the server and on every replica host.")
    return key.encode()


def _model_name(model: str | None) -> str:
    if model is None:
        return DEFAULT_NAME
    path = Path(model)
    return path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.name


def cmd_serve(args: argparse.Namespace) -> int:
    """Build the LLM and serve until SIGTERM; returns the exit code."""
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env) or None
        if key is None:
            raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is unset or "
                              "empty; export the key in it (the key is never passed on the command line).")
    if args.trace and args.pp == 1:
        raise ConfigError("--trace shows the pipeline's stages; add --pp 2 (or more).")
    if args.trace and args.dp > 1:
        raise ConfigError("--trace records one replica's pipeline; use it with --dp 1.")
    if args.dp < 1:
        raise ConfigError(f"--dp must be >= 1, got {args.dp}.")
    if not args.stall_timeout > 0:
        raise ConfigError(f"--stall-timeout must be positive, got {args.stall_timeout}.")
    if args.max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {args.max_retries}.")
    if not 0 <= args.remote_replicas <= args.dp:
        raise ConfigError(f"--remote-replicas must be in 0..--dp ({args.dp}), got {args.remote_replicas}.")
    if args.remote_replicas and args.replica_listen is None:
        raise ConfigError("--remote-replicas needs --replica-listen HOST:PORT, where those replicas connect.")
    listen = parse_address(args.replica_listen, "--replica-listen") if args.remote_replicas else None
    join = parse_address(args.join, "--join") if args.join else None
    if join and not args.join_timeout > 0:
        raise ConfigError(f"--join-timeout must be positive seconds, got {args.join_timeout}.")
    secret = replica_key() if listen or join else b""
    name = args.served_model_name or _model_name(args.model)
    cfg = ServerConfig(host=args.host, port=args.port, model_name=name,
                       api_key=key, max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                       request_timeout_s=args.request_timeout, body_timeout_s=args.body_timeout,
                       default_max_tokens=args.default_max_tokens, drain_timeout_s=args.drain_timeout,
                       health_deadline_s=args.health_deadline, cors_origins=tuple(args.allow_origin))
    import logging

    from meshlm.checkpoint import open_checkpoint
    from meshlm.cli import speculative_config
    from meshlm.engine.engine import EngineConfig
    from meshlm.engine.executor import launched_by_torchrun
    from meshlm.engine.scheduler import SchedulerConfig
    from meshlm.serve.fleet import RouterConfig
    from meshlm.serve.replica import ReplicaSpec
    from meshlm.serve.routing import RetryPolicy
    from meshlm.serve.server import serve

    # The default KV pool is a share of this host's memory: the replicas split it.
    ecfg = EngineConfig(kv_cache_mb=args.kv_cache_mb, kv_cache_fraction=0.25 / args.dp,
                        scheduler=SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.max_waiting))
    extra = {k: getattr(args, k) for k in ("transport", "pp_layers", "device", "ep", "expert_capacity",
                                           "redundant_experts", "eplb_interval", "expert_budget")
             if getattr(args, k, None) is not None}
    threads = args.threads
    if threads is None and args.dp > 1 and "MESHLM_THREADS" not in os.environ:
        ranks = max(args.tp, getattr(args, "ep", None) or 1) * args.pp * args.cp  # ep=N alone implies tp=N
        threads = max(1, (os.cpu_count() or 1) // (args.dp * ranks))  # replicas share the cores
    # With --pp the engine keeps one step in flight per stage (engine/pipeline_stage.py).
    llm_kwargs = dict(model=args.model, dtype=args.dtype, quantize=args.quantize, threads=threads,
                      max_context=args.max_context, tp=args.tp, pp=args.pp, cp=args.cp, cp_ring=args.cp_ring,
                      comm_timeout_s=args.comm_timeout,
                      backend=args.backend, engine=ecfg, progress=args.dp == 1,
                      speculative=speculative_config(args), **extra)
    torchrun, rank = launched_by_torchrun()
    if torchrun:
        if args.dp > 1 and not join:
            raise ConfigError("--dp > 1 under torchrun: torchrun's world is one replica's ranks. Start the "
                              "router with --dp N --remote-replicas K --replica-listen HOST:PORT, and each remote "
                              "replica with `torchrun ... -m meshlm.launch serve --join HOST:PORT ...`.")
        if rank != 0:
            from meshlm.llm import LLM

            LLM(**llm_kwargs)  # serves rank 0's calls, then exits
            return 0
    spec = ReplicaSpec(llm_kwargs, trace=(args.trace, args.trace_steps) if args.trace else None,
                       log_level=logging.INFO if args.verbose else logging.WARNING,
                       tune_threads=not args.fixed_threads)
    if join:
        from meshlm.serve.links import connect
        from meshlm.serve.replica import replica_main

        replica_main(connect(join, secret, args.join_timeout), spec, remote=True)  # exits
    # Under torchrun the other ranks cannot be restarted from here: a failure ends the server (torchrun restarts).
    rcfg = RouterConfig(dp=args.dp, remote=args.remote_replicas, listen=listen, key=secret, stall_s=args.stall_timeout,
                        retry=RetryPolicy(max_attempts=args.max_retries),
                        probe_timeout_s=args.health_deadline,
                        exit_on_failure=args.exit_on_failure or torchrun)
    tokenizer = open_checkpoint(args.model).tokenizer  # a bad --model fails here, before any process starts
    return serve(spec, tokenizer, cfg, rcfg, aliases=() if args.model is None else (args.model,),
                 log_level="info" if args.verbose else "warning", key_env=args.api_key_env)
