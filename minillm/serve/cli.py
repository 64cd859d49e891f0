"""`minillm serve [MODEL] --host 127.0.0.1 --port 8000 [engine options]` (chapter 10).

minillm/cli.py owns the parser and calls `register(subparsers)`. The engine options are not written out by
hand: every field of EngineConfig becomes a flag of vLLM's spelling (max_num_seqs -> --max-num-seqs,
enable_prefix_caching -> --enable-prefix-caching, scheduling_policy -> --scheduling-policy), so an option the
engine gains (a KV-cache dtype, a speculative config) is a server flag the day it exists; a field with a few
allowed values (config.ENGINE_CHOICES) lists them in --help and the parser refuses any other. The server binds
127.0.0.1 unless told otherwise: an inference server on every interface is an open compute service.

LoRA adapters are served as vLLM serves them: `--enable-lora --lora-modules sql=/adapters/sql '{"name": "chat",
"path": "/adapters/chat"}' --max-loras 2 --max-lora-rank 16`, and a request's `model` picks one
(minillm/serve/serving_models.py). Every module is checked before the model loads (its spec, its name, its
directory), and against the model once it has loaded, so a bad one stops the server at startup.
`--allow-runtime-lora-updating` (or MINILLM_ALLOW_RUNTIME_LORA_UPDATING=1, or vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) also mounts vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

`--skip-tokenizer-init` (vLLM's) reads no tokenizer: token ids in and out on /v1/completions (return_token_ids),
what needs text refused with a 400 (serve/chat_prompt.require_tokenizer).

vLLM's other server options, same spelling: `--enable-auto-tool-choice --tool-call-parser
hermes|pythonic|llama3_json|mistral` (tool_choice "auto": serve/tool_parser.py, pythonic_tools.py, json_tools.py),
`--reasoning-parser deepseek_r1|qwen3` (reasoning_content: serve/reasoning.py), `--pooler-config
'{"pooling_type": "MEAN"}'` (embeddings, /score, /rerank: serve/embeddings.py); and from the environment,
MINILLM_SERVER_DEV_MODE=1 (or VLLM_SERVER_DEV_MODE=1: POST /reset_prefix_cache and sleep mode's endpoints) and
MINILLM_TORCH_PROFILER_DIR (or VLLM_TORCH_PROFILER_DIR: POST /start_profile and /stop_profile).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from minillm.config import ENGINE_CHOICES, EngineConfig
from minillm.serve.reasoning import REASONING_PARSERS
from minillm.serve.tool_parser import TOOL_CALL_PARSERS


def _json_object(text: str) -> dict[str, Any]:
    """A dict-valued option given as JSON, as vLLM takes --speculative-config '{"method": "ngram", ...}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"method\": \"ngram\"}}', got {text!r}")
    return value


def lora_module(text: str) -> Any:
    """One --lora-modules entry, in either of vLLM's forms: `name=path`, or a JSON object
    '{"name": ..., "path": ..., "base_model_name": ...}' (base_model_name, optional: the `parent` /v1/models shows)."""
    from minillm.serve.serving_models import LoRAModulePath
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({err.msg})") from None
        unknown = sorted(set(spec) - {"name", "path", "base_model_name"}) if isinstance(spec, dict) else []
        if not isinstance(spec, dict) or unknown or not all(isinstance(spec.get(k), str) for k in ("name", "path")):
            raise argparse.ArgumentTypeError(f"expected {{\"name\": str, \"path\": str}} and optionally "
                                             f"\"base_model_name\": str, got {text!r}")
        name, path, parent = spec["name"], spec["path"], spec.get("base_model_name")
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected name=path (or a JSON object), got {text!r} (the MODEL "
                                             f"goes before --lora-modules, which takes every word after it)")
        parent = None
    try:
        return LoRAModulePath(name.strip(), path, parent)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err} (in {text!r})") from None


def pooler_config(text: str) -> Any:
    """--pooler-config, vLLM's: how embeddings, /score and /rerank pool, '{"pooling_type": "MEAN", "normalize":
    true}' (minillm.pooling.PoolingParams; a request may still set normalize and dimensions)."""
    from minillm.pooling import PoolingParams
    from minillm.sampling_params import ParamError
    spec = _json_object(text)
    unknown = sorted(set(spec) - {"pooling_type", "normalize"})
    if unknown:
        raise argparse.ArgumentTypeError(f"--pooler-config takes pooling_type and normalize, got {unknown[0]!r}")
    try:
        return PoolingParams(**spec)
    except ParamError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


