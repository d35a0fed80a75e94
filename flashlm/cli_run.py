"""Generation commands of the CLI: run, chat, perplexity, bench, plan, serve."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flashlm.errors import InputError
from flashlm.runtime.kvcache import DEFAULT_KV


def _human(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _add_model_opts(s: argparse.ArgumentParser, ctx: int | None = None) -> None:
    s.add_argument("model", metavar="MODEL", help="known name, store dir, .gguf file or HF dir")
    s.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    s.add_argument("--ctx", type=int, default=ctx,
                   help=f"context length per sequence (default {ctx})" if ctx else
                   "context length per sequence (default 4096, or the model's if shorter; lowered to fit --ram)")
    s.add_argument("--ram", default=None, metavar="SIZE|N%|auto",
                   help="RAM budget of the whole process, e.g. 560M, 4G, 60%% (default auto: what is available); "
                        "a model that does not fit streams its layers from disk")
    s.add_argument("--backend", choices=["auto", "kernels", "numpy"], default="auto",
                   help="auto/kernels: the Numba kernels (default); numpy: the plain-numpy reference (float32 "
                        "copies of every weight, 4-8x the memory)")
    s.add_argument("--kv", default=DEFAULT_KV, metavar="f16|f32",
                   help=f"the KV cache's element type: f16 (half the memory) or f32 (default {DEFAULT_KV})")
    s.add_argument("--exact", action="store_true",
                   help="float32 activations in every product (the reference path); default: int8 activations "
                        "for the formats that have integer kernels (faster; perplexity within a few tenths of "
                        "a percent)")


def _add_sampling_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("-n", "--max-tokens", type=int, default=None, help="tokens to generate (default: until EOS or --ctx)")
    s.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=40)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--min-p", type=float, default=0.05)
    s.add_argument("--repeat-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--repeat-last-n", type=int, default=64)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--system", default=None, help="system message")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                max_tokens=args.max_tokens, stop=args.stop)


def _add_offload_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--io", choices=["direct", "buffered", "mmap"], default=None,
                   help="how streamed weights are read: direct (O_DIRECT, the default where the filesystem "
                        "allows it), buffered (page cache, dropped after each read) or mmap")


def _add_draft_opts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--draft", choices=["auto", "ngram", "none"], default="auto",
                   help="prompt-lookup drafts verified in one pass over the weights: ngram, none, or auto "
                        "(ngram when weights stream from disk); greedy output is the same either way")
    s.add_argument("--draft-max", type=int, default=8, metavar="K", help="most draft tokens per step (default 8)")


def _load(args: argparse.Namespace, *, batch: int = 1):
    from flashlm.api import load

    llm = load(args.model, threads=args.threads, ram=args.ram, ctx=args.ctx, backend=args.backend, kv=args.kv,
               exact=args.exact, progress=sys.stderr.isatty(), batch=batch, draft=getattr(args, "draft", "none"),
               draft_max=getattr(args, "draft_max", 8), read_mode=getattr(args, "io", None),
               stream=getattr(args, "stream", False), readers=getattr(args, "readers", 2))
    if llm.streams and not getattr(args, "quiet_plan", False):
        print(f"flashlm: {llm.plan.summary()}; {llm.threads} compute thread{'s' * (llm.threads > 1)}"
              + (" (the disk sets the pace; --threads sets it)" if llm.threads == 1 and args.threads is None else ""),
              file=sys.stderr)
    return llm


def _stats_line(stats, offload: dict | None = None) -> str:
    line = (f"prompt {stats.prompt_tokens} tok, {stats.prefill_tok_s:.1f} tok/s | "
            f"generated {stats.generated_tokens} tok, {stats.decode_tok_s:.1f} tok/s | "
            f"ttft {stats.ttft_s:.2f} s | peak RSS {_human(stats.peak_rss)}")
    if stats.drafted:
        line += f" | {stats.tokens_per_step:.2f} tok/step, drafts {stats.accepted}/{stats.drafted} accepted"
    if offload:
        line += (f" | read {offload['bytes_read'] / 1e9:.2f} GB at {offload['read_GB_s']:.2f} GB/s, "
                 f"{offload['streamed_bytes_per_token'] / 2**20:.0f} MiB/token, I/O wait {offload['io_wait_s']:.1f} s, "
                 f"resident {_human(offload['resident_bytes'])}")
    return line


class StatusLine:
    """One line on stderr, rewritten in place while a streaming run generates (only on a
    terminal, and only when the answer does not go to the same terminal)."""

    def __init__(self, llm, enabled: bool) -> None:
        self.llm, self.enabled, self._last, self._shown = llm, enabled, 0.0, False
        self._t0 = time.perf_counter()
        self._tokens = 0

    def tick(self, new_tokens: int = 0) -> None:
        self._tokens += new_tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.25:
            return
        self._last = now
        w = self.llm.weights
        nbytes, read_s, _ = w.reads()
        dt = now - self._t0
        msg = (f"{self._tokens} tok, {self._tokens / dt:.2f} tok/s | read {nbytes / read_s / 1e9 if read_s else 0:.2f} GB/s | "
               f"resident {_human(w.plan.resident_bytes)}, streamed {_human(w.plan.streamed_bytes_per_token)}/step")
        for n in w.notices[len(getattr(self, "_seen", [])):]:
            msg += f" | {n}"
        self._seen = list(w.notices)
        sys.stderr.write("\r\x1b[2K" + msg)
        sys.stderr.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def _read_messages(path: str) -> list[dict]:
    from flashlm.runtime.chat_template import validate_messages

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"--messages {p}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise InputError(f"--messages {p}: not valid JSON ({e})") from None
    try:
        return validate_messages(data)
    except InputError as e:
        raise InputError(f"--messages {p}: {e}") from None


# ---- run ----


def _read_text(path: str | Path, what: str = "") -> str:
    """A UTF-8 text file, or an InputError saying why not."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{what}{p}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{what}{p}: not UTF-8 text") from None


