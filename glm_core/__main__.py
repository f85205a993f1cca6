"""The command line: `python -m glm_core chat MODEL` (a terminal chat like the official cli_demo: `clear` starts over,
`stop` quits) and `python -m glm_core serve MODEL` (the HTTP API alone).

These are front ends, like the web pages: they take the application layer's chat turn (app.chat) and server, so a
terminal reply follows the same rules as a web one (context fitting, clean-up, finish reasons) and is saved in the
same history. The library modules of glm_core import nothing from the application layer."""
from __future__ import annotations

import argparse
import os
import sys

from .registry import PRECISIONS, default_precision


def chat(args: argparse.Namespace) -> int:
    from app.chat import ChatError, ChatService
    from glm_core.engines import ModelLoadError
    from glm_core.service import ModelService
    from storage import open_store

    precision = args.precision or default_precision(args.model)
    models = ModelService(args.model, precision, args.device, max_batch=1)
    models.ensure_loading()
    print(f"loading {args.model} ({precision}, {args.device}) ...", file=sys.stderr, flush=True)
    try:
        engine = models.wait_loaded()
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    store = open_store()
    service = ChatService(store, models)
    print(f"{engine.name} ({engine.precision}, {engine.device}). Type your message; 'clear' starts over, 'stop' quits. "
          f"Conversations are saved in {store.path}.", file=sys.stderr)
    params = {**engine.default_params.to_dict(),
              **{k: v for k, v in vars(args).items() if k in ("max_new_tokens", "temperature", "top_p") and v is not None}}
    conversation = None
    try:
        while True:
            try:
                query = input("\nUser: ").strip()
            except EOFError:
                return 0
            if query == "stop":
                return 0
            if query == "clear":
                conversation = None
                os.system("clear" if os.name != "nt" else "cls")
                continue
            if not query:
                continue
            try:
                conversation, turn = service.send("terminal", query, conversation, params=params,
                                                  system_prompt=args.system)
            except ChatError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            print(f"\n{engine.name}: ", end="", flush=True)
            if turn is None:   # failed at once (too long for the context): saved with the reason
                print(f"\nerror: {store.messages(conversation, 'terminal')[-1]['error']}", file=sys.stderr)
                continue
            try:
                for delta in turn.request.deltas():
                    print(delta, end="", flush=True)
            except KeyboardInterrupt:
                turn.request.cancel()      # Ctrl-C ends this reply, keeps what was written
            turn.saved.wait(10)
            stats = turn.request.stats
            notes = [f"{stats.new_tokens} tokens", f"first token {stats.ttft_s:.2f} s", f"{stats.decode_tok_s:.1f} tokens/s"]
            if stats.dropped_turns:
                notes.append(f"{stats.dropped_turns} oldest messages left out")
            if turn.request.error:
                notes.append(f"error: {turn.request.error}")
            print("\n[" + " · ".join(notes) + "]", file=sys.stderr)
    finally:
        models.close()
        store.close()


def serve(args: argparse.Namespace) -> int:
    from app.api import serve_api
    return serve_api(args.model, args.precision or default_precision(args.model), args.device, args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_core")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "registry name (chatglm2-6b, ...), local directory, .gguf file or Hub id"
    precision_help = "default: as stored for INT8/INT4 checkpoints, fp32 for the embedded model, else bf16"
    c = sub.add_parser("chat", help="chat in the terminal")
    c.add_argument("model", help=model_help)
    c.add_argument("--precision", choices=PRECISIONS, help=precision_help)
    c.add_argument("--device", default="cpu")
    c.add_argument("--system", default="", help="system prompt")
    c.add_argument("--max-new-tokens", type=int)
    c.add_argument("--temperature", type=float)
    c.add_argument("--top-p", type=float)
    s = sub.add_parser("serve", help="the OpenAI-compatible HTTP API alone")
    s.add_argument("model", help=model_help)
    s.add_argument("--precision", choices=PRECISIONS, help=precision_help)
    s.add_argument("--device", default="cpu")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    return chat(args) if args.command == "chat" else serve(args)


if __name__ == "__main__":
    sys.exit(main())