DEV_MODE_ENV = ("MINILLM_SERVER_DEV_MODE", "VLLM_SERVER_DEV_MODE")


def dev_mode() -> bool:
    """Whether the developers' endpoints are on (POST /reset_prefix_cache): an environment variable set to 1 or
    true, as vLLM reads VLLM_SERVER_DEV_MODE."""
    return any(os.environ.get(name, "0").strip().lower() in ("1", "true") for name in DEV_MODE_ENV)


def _profile_dir() -> str | None:
    """MINILLM_TORCH_PROFILER_DIR or VLLM_TORCH_PROFILER_DIR, if set: the server mounts /start_profile there."""
    from minillm.engine.profiler import profiler_dir
    try:
        return profiler_dir()
    except RuntimeError:
        return None


RUNTIME_LORA_ENV = ("MINILLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def runtime_lora_updating(args: argparse.Namespace) -> str | None:
    """What turned runtime adapter loading on (the flag, or the environment variable that did), None if off.
    --no-allow-runtime-lora-updating overrides the variables; they count as vLLM reads its own: 1 or true."""
    if args.allow_runtime_lora_updating is not None:
        return "--allow-runtime-lora-updating" if args.allow_runtime_lora_updating else None
    for name in RUNTIME_LORA_ENV:
        if os.environ.get(name, "0").strip().lower() in ("1", "true"):
            return f"{name}={os.environ[name]}"
    return None


def check_lora_modules(args: argparse.Namespace) -> None:
    """ValueError for what --lora-modules gets wrong that needs no model: the missing --enable-lora (vLLM's rule,
    kept; runtime adapter loading needs it too), a name given twice or equal to --served-model-name, a directory
    that is not a PEFT adapter."""
    from minillm.lora.adapter import load_adapter
    modules = args.lora_modules or []
    if modules and not args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora (with --max-loras and --max-lora-rank to size the "
                         "adapter slots): add it")
    runtime = runtime_lora_updating(args)
    if runtime and not args.enable_lora:
        raise ValueError(f"{runtime} (runtime LoRA loading) needs --enable-lora (with --max-loras and "
                         f"--max-lora-rank to size the adapter slots): add it"
                         + ("" if runtime.startswith("--") else ", or --no-allow-runtime-lora-updating"))
    names = [m.name for m in modules]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--lora-modules: the name {twice[0]!r} is given twice; each adapter needs a name of its own")
    if args.served_model_name in names:
        raise ValueError(f"--lora-modules: {args.served_model_name!r} is the --served-model-name of the base model; "
                         f"give the adapter a name of its own")
    for m in modules:
        try:  # reads the adapter (megabytes); checked against the model once it has loaded (build_app)
            load_adapter(m.path)
        except ValueError as err:
            raise ValueError(f"--lora-modules {m.name}={m.path}: {err}") from None


def _flag_type(annotation: str) -> Any:
    """argparse type for an EngineConfig annotation (a string under `from __future__ import annotations`)."""
    text = str(annotation)
    if text.startswith("dict"):
        return _json_object
    if "bool" in text:
        return bool
    for name, kind in (("int", int), ("float", float), ("str", str)):
        if name in text.replace("|", " ").split():
            return kind
    return None


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (EngineConfig; defaults are decided per model and device)")
    for f in dataclasses.fields(EngineConfig):
        kind = _flag_type(f.type)
        if kind is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"EngineConfig.{f.name}")
        elif f.name in ENGINE_CHOICES:  # None among the allowed values is the default: not a value to type
            group.add_argument(flag, choices=[c for c in ENGINE_CHOICES[f.name] if c is not None], default=None,
                               help=f"EngineConfig.{f.name}")
        else:
            group.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"EngineConfig.{f.name}")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags the user gave (None: left to the engine's defaults)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if hasattr(args, f.name) and getattr(args, f.name) is not None}


def check_server_options(args: argparse.Namespace) -> str | None:
    """ValueError for the options that need no model (checked before seconds of loading); what turned runtime
    LoRA updating on, if anything (runtime_lora_updating)."""
    check_lora_modules(args)
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):  # vLLM's rule: both or neither
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together: give both (e.g. "
                         "--enable-auto-tool-choice --tool-call-parser hermes) or neither")
    if args.skip_tokenizer_init:  # each of these reads or writes text
        given = [flag for flag, value in (("--tokenizer", args.tokenizer), ("--chat-template", args.chat_template),
                                          ("--tool-call-parser", args.tool_call_parser),
                                          ("--reasoning-parser", args.reasoning_parser)) if value is not None]
        if given:
            raise ValueError(f"--skip-tokenizer-init serves token ids only; {given[0]} needs a tokenizer: give "
                             f"one or the other")
    return runtime_lora_updating(args)