def _read_prompts(path: str) -> list[Any]:
    """--prompts FILE: a JSON list (of strings or of message lists), else one prompt per line."""
    from flashlm.runtime.chat_template import validate_messages

    p = Path(path)
    text = _read_text(p, "--prompts ")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise InputError(f"--prompts {p}: looks like JSON but is not valid ({e})") from None
        out = []
        for i, item in enumerate(data):
            if isinstance(item, str) and item.strip():
                out.append(item)
            elif isinstance(item, list):
                try:
                    out.append(validate_messages(item))
                except InputError as e:
                    raise InputError(f"--prompts {p}: item {i}: {e}") from None
            else:
                raise InputError(f"--prompts {p}: item {i} is neither a non-empty string nor a list of messages")
    else:
        out = [line for line in text.splitlines() if line.strip()]
    if not out:
        raise InputError(f"--prompts {p}: no prompts in the file")
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from flashlm.runtime.sampler import SamplingParams

    sampling = _sampling(args)
    SamplingParams(**sampling)  # validate before loading anything
    given = [x for x in ("prompt", "messages", "prompts") if getattr(args, x) is not None]
    if len(given) > 1:
        raise InputError("give one of PROMPT, --messages or --prompts")
    prompts: list[Any]
    if args.prompts:
        prompts = _read_prompts(args.prompts)
    elif args.messages:
        prompts = [_read_messages(args.messages)]
    elif args.prompt is not None:
        prompts = [args.prompt]
    elif not sys.stdin.isatty():
        prompts = [sys.stdin.read()]
    else:
        return cmd_chat(args)
    if any(isinstance(p, str) and not p.strip() for p in prompts):
        raise InputError("the prompt is empty: give some text")
    if args.raw and args.system:
        raise InputError("--system has no effect with --raw (no chat template is applied): drop one of them")
    llm = _load(args, batch=len(prompts))
    batch = args.prompts is not None
    try:
        ids = [llm.prompt_ids(p, raw=args.raw, system=args.system) for p in prompts]
        params = SamplingParams(**sampling)
        texts, tokens = [[] for _ in ids], [[] for _ in ids]
        live_text = not args.json and not batch
        status = StatusLine(llm, llm.streams and sys.stderr.isatty() and not (live_text and sys.stdout.isatty()))
        try:
            for ev in llm.events(ids, params):
                if ev.token is not None and ev.token not in llm.tokenizer.stop_token_ids:
                    tokens[ev.seq].append(ev.token)
                texts[ev.seq].append(ev.text)
                if live_text and ev.text:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                status.tick(ev.token is not None)
        finally:
            status.close()
        stats = llm.stats_dict()
        if args.json:
            answers = [{"text": "".join(t), "tokens": k, "prompt_tokens": len(i)} for t, k, i in zip(texts, tokens, ids)]
            out = {"answers": answers, "stats": stats} if batch else {**answers[0], "stats": stats}
            print(json.dumps(out, ensure_ascii=False))
        else:
            if batch:
                for j, t in enumerate(texts):
                    sys.stdout.write(f"--- [{j + 1}/{len(texts)}] ---\n{''.join(t)}\n")
            else:
                sys.stdout.write("\n")
            sys.stdout.flush()
            for n in stats.get("offload", {}).get("notices", []):
                print(f"flashlm: {n}", file=sys.stderr)
            print(_stats_line(llm.stats, stats.get("offload")), file=sys.stderr)
    finally:
        llm.close()
    return 0


