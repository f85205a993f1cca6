"""`python -m glm_core chat MODEL`: a terminal chat like the official cli_demo (`clear` starts over, `stop` quits)."""
from __future__ import annotations

import argparse
import os
import sys
import threading

from . import GenerationParams, ModelLoadError, PromptTooLongError, ReplyStats, load
from .registry import PRECISIONS, default_precision


def chat(args: argparse.Namespace) -> int:
    def progress(done: int, total: int, label: str) -> None:
        print(f"\rloading {args.model}: {done}/{total} {label}".ljust(70), end="", file=sys.stderr, flush=True)
    try:
        precision = args.precision or default_precision(args.model)
        engine = load(args.model, precision=precision, device=args.device, progress=progress)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(f"\n{engine.name} ({engine.precision}, {engine.device}). Type your message; "
          f"'clear' starts over, 'stop' quits.", file=sys.stderr)
    params = GenerationParams(**{**engine.default_params.to_dict(),
                                 **{k: v for k, v in vars(args).items() if k in ("max_new_tokens", "temperature", "top_p")
                                    and v is not None}})
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            query = input("\nUser: ").strip()
        except EOFError:
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            messages = messages[:1] if args.system else []
            engine.reset()
            os.system("clear" if os.name != "nt" else "cls")
            continue
        if not query:
            continue
        messages.append({"role": "user", "content": query})
        stats, stop, reply = ReplyStats(), threading.Event(), ""
        print(f"\n{engine.name}: ", end="", flush=True)
        try:
            for delta in engine.stream_chat(messages, params, stop, stats):
                reply += delta
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            stop.set()                       # Ctrl-C ends this reply, keeps what was written
        except PromptTooLongError as e:
            messages.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": engine.clean(reply)})
        print(f"\n[{stats.new_tokens} tokens · first token {stats.ttft_s:.2f} s · {stats.decode_tok_s:.1f} tokens/s"
              + (f" · {stats.dropped_turns} oldest messages left out" if stats.dropped_turns else "") + "]",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm_core")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("chat", help="chat in the terminal")
    c.add_argument("model", help="registry name (chatglm2-6b, ...), local directory, .gguf file or Hub id")
    c.add_argument("--precision", choices=PRECISIONS,
                   help="default: as stored for INT8/INT4 checkpoints, fp32 for the embedded model, else bf16")
    c.add_argument("--device", default="cpu")
    c.add_argument("--system", default="", help="system prompt")
    c.add_argument("--max-new-tokens", type=int)
    c.add_argument("--temperature", type=float)
    c.add_argument("--top-p", type=float)
    args = parser.parse_args(argv)
    return chat(args)


if __name__ == "__main__":
    sys.exit(main())
