"""The `flashlm` command. Thin: parses arguments, calls the library, prints.

A user mistake (a FlashlmError) prints ``error: <message>`` on stderr and exits 2;
Ctrl-C exits 130. No traceback for either.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from flashlm.errors import FlashlmError, InputError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# ---- store commands ----


@command
def cmd_pull(args: argparse.Namespace) -> int:
    from flashlm.models.pull import pull_model
    from flashlm.models.registry import catalog, is_current, store_path

    names = args.names or []
    if args.all:
        names = sorted(catalog())
    if not names:
        raise InputError("name a model to pull (known: " + ", ".join(sorted(catalog())) + ") or pass --all")
    for name in names:
        already = is_current(store_path(name))
        path = pull_model(name, progress=_progress(args))
        print(f"{name}: {'already pulled' if already else 'pulled'} -> {path}")
    return 0


@command
def cmd_list(args: argparse.Namespace) -> int:
    from flashlm.models.registry import pulled
    from flashlm.offload.store import Store

    rows = []
    for p in pulled():
        s = Store(p)
        c = s.config
        rows.append((p.name, c.model_type, str(c.num_hidden_layers), _human(s.nbytes), str(p)))
    if not rows:
        print("no models yet; try `flashlm pull smollm2-135m`")
        return 0
    widths = [max(len(r[i]) for r in rows + [("NAME", "ARCH", "LAYERS", "SIZE", "PATH")]) for i in range(5)]
    for r in [("NAME", "ARCH", "LAYERS", "SIZE", "PATH")] + rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    return 0


@command
def cmd_convert(args: argparse.Namespace) -> int:
    src = Path(args.src)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise InputError(f"{out} already exists; pass --force to replace it")
    from flashlm.offload.store import check_replaceable

    check_replaceable(out)  # --force replaces a store (or an empty directory), nothing else
    if src.is_file() and src.suffix == ".gguf":
        if args.quant:
            raise InputError("--quant applies to HF imports; a GGUF keeps its block formats")
        from flashlm.models.gguf_import import import_gguf

        path = import_gguf(src, out, progress=not args.quiet)
    elif src.is_dir():
        from flashlm.models.hf_import import import_hf

        path = import_hf(src, out, quant=args.quant, progress=not args.quiet)
    elif src.exists():
        raise InputError(f"{src}: expected a .gguf file or an HF model directory")
    else:
        raise InputError(f"{src}: no such file or directory")
    print(f"wrote {path}")
    return 0


@command
def cmd_info(args: argparse.Namespace) -> int:
    from flashlm.kernels.formats import GGUF_OF
    from flashlm.models.registry import resolve
    from flashlm.offload.store import Store

    s = Store(resolve(args.model, progress=_progress(args)))
    c = s.config
    by_fmt: dict[str, int] = {}
    counts: dict[str, int] = {}
    for t in s.tensor_info.values():
        by_fmt[t["format"]] = by_fmt.get(t["format"], 0) + t["nbytes"]
        counts[t["format"]] = counts.get(t["format"], 0) + 1
    layer_bytes = [s.layer_nbytes(i) for i in range(s.n_layers)]
    layer_fmt: dict[str, int] = {}
    for n in s.layer_names(0):
        f = s.tensor_info[n]["format"]
        layer_fmt[f] = layer_fmt.get(f, 0) + s.tensor_info[n]["nbytes"]
    info: dict[str, Any] = {
        "path": str(s.path),
        "architecture": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "rope_layout": c.rope_layout,
        "tied_embeddings": c.tie_word_embeddings,
        "total_bytes": s.nbytes,
        "formats": {f: {"tensors": counts[f], "bytes": by_fmt[f]} for f in sorted(by_fmt)},
        "layer_bytes": {"min": min(layer_bytes), "max": max(layer_bytes)},
        "layer0_bytes_by_format": layer_fmt,
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{args.model}  ({s.path})")
    print(f"  architecture   {c.model_type}, {c.num_hidden_layers} layers, hidden {c.hidden_size}, ffn {c.intermediate_size}")
    print(f"  attention      {c.num_attention_heads} heads, {c.num_key_value_heads} kv heads, head_dim {c.head_dim}, "
          f"rope theta {c.rope_theta:g} ({c.rope_layout})")
    print(f"  vocab          {c.vocab_size}, context {c.max_position_embeddings}, tied embeddings: {c.tie_word_embeddings}")
    print(f"  size           {_human(s.nbytes)}")
    print("  formats        " + ", ".join(f"{f} x{counts[f]} ({_human(by_fmt[f])})" for f in sorted(by_fmt)))
    for f in sorted(set(by_fmt) & set(GGUF_OF)):
        print(f"                 ({f}: GGUF {GGUF_OF[f]} in flashlm's store layout, same values)")
    print(f"  per layer      {_human(min(layer_bytes))} .. {_human(max(layer_bytes))}: "
          + ", ".join(f"{f} {_human(b)}" for f, b in sorted(layer_fmt.items())))
    return 0


@command
def cmd_verify(args: argparse.Namespace) -> int:
    from flashlm.offload.store import Store
    from flashlm.progress import byte_progress

    s = Store(args.store)
    with byte_progress(s.nbytes, "verify", enabled=_progress(args)) as bar:
        bad = s.verify(bar)
    if bad:
        print(f"{s.path}: checksum mismatch in {', '.join(bad)}; re-import the model", file=sys.stderr)
        return 1
    print(f"{s.path}: {len(s.files)} files ok")
    return 0


@command
def cmd_tokenize(args: argparse.Namespace) -> int:
    from flashlm.models.registry import resolve
    from flashlm.offload.store import Store
    from flashlm.api import open_tokenizer

    tok = open_tokenizer(Store(resolve(args.model, progress=_progress(args))))
    ids = tok.encode(args.text)
    if args.json:
        print(json.dumps(ids))
    else:
        print(" ".join(str(i) for i in ids))
    return 0


# ---- parser ----


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashlm", description="Run LLMs larger than RAM: per-layer store, streaming offload, Numba kernels.")
    p.add_argument("--version", action="version", version=f"flashlm {__import__('flashlm').__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("pull", help="download a known model and import it")
    s.add_argument("names", nargs="*", metavar="NAME")
    s.add_argument("--all", action="store_true", help="pull every known model")
    s.add_argument("-q", "--quiet", action="store_true")

    sub.add_parser("list", help="list pulled and imported models")

    s = sub.add_parser("convert", help="convert a GGUF file or HF directory into a store")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--quant", choices=["q8_0", "q4_0"], help="quantize HF weights on import")
    s.add_argument("--force", action="store_true", help="replace OUT if it is a store")
    s.add_argument("-q", "--quiet", action="store_true")

    s = sub.add_parser("info", help="architecture, sizes and formats of a model")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("verify", help="re-check every checksum of a store")
    s.add_argument("store", metavar="STORE")

    s = sub.add_parser("tokenize", help="print the token ids of a text")
    s.add_argument("model", metavar="MODEL")
    s.add_argument("text")
    s.add_argument("--json", action="store_true")

    from flashlm import cli_run  # a broken install is an ImportError, not missing commands

    cli_run.add_parsers(sub, COMMANDS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args) or 0
    except FlashlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