def cors_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """CORSMiddleware's options from the --allowed-* flags; None without --allowed-origins (no CORS headers)."""
    if args.allowed_origins is None:
        if args.allow_credentials or args.allowed_methods is not None or args.allowed_headers is not None:
            raise ValueError("--allow-credentials, --allowed-methods and --allowed-headers need --allowed-origins "
                             "(the web origins allowed to call this server, e.g. '[\"http://localhost:3000\"]')")
        return None
    return {"allow_origins": args.allowed_origins, "allow_credentials": args.allow_credentials,
            "allow_methods": args.allowed_methods or ["*"], "allow_headers": args.allowed_headers or ["*"]}


def _json_strings(text: str) -> list[str]:
    """argparse type: a JSON list of strings (vLLM's spelling of --allowed-origins and its kin)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"must be a JSON list of strings, e.g. '[\"http://localhost:3000\"]', "
                                         f"got {text!r}")
    return value


def _json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object (--override-generation-config '{"temperature": 0.5}')."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, e.g. '{{\"temperature\": 0.5}}', got {text!r}")
    return value


def build_served_app(args: argparse.Namespace, runtime_lora: str | None = None, api_key: str | None = None,
                     max_body_bytes: int = 1 << 20, cors: dict[str, Any] | None = None) -> tuple[Any, Any, str]:
    """(LLM, the app, the served model name) for the model options `serve` and `run-batch` share."""
    from minillm.engine.async_llm import AsyncLLM
    from minillm.llm import LLM
    from minillm.serve.app import build_app
    chat_template = None
    if args.chat_template is not None:
        from minillm.loader.chat_template import compile_chat_template
        with open(args.chat_template, encoding="utf-8") as f:
            chat_template = f.read()
        try:  # the operator's file: a template that does not parse is refused here, not blamed on each client
            compile_chat_template(chat_template)
        except ValueError as err:
            raise ValueError(f"--chat-template {args.chat_template}: {err}") from None
    llm = LLM(args.model, tokenizer=args.tokenizer, skip_tokenizer_init=args.skip_tokenizer_init,
              load_format=args.load_format, hf_overrides=args.hf_overrides, dtype=args.dtype,
              device=args.device, seed=args.seed, quantization=args.quantization,
              generation_config=args.generation_config, override_generation_config=args.override_generation_config,
              **engine_options(args))
    name = args.served_model_name or os.path.basename(os.path.normpath(llm.model_path or "minillm"))
    app = build_app(AsyncLLM.from_llm(llm), name, api_key=api_key, chat_template=chat_template,
                    max_body_bytes=max_body_bytes, shutdown_timeout=0.0,
                    trust_request_chat_template=args.trust_request_chat_template, lora_modules=args.lora_modules,
                    allow_runtime_lora_updating=runtime_lora is not None, pooler_config=args.pooler_config,
                    dev_mode=dev_mode(), profile_dir=_profile_dir(),
                    tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                    reasoning_parser=args.reasoning_parser, cors=cors,
                    enable_prompt_tokens_details=args.enable_prompt_tokens_details)
    return llm, app, name


def _cmd_serve(args: argparse.Namespace) -> int:
    from minillm.serve.server import bind, check_ssl, run

    try:
        if not 0 <= args.graceful_timeout < float("inf"):  # checked again by run(), after the model had loaded
            raise ValueError(f"--graceful-timeout must be a finite number of seconds >= 0, got {args.graceful_timeout}")
        runtime_lora = check_server_options(args)
        cors = cors_options(args)
        check_ssl(args.ssl_keyfile, args.ssl_certfile)
        sock = bind(args.host, args.port)  # a bad or busy port fails now, not after loading the model
        llm, app, name = build_served_app(args, runtime_lora, args.api_key, args.max_body_bytes, cors)
        if runtime_lora:
            print(f"minillm serve: {runtime_lora}: POST /v1/load_lora_adapter and "
                  f"/v1/unload_lora_adapter are on; whoever can reach the server can make it read any directory as "
                  f"an adapter (keep it on localhost, or behind --api-key)", file=sys.stderr)
        scheme = "https" if args.ssl_certfile else "http"
        print(f"minillm serve: {name} on {scheme}://{args.host}:{args.port} (playground at /, metrics at /metrics)",
              file=sys.stderr)
        run(app, args.host, args.port, graceful_timeout=args.graceful_timeout, log_level=args.log_level, sock=sock,
            ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile)
    except (ValueError, TypeError, OSError) as err:
        print(f"minillm serve: error: {err}", file=sys.stderr)
        return 2
    llm.llm_engine.shutdown()
    return 0


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options of the model a server answers with (serve and run-batch): its file, names, templates,
    adapters, parsers, and the engine's options."""
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the tokenizer from this HF directory or .gguf file instead of the model's own")
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="read no tokenizer: /v1/completions takes token-id prompts and answers with empty text "
                        "(return_token_ids: true gives the ids); chats and text prompts are refused")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="auto: the checkpoint's weights; dummy: random weights of its shapes (config.json alone "
                        "serves; for benchmarks)")
    p.add_argument("--hf-overrides", type=_json_object, default=None, metavar="JSON",
                   help='model config fields changed before building, e.g. \'{"sliding_window": 256}\'')
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the file name)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file (default: the model's own)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat request's own chat_template (code the server runs; refused by default)")
    p.add_argument("--lora-modules", nargs="+", type=lora_module, default=None, metavar="NAME=PATH",
                   help="LoRA adapters (PEFT directories) to serve, each as name=path or JSON '{\"name\": ..., "
                        "\"path\": ...}'; a request's \"model\": name runs with it. Needs --enable-lora (as in "
                        "vLLM: the server refuses to start without it); ids 1, 2, ... in the order given")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="serve tool_choice 'auto' (OpenAI's default with tools): the model may call a tool in its "
                        "answer; needs --tool-call-parser")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="the model's tool-call syntax: hermes (<tool_call>{...}</tool_call>), pythonic "
                        "([f(x=1), ...]), llama3_json ({\"name\": ..., \"parameters\": ...}) or mistral "
                        "([TOOL_CALLS][{...}])")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="usage.prompt_tokens_details.cached_tokens: the prompt tokens served from the prefix cache")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="a thinking model's <think>...</think> returned as reasoning_content, apart from the content")
    p.add_argument("--pooler-config", type=pooler_config, default=None, metavar="JSON",
                   help='how /v1/embeddings, /score and /rerank pool: \'{"pooling_type": "MEAN"}\' (LAST, MEAN, CLS; '
                        'default LAST, normalized)')
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None,
                   help="quantize a dense checkpoint while loading (rtn, fp8, nf4, int8)")
    p.add_argument("--generation-config", default="auto",
                   help="the sampling defaults of requests that leave a knob out: 'auto' (the model directory's "
                        "generation_config.json), 'vllm' (none: SamplingParams' own) or a directory holding one; "
                        "its max_new_tokens caps every completion")
    p.add_argument("--override-generation-config", type=_json_object, default=None, metavar="JSON",
                   help='defaults merged over the generation config\'s, e.g. \'{"temperature": 0.5}\'')
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    add_engine_flags(p)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with streaming, /metrics and a playground")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MINILLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (env MINILLM_API_KEY)")
    p.add_argument("--allow-runtime-lora-updating", action=argparse.BooleanOptionalAction, default=None,
                   help="mount POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes: adapters "
                        "added and removed while serving). Needs --enable-lora. Default: on when the environment "
                        "sets MINILLM_ALLOW_RUNTIME_LORA_UPDATING or vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING to 1 "
                        "or true")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish after Ctrl-C/SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--allowed-origins", type=_json_strings, default=None, metavar="JSON",
                   help="web origins whose pages may call the server from a browser (CORS), e.g. "
                        "'[\"http://localhost:3000\"]' or '[\"*\"]'; default none (vLLM's default is \"*\")")
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow cookies and auth headers")
    p.add_argument("--allowed-methods", type=_json_strings, default=None, metavar="JSON", help='CORS (default ["*"])')
    p.add_argument("--allowed-headers", type=_json_strings, default=None, metavar="JSON", help='CORS (default ["*"])')
    p.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    p.add_argument("--ssl-certfile", default=None, help="... and this certificate (PEM)")
    add_model_options(p)
    p.set_defaults(func=_cmd_serve)
    from minillm.serve.run_batch import register_run_batch
    register_run_batch(subparsers)