# ---- chat ----


def cmd_chat(args: argparse.Namespace) -> int:
    from flashlm.runtime.sampler import SamplingParams

    params = SamplingParams(**_sampling(args))
    llm = _load(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"flashlm chat: {args.model}. /reset clears the history, /exit quits, Ctrl-C stops an answer.",
              file=sys.stderr)
    try:
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                print("", file=sys.stderr)
                break
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/exit", "/quit", "/bye"):
                break
            if cmd == "/reset":
                history = history[:1] if args.system else []
                print("(history cleared)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            ids = llm.prompt_ids(history)
            answer = []
            gen = llm.engine.generate([ids], params)
            try:
                for ev in gen:
                    answer.append(ev.text)
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
            except KeyboardInterrupt:
                gen.close()
                print("\n(stopped)", file=sys.stderr)
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": "".join(answer)})
    finally:
        llm.close()
    return 0


# ---- perplexity ----


def cmd_perplexity(args: argparse.Namespace) -> int:
    from flashlm.runtime.perplexity import perplexity

    if args.chunks is not None and args.chunks < 1:
        raise InputError(f"--chunks {args.chunks} is invalid: use 1 or more")
    text = _read_text(args.file)
    llm = _load(args)
    try:
        ids = llm.tokenizer.encode(text, add_special=False, parse_special=False)
        t0 = time.perf_counter()

        def report(c: int, ppl: float) -> None:
            if not args.json:
                print(f"[{c + 1}] {ppl:.4f}", file=sys.stderr, flush=True)

        res = perplexity(llm.model, ids, ctx=args.ctx, chunks=args.chunks, on_chunk=report, kv=llm.kv)
        dt = time.perf_counter() - t0
        if args.json:
            print(json.dumps({**res.as_dict(), "seconds": round(dt, 3)}))
        else:
            print(f"perplexity {res.ppl:.4f} over {res.scored_tokens} tokens ({res.chunks} chunks of {res.ctx}), "
                  f"{res.chunks * res.ctx / dt:.1f} tok/s")
    finally:
        llm.close()
    return 0


# ---- bench ----


def bench_model(llm, *, prompt_tokens: int, gen_tokens: int, repeats: int = 1, warmup: bool = True) -> dict[str, Any]:
    """Prefill and decode speed of a loaded model (greedy, EOS ignored), best of ``repeats``.

    The prompt goes in the plan's prefill steps. When weights stream, the figures of the
    reads during decode come with it: bytes per token, read GB/s, I/O wait."""
    from flashlm.runtime.engine import _peak_rss

    model, cfg = llm.model, llm.config
    rng = np.random.default_rng(0)
    ids = rng.integers(100, min(cfg.vocab_size, 30000), prompt_tokens)
    if prompt_tokens + gen_tokens + 1 > llm.engine.ctx:
        raise InputError(f"-p {prompt_tokens} + -n {gen_tokens} does not fit --ctx {llm.engine.ctx}")
    step = llm.engine.prefill_rows
    cache = model.make_cache(prompt_tokens + gen_tokens + 1, kv=llm.kv)

    def prefill() -> np.ndarray:
        for a in range(0, prompt_tokens, step):
            logits = model.forward(ids[a:a + step], None, cache)
        return logits

    if warmup:  # compile the kernels of both paths, map or read weights
        prefill()
        for _ in range(2):
            model.forward(ids[:1], None, cache)
    best_pf, best_dec, reads = float("inf"), float("inf"), None
    for _ in range(repeats):
        cache.reset()
        t0 = time.perf_counter()
        logits = prefill()
        best_pf = min(best_pf, time.perf_counter() - t0)
        tok = int(np.argmax(logits))
        r0 = llm.weights.reads() if llm.streams else None
        e0 = _expert_counts(llm)
        ecache = getattr(llm.weights, "experts_cache", None) if llm.streams else None
        if ecache is not None:
            ecache.log = []  # the experts this round reads, replayed below for the disk's ceiling
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            tok = int(np.argmax(model.forward(np.array([tok]), None, cache)))
        dt = time.perf_counter() - t0
        if dt < best_dec:
            best_dec = dt
            if llm.streams:
                reads = tuple(b - a for a, b in zip(r0, llm.weights.reads()))
                experts = tuple(b - a for a, b in zip(e0, _expert_counts(llm)))
                expert_log = ecache.log if ecache is not None else []
    if ecache is not None:
        ecache.log = None
    from flashlm.offload.budget import Layout

    store = llm.store
    lay = Layout.of(store)  # a token reads every dense layer, the head, and top_k experts per MoE layer
    per_token = sum(lay.layer_bytes) + lay.head_bytes + len(lay.moe_layers) * lay.top_k * lay.expert_bytes
    dec_tps = gen_tokens / best_dec
    out = {
        "model": str(store.path.name), "threads": llm.threads, "prompt_tokens": prompt_tokens,
        "prefill_tok_s": round(prompt_tokens / best_pf, 2), "gen_tokens": gen_tokens,
        "decode_tok_s": round(dec_tps, 2), "weight_bytes_per_token": per_token,
        "decode_weight_GB_s": round(per_token * dec_tps / 1e9, 2), "peak_rss_bytes": _peak_rss(),
        "streams": llm.streams, "prefill_rows": step, "kv": llm.kv,
        "exact": llm.exact,
    }
    if llm.streams:
        nbytes, read_s, wait_s = reads
        # The disk's ceiling: the same reads right after, with no compute. The plan's streamed
        # segments (the prefetcher's order and depth) and, for MoE, the experts this decode read
        # (as many in flight as the cache has slots); the limit is the time both take.
        io_ceiling = llm.weights.read_pass(max(1, min(gen_tokens, 4)))
        exp_bytes = experts[2] if ecache is not None else 0
        exp_ceiling = ecache.read_pass(expert_log) if exp_bytes else 0.0
        # what is not experts goes at the plan's speed (at the experts' when every dense layer is resident)
        rest_bw = io_ceiling or exp_ceiling
        io_s = (exp_bytes / exp_ceiling if exp_bytes else 0.0) + ((nbytes - exp_bytes) / rest_bw if rest_bw else 0.0)
        if exp_bytes:
            out.update(expert_io_ceiling_GB_s=round(exp_ceiling / 1e9, 3))
        out.update(io_ceiling_GB_s=round(io_ceiling / 1e9, 3),
                   io_limit_tok_s=round(gen_tokens / io_s, 3) if io_s else None)
        out.update(streamed_bytes_per_token=int(nbytes / gen_tokens), decode_read_GB_s=round(nbytes / read_s / 1e9, 3)
                   if read_s else 0.0, decode_io_wait_s=round(wait_s, 3), decode_s=round(best_dec, 3),
                   read_mode=llm.weights.mode, plan=llm.plan.as_dict())
        if experts[0]:
            out.update(expert_hit_rate=round(experts[1] / experts[0], 4),
                       expert_bytes_per_token=int(experts[2] / gen_tokens))
    return out


def _expert_counts(llm) -> tuple[int, int, int]:
    """(experts asked for, hits, bytes read) of a streaming run's expert cache so far; zeros without one."""
    cache = getattr(llm.weights, "experts_cache", None) if llm.streams else None
    if cache is None:
        return 0, 0, 0
    st = cache.stats
    return st.requests, st.hits, st.bytes_read


def cmd_bench(args: argparse.Namespace) -> int:
    for flag, v in (("-p", args.prompt_tokens), ("-n", args.gen_tokens), ("-r", args.repeats), ("--readers", args.readers)):
        if v < 1:
            raise InputError(f"{flag} {v} is invalid: use 1 or more")
    if args.ctx is not None and args.prompt_tokens + args.gen_tokens + 1 > args.ctx:
        raise InputError(f"-p {args.prompt_tokens} + -n {args.gen_tokens} does not fit --ctx {args.ctx}: "
                         "raise --ctx or lower -p / -n")
    llm = _load(args)
    try:
        r = bench_model(llm, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens, repeats=args.repeats)
    finally:
        llm.close()
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']}  threads {r['threads']}, kv {r['kv']}, {'exact f32' if r['exact'] else 'int8'} activations")
        print(f"  prefill  {r['prompt_tokens']} tokens: {r['prefill_tok_s']:.1f} tok/s")
        print(f"  decode   {r['gen_tokens']} tokens: {r['decode_tok_s']:.1f} tok/s, "
              f"{r['decode_weight_GB_s']:.2f} GB/s of weights ({r['weight_bytes_per_token'] / 2**20:.0f} MiB per token)")
        if r["streams"]:
            print(f"  streamed {r['streamed_bytes_per_token'] / 2**20:.0f} MiB per token at {r['decode_read_GB_s']:.2f} GB/s "
                  f"({r['read_mode']} reads), I/O wait {r['decode_io_wait_s']:.2f} of {r['decode_s']:.2f} s")
        print(f"  peak RSS {_human(r['peak_rss_bytes'])}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from flashlm.offload.io import read_speed

    if args.batch < 1:
        raise InputError(f"--batch {args.batch} is invalid: use 1 or more")
    args.quiet_plan = True
    llm = _load(args, batch=args.batch)
    try:
        plan, store = llm.plan, llm.store
        if plan.streams:  # the plan's own reads, through its prefetcher, with no compute
            mode, speed = llm.weights.mode, llm.weights.read_pass(1)
        else:
            from flashlm.offload.io import default_mode

            mode = args.io or default_mode()
            speed = read_speed([store.path / f"layer_{i:03d}.bin" for i in range(store.n_layers)], mode,
                               limit=256 << 20)
        tok_s = plan.expected_tok_s(speed)
    finally:
        llm.close()
    if args.json:
        print(json.dumps({**plan.as_dict(), "read_mode": mode, "read_bytes_per_s": int(speed),
                          "expected_decode_tok_s": tok_s and round(tok_s, 3)}))
        return 0
    mb = _human
    print(f"{args.model}  ({store.path})")
    print(f"  budget            {mb(plan.budget)}  (process baseline {mb(plan.baseline)}, KV cache {mb(plan.kv_bytes)} "
          f"{plan.kv} for ctx {plan.ctx} x batch {plan.batch}, activations {mb(plan.act_bytes)})")
    print(f"  model             {mb(plan.store_bytes)} in {store.n_layers} layers")
    if not plan.streams:
        print("  plan              everything in RAM (memory-mapped store), nothing streams")
    else:
        print(f"  resident          {mb(plan.resident_bytes)}: {len(plan.resident_layers)} of {plan.n_layers} layers"
              f"{' ' + str(list(plan.resident_layers)) if plan.resident_layers else ''}"
              f"{', the output head' if plan.head_resident else ''}, norms and biases")
        print(f"  streamed          {mb(plan.streamed_bytes_per_token)} per forward step "
              f"({len(plan.streamed_layers)} layers{'' if plan.head_resident else ' and the head in row blocks'})")
        print(f"  window            {plan.n_slots} buffers of {mb(plan.slot_bytes)}")
        if plan.expert_slots:
            print(f"  expert cache      {plan.expert_slots} experts of {plan.expert_slot_bytes / 2**20:.1f} MiB "
                  f"({mb(plan.expert_slots * plan.expert_slot_bytes)}); expected expert reads "
                  f"{mb(plan.expert_read_per_token)} per token (routing spread evenly)")
        print(f"  prefill           steps of {plan.prefill_rows} tokens")
    print(f"  disk              {speed / 1e9:.2f} GB/s ({mode} reads, measured now: "
          + ("one pass over the streamed weights)" if plan.streams else "the layer files)"))
    if tok_s:
        print(f"  expected decode   <= {tok_s:.2f} tok/s (disk-bound: read speed / streamed bytes per step); "
              "prompt-lookup drafts and batches yield several tokens per step")
    for n in plan.notes:
        print(f"  note              {n}")
    return 0


# ---- serve ----


def _model_id(model: str) -> str:
    from flashlm.models.registry import catalog

    return model if model in catalog() else Path(model).expanduser().name.removesuffix(".gguf") or model


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from flashlm.server.app import MAX_BODY, create_app, listen, serve
    except ImportError as e:
        raise InputError(f"flashlm serve needs the server packages ({e}): pip install 'flashlm[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port} is invalid: use 0 to 65535 (0 = any free port)")
    if args.max_batch < 1:
        raise InputError(f"--max-batch {args.max_batch} is invalid: use 1 or more")
    if args.max_queue < 0:
        raise InputError(f"--max-queue {args.max_queue} is invalid: use 0 or more")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is empty: give a key, or leave the option out to serve without one")
    max_body = MAX_BODY if args.max_body is None else args.max_body
    if max_body < 1024:
        raise InputError(f"--max-body {max_body} is invalid: use at least 1024 bytes")
    model_id = args.name or _model_id(args.model)
    sock = listen(args.host, args.port)  # a busy port fails before a model is loaded
    host, port = sock.getsockname()[:2]
    try:
        llm = _load(args, batch=args.max_batch)
        try:
            app = create_app(llm, model_id=model_id, api_key=args.api_key, max_batch=args.max_batch,
                             max_queue=args.max_queue, max_body=max_body)
            where = f"[{host}]" if ":" in host else host
            loopback = host in ("127.0.0.1", "::1") or host.startswith("127.")
            if not loopback and not args.api_key:
                print(f"flashlm serve: warning: listening on {host} without --api-key: anyone who can reach "
                      "this machine can use the model", file=sys.stderr)

            def ready() -> None:
                print(f"flashlm serve: {model_id} on http://{where}:{port}/v1 (max batch {args.max_batch}, ctx "
                      f"{llm.engine.ctx}{', weights stream from disk' if llm.streams else ''}); "
                      "Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)

            serve(app, sock, log_level=args.log_level, on_ready=ready)
        finally:
            llm.close()
    finally:
        sock.close()
    print("flashlm serve: stopped", file=sys.stderr)
    return 0


def add_parsers(sub, commands: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    s = sub.add_parser("run", help="generate a reply to PROMPT (chat if none)")
    _add_model_opts(s)
    _add_offload_opts(s)
    _add_draft_opts(s)
    s.add_argument("prompt", nargs="?", metavar="PROMPT")
    s.add_argument("--messages", metavar="FILE.json", help="a JSON list of {role, content} messages")
    s.add_argument("--prompts", metavar="FILE",
                   help="several prompts, answered together as one batch: one per line, or a JSON list of "
                        "strings or of message lists")
    s.add_argument("--raw", action="store_true", help="do not apply the chat template")
    s.add_argument("--json", action="store_true", help="print one JSON object {text, tokens, prompt_tokens, stats}")
    _add_sampling_opts(s)

    s = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _add_model_opts(s)
    _add_offload_opts(s)
    _add_draft_opts(s)
    _add_sampling_opts(s)

    s = sub.add_parser("perplexity", help="perplexity of a text file")
    _add_model_opts(s, ctx=256)
    s.add_argument("file", metavar="FILE")
    s.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("plan", help="where the weights of MODEL would live under --ram, and the disk's speed")
    _add_model_opts(s)
    _add_offload_opts(s)
    s.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("bench", help="prefill and decode speed")
    _add_model_opts(s)
    _add_offload_opts(s)
    s.add_argument("-p", "--prompt-tokens", type=int, default=512)
    s.add_argument("-n", "--gen-tokens", type=int, default=64)
    s.add_argument("-r", "--repeats", type=int, default=1)
    s.add_argument("--stream", action="store_true", help="stream the weights even if they fit (benchmarks)")
    s.add_argument("--readers", type=int, default=2, help="reader threads for streamed weights (default 2)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat/completions, completions, models)")
    _add_model_opts(s)
    _add_offload_opts(s)
    _add_draft_opts(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    s.add_argument("--api-key", default=os.environ.get("FLASHLM_API_KEY") or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $FLASHLM_API_KEY)")
    s.add_argument("--max-batch", type=int, default=4, metavar="N",
                   help="requests decoded together (default 4); the RAM plan reserves N KV caches of --ctx")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a place in the batch (default 64); more are refused with 429")
    s.add_argument("--max-body", type=int, default=None, metavar="BYTES", help="largest request body (default 4 MiB)")
    s.add_argument("--name", default=None, help="the model's id in the API (default: MODEL's name)")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help=argparse.SUPPRESS)

    commands.update(run=cmd_run, chat=cmd_chat, perplexity=cmd_perplexity, bench=cmd_bench, plan=cmd_plan,
                    serve=cmd_serve)
