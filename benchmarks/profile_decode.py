"""Run fastattn's decode in a loop long enough for a sampling profiler.

    mkfifo /tmp/perf.ctl
    perf record -e cpu-clock -F 4000 --control fifo:/tmp/perf.ctl --delay=-1 \\
        -o perf.data -- python benchmarks/profile_decode.py --perf-ctl /tmp/perf.ctl
    perf report -i perf.data --no-children --sort dso,symbol

With --perf-ctl the script turns perf's sampling on just before the timed
loop and off after it, so loading and the prompt stay out of the profile.

Prefills --prompt-tokens tokens of the benchmark prompt, then decodes
--tokens tokens greedily (restarting from the prompt whenever the state is
full); prints the decode rate so the profiled run can be checked against an
unprofiled one.  --phase prefill repeats the prompt forward instead.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256, help="decode steps to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--f32", action="store_true", help="float32 copy of the weights")
    ap.add_argument("--activations", choices=["f32", "q8"], default="f32",
                    help="the engine's activation mode (q8: 8-bit, integer dots)")
    ap.add_argument("--kv-cache", choices=["f32", "f16"], default="f32",
                    help="the KV cache's type (f16: half the bytes, not exact)")
    ap.add_argument("--perf-ctl", help="perf's --control fifo: sample only the timed loop")
    args = ap.parse_args(argv)

    from compare import build_prompt, resolve_model
    from peers import _fastattn_weights

    from fastattn.loaders import load_model_files
    from fastattn.model import Transformer
    from fastattn.tokenizer import Tokenizer

    loaded = load_model_files(resolve_model(args.model))
    ids = build_prompt(Tokenizer.from_loaded(loaded.tokenizer), args.prompt_tokens)
    options = {"activations": args.activations, "kv_cache": args.kv_cache}
    model = Transformer(loaded.config, _fastattn_weights(loaded, args.f32),
                        n_threads=args.threads, **options)
    n_gen = 128
    state = model.new_state(len(ids) + n_gen)

    def perf(command):
        if args.perf_ctl:
            with open(args.perf_ctl, "w") as f:
                f.write(command + "\n")

    if args.phase == "prefill":
        perf("enable")
        t = time.perf_counter()
        for _ in range(args.tokens):
            state.reset()
            model.prefill(state, ids)
        dt = time.perf_counter() - t
        perf("disable")
        print(f"prefill {len(ids)} tokens x {args.tokens}: "
              f"{len(ids) * args.tokens / dt:.1f} tok/s")
        return 0

    token = int(np.argmax(model.prefill(state, ids)))
    done, spent = 0, 0.0
    perf("enable")
    while done < args.tokens:
        if state.n_past == state.n_ctx:
            state.rewind(len(ids))
        t = time.perf_counter()
        token = int(np.argmax(model.decode(state, token)))
        spent += time.perf_counter() - t
        done += 1
    perf("disable")
    print(f"decode {done} tokens after a {len(ids)}-token prompt: {done / spent:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
