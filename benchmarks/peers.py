"""One benchmarked system per process: the child side of benchmarks/compare.py.

    python benchmarks/peers.py SPEC.json OUT.json

SPEC names the system ("peer"), the GGUF file, the token ids to feed, the
thread count and the workloads; OUT receives the timings, token ids, load time
and peak RSS.  Each system runs in its own process so that its memory and its
thread pools cannot touch another's; compare.py sets OMP_NUM_THREADS (and the
BLAS equivalents) in the environment before starting it.

Every runner feeds token ids, never text, so tokenizing is not timed and all
systems do the same work.  Decoding is greedy (argmax) for a fixed number of
new tokens; end-of-sequence tokens do not stop it.  One run is timed as

    t0 .. first token    prompt forward + argmax       -> ttft
    first token .. end   n_gen - 1 one-token forwards  -> decode time

`python benchmarks/peers.py --serve SPEC.json` keeps the system loaded and runs
one workload per request line on stdin, a reply line each on stdout (what
compare.py --interleave drives).

`python benchmarks/peers.py --prepare GGUF CACHE_DIR` builds the float32 Hugging
Face folder and the CTranslate2 folders the torch and CTranslate2 peers read.
"""
import contextlib
import json
import os
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mib() -> float:
    """Largest resident set of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# ------------------------------------------------------------------ fastattn


def _fastattn_weights(loaded, f32: bool):
    """The file's weights, or every tensor dequantized to float32 storage
    (the "float32 class" model: same values, four bytes a weight)."""
    if not f32:
        return loaded.weights
    from fastattn.weights import F32, WeightTensor
    return {name: WeightTensor.from_float(w.to_float(), F32, name=name)
            for name, w in loaded.weights.items()}


def fastattn_runner(spec, f32=False, activations=None, kv_cache=None):
    """fastattn's Transformer driven directly: prefill the prompt, then one
    decode per token, argmax in numpy (what Model.generate does at
    temperature 0, minus the sampler and the detokenizer).  activations="q8"
    is the engine's opt-in mode that rounds activations to 8-bit blocks and
    uses integer dot products (llama.cpp's way; not exact); kv_cache="f16"
    its opt-in float16 KV cache (llama.cpp's default; not exact)."""
    sys.path.insert(0, REPO)
    import fastattn
    from fastattn import _kernels
    from fastattn.loaders import load_model_files
    from fastattn.model import Transformer

    loaded = load_model_files(spec["model"])
    options = {"activations": activations} if activations else {}
    if kv_cache:
        options["kv_cache"] = kv_cache
    model = Transformer(loaded.config, _fastattn_weights(loaded, f32),
                        n_threads=spec["threads"], **options)
    weights = "float32" if f32 else "file (Q4_1 blocks)"
    if activations:
        weights += f", {activations} activations"
    if kv_cache:
        weights += f", {kv_cache} KV cache"
    info = {"version": fastattn.__version__, "simd": _kernels.simd_name(),
            "weights": weights, "_keepalive": loaded}

    def generate(ids, n_gen):
        state = model.new_state(len(ids) + n_gen)
        t0 = time.perf_counter()
        token = int(np.argmax(model.prefill(state, ids)))
        t1 = time.perf_counter()
        out = [token]
        for _ in range(n_gen - 1):
            token = int(np.argmax(model.decode(state, token)))
            out.append(token)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    return info, generate


# ----------------------------------------------------------------- llama.cpp


@contextlib.contextmanager
def _llama_model_params(**fields):
    """Load llama.cpp models with these llama_model_params fields set:
    llama-cpp-python's Llama() takes no argument for some of them, and fills
    its params from llama_model_default_params(), so that is wrapped for the
    duration of the load."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        for name, value in fields.items():
            # a ctypes struct takes any attribute; one it lacks would be ignored
            if name not in {f[0] for f in type(p)._fields_}:
                raise RuntimeError(f"this llama-cpp-python has no model parameter "
                                   f"{name!r}; a newer one is needed on this CPU")
            setattr(p, name, value)
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def llamacpp_runner(spec, flash=False):
    """llama-cpp-python over the same GGUF file: Llama.eval on token ids and
    argmax of the last row of logits read straight from the context.  flash
    turns on llama.cpp's fused attention (off by default in llama-cpp-python;
    llama.cpp's own tools choose it automatically on CPUs).

    On a CPU with AMX, llama.cpp repacks the weights into its AMX buffer
    type, and its first product there crashed with SIGSEGV in
    ggml_backend_amx_mul_mat (llama-cpp-python 0.3.36, an Intel Xeon with
    AMX-INT8 under KVM; llama.cpp issue 20824 reports the same, machine
    dependent and not fixed).  There the model loads with llama.cpp's extra
    buffer types off (use_extra_bufts), which runs its AVX-512 kernels on the
    file's blocks instead, and the info says so."""
    import llama_cpp
    from llama_cpp import Llama

    n_need = max(w["n_prompt"] + w["n_gen"] for w in spec["workloads"])
    n_batch = max(512, max(w["n_prompt"] for w in spec["workloads"]))
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace")
    no_amx = "AMX_INT8 = 1" in system_info
    with _llama_model_params(**({"use_extra_bufts": False} if no_amx else {})):
        llm = Llama(model_path=spec["model"], n_ctx=n_need, n_batch=n_batch,
                    n_ubatch=n_batch, n_threads=spec["threads"],
                    n_threads_batch=spec["threads"], flash_attn=flash, logits_all=False,
                    verbose=False)
    n_vocab = llm.n_vocab()
    ctx = llm.ctx

    def last_argmax():
        row = llama_cpp.llama_get_logits_ith(ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))

    def generate(ids, n_gen):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = last_argmax()
        t1 = time.perf_counter()
        out = [token]
        for _ in range(n_gen - 1):
            llm.eval([token])
            token = last_argmax()
            out.append(token)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    info = {"version": f"llama-cpp-python {llama_cpp.__version__}",
            "flash_attn": bool(flash), "system_info": system_info,
            "extra_buffer_types": not no_amx,
            "weights": "file (Q4_1 blocks)" + (", AMX repacking off" if no_amx else ""),
            "_keepalive": llm}
    return info, generate


# -------------------------------------------------------------- transformers


def transformers_runner(spec):
    """transformers' generate() on the float32 checkpoint converted from the
    GGUF (same weight values), greedy, min_new_tokens = max_new_tokens so
    that no end token stops it; a streamer notes when the first token lands."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
    model.eval()

    class Clock(BaseStreamer):
        """put() gets the prompt first, then each new token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(ids, n_gen):
        input_ids = torch.tensor([ids], dtype=torch.long)
        clock = Clock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            result = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=n_gen, min_new_tokens=n_gen,
                                    do_sample=False, streamer=clock,
                                    pad_token_id=model.config.eos_token_id)
            t2 = time.perf_counter()
        out = result[0, len(ids):].tolist()
        t1 = clock.times[1] if len(clock.times) > 1 else t2
        return t1 - t0, t2 - t1, out

    info = {"version": f"transformers {transformers.__version__}, "
                       f"torch {torch.__version__}",
            "weights": "float32 (dequantized from the GGUF)",
            "attn": getattr(model.config, "_attn_implementation", "?")}
    return info, generate


# --------------------------------------------------------------- ctranslate2


def ctranslate2_runner(spec, int8=False):
    """CTranslate2's Generator on the converted model; the prompt is forwarded
    at once (include_prompt_in_result=False), min_length = max_length keeps
    end tokens from stopping it, and the step callback times the first token."""
    import ctranslate2

    folder = spec["ct2_int8_dir"] if int8 else spec["ct2_dir"]
    generator = ctranslate2.Generator(folder, device="cpu",
                                      compute_type="int8" if int8 else "float32",
                                      intra_threads=spec["threads"], inter_threads=1)
    with open(os.path.join(folder, "vocabulary.json")) as f:
        vocab = json.load(f)                         # id -> token string

    def generate(ids, n_gen):
        tokens = [vocab[i] for i in ids]
        first = []

        def on_step(step):
            if not first:
                first.append(time.perf_counter())
            return False

        t0 = time.perf_counter()
        result = generator.generate_batch([tokens], max_length=n_gen, min_length=n_gen,
                                          include_prompt_in_result=False, beam_size=1,
                                          sampling_topk=1, callback=on_step)
        t2 = time.perf_counter()
        t1 = first[0] if first else t2
        return t1 - t0, t2 - t1, list(result[0].sequences_ids[0])

    info = {"version": ctranslate2.__version__,
            "weights": "int8 (CTranslate2 quantized)" if int8 else "float32",
            "compute_type": "int8" if int8 else "float32",
            "ct2_use_mkl": os.environ.get("CT2_USE_MKL", "(default)")}
    return info, generate


# --------------------------------------------------------------------- numpy


def numpy_runner(spec):
    """fastattn.reference.generate_greedy: plain numpy, the whole sequence
    recomputed for every new token (no KV cache).  Weights are dequantized
    once, before the clock starts.  It gives no separate first-token time, so
    the whole call counts as decode time."""
    sys.path.insert(0, REPO)
    from fastattn import reference
    from fastattn.loaders import load_model_files

    loaded = load_model_files(spec["model"])
    weights = reference.dequantize_weights(loaded.weights)

    def generate(ids, n_gen):
        t0 = time.perf_counter()
        out = reference.generate_greedy(loaded.config, weights, ids, n_gen)
        t2 = time.perf_counter()
        return 0.0, t2 - t0, out

    info = {"version": f"numpy {np.__version__}", "weights": "float32 (dequantized)",
            "_keepalive": loaded}
    return info, generate


RUNNERS = {
    "fastattn": lambda spec: fastattn_runner(spec),
    "fastattn-f32": lambda spec: fastattn_runner(spec, f32=True),
    "fastattn-q8": lambda spec: fastattn_runner(spec, activations="q8"),
    "fastattn-q8-kv16": lambda spec: fastattn_runner(spec, activations="q8",
                                                     kv_cache="f16"),
    "llama.cpp": llamacpp_runner,
    "llama.cpp-fa": lambda spec: llamacpp_runner(spec, flash=True),
    "transformers": transformers_runner,
    "ctranslate2": lambda spec: ctranslate2_runner(spec),
    "ctranslate2-int8": lambda spec: ctranslate2_runner(spec, int8=True),
    "numpy": numpy_runner,
}


def run_peer(spec) -> dict:
    """Load the peer, then for each workload one warm-up run (unless the
    workload says none) and `reps` timed runs."""
    rss_start = current_rss_mib()
    t = time.perf_counter()
    info, generate = RUNNERS[spec["peer"]](spec)
    load_s = time.perf_counter() - t
    keepalive = info.pop("_keepalive", None)  # noqa: F841  (mapped file the weights view)

    workloads = []
    for w in spec["workloads"]:
        ids = spec["prompts"][w["prompt"]]
        runs = []
        for rep in range(w["warmup"] + w["reps"]):
            ttft, decode_s, out = generate(ids, w["n_gen"])
            if rep >= w["warmup"]:
                runs.append({"ttft_s": ttft, "decode_s": decode_s, "tokens": out})
        workloads.append({**w, "runs": runs})
    return {"peer": spec["peer"], "info": info, "load_s": load_s,
            "rss_start_mib": rss_start, "peak_rss_mib": peak_rss_mib(),
            "workloads": workloads}


# ------------------------------------------------- memory bandwidth reader

READER_C = r"""
#include <stddef.h>
#include <stdint.h>

/* Sum n 64-bit words with nth OpenMP threads, each reading one contiguous
 * share; integer adds keep the loop bound by memory, not by add latency. */
uint64_t fa_bench_read(const uint64_t *x, size_t n, int nth)
{
    uint64_t total = 0;
    #pragma omp parallel for num_threads(nth) schedule(static) reduction(+:total)
    for (size_t i = 0; i < n; i++)
        total += x[i];
    return total;
}

/* Fill in parallel with the same schedule, so each thread's pages are its own. */
void fa_bench_fill(uint64_t *x, size_t n, int nth)
{
    #pragma omp parallel for num_threads(nth) schedule(static)
    for (size_t i = 0; i < n; i++)
        x[i] = i;
}
"""


def _compiled_reader(cache_dir):
    """ctypes handle on READER_C built with gcc -O3 -march=native -fopenmp, or
    None when there is no compiler."""
    import ctypes
    import hashlib
    import shutil
    import subprocess

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    key = hashlib.sha256(READER_C.encode()).hexdigest()[:12]
    lib = os.path.join(cache_dir, f"bwread-{key}.so")
    if not os.path.exists(lib):
        src = os.path.join(cache_dir, f"bwread-{key}.c")
        with open(src, "w") as f:
            f.write(READER_C)
        done = subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                               src, "-o", lib], capture_output=True, text=True)
        if done.returncode != 0:
            return None
    handle = ctypes.CDLL(lib)
    handle.fa_bench_read.restype = ctypes.c_uint64
    handle.fa_bench_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    handle.fa_bench_fill.restype = None
    handle.fa_bench_fill.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return handle


def measure_bandwidth(threads, gib=1.0, reps=5, cache_dir=None) -> dict:
    """Read-only memory bandwidth in GB/s (1e9 bytes/s): best of `reps` sums of
    a `gib` GiB array of 64-bit words, in `threads` threads."""
    n = int(gib * (1 << 30)) // 8
    reader = _compiled_reader(cache_dir) if cache_dir else None
    if reader is not None:
        x = np.empty(n, dtype=np.uint64)
        reader.fa_bench_fill(x.ctypes.data, n, threads)
        expect = n * (n - 1) // 2 % (1 << 64)

        def read():
            got = reader.fa_bench_read(x.ctypes.data, n, threads)
            assert got == expect, "bandwidth reader summed wrongly"
        method = f"C reader (gcc -O3 -march=native, OpenMP, {threads} threads)"
    else:
        from concurrent.futures import ThreadPoolExecutor
        x = np.arange(n, dtype=np.uint64)
        shares = np.array_split(x, threads)
        pool = ThreadPoolExecutor(threads)

        def read():
            list(pool.map(np.sum, shares))
        method = f"numpy sum over {threads} thread shares (no compiler found)"

    read()                                             # touch every page once more
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t)
    return {"gb_s": x.nbytes / best / 1e9, "bytes": int(x.nbytes), "best_s": best,
            "method": method, "threads": threads}


# ------------------------------------------------ converted model folders


def prepare_folders(gguf_path, out_dir, want_ct2=True):
    """Write the float32 Hugging Face folder (hf/) transformers reads and the
    CTranslate2 folders (ct2-float32/, ct2-int8/) from the GGUF file.

    transformers dequantizes the GGUF tensors with the gguf package (the same
    values fastattn computes with) and undoes llama.cpp's q/k row permutation.
    The model it loads is marked quantized and refuses save_pretrained, so its
    weights are copied into a plain model built from the same config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    hf_dir = os.path.join(out_dir, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                      dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(loaded)(config).to(torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tmp = hf_dir + ".tmp"
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, hf_dir)
    if want_ct2:
        from ctranslate2.converters import TransformersConverter
        for quant in ("float32", "int8"):
            ct2_dir = os.path.join(out_dir, f"ct2-{quant}")
            if not os.path.exists(os.path.join(ct2_dir, "model.bin")):
                TransformersConverter(hf_dir).convert(ct2_dir + ".tmp", quantization=quant,
                                                      force=True)
                os.replace(ct2_dir + ".tmp", ct2_dir)


def serve_peer(spec, requests, replies) -> None:
    """The same peer as run_peer, kept loaded and driven one run at a time
    (compare.py --interleave): after loading it replies {"ready": ...}; then
    each request line {"workload": i} gets one untimed-by-the-parent run of
    workload i as a reply line, and {"quit": true} gets the load time and
    memory figures.  Each reply carries this process's CPU seconds so far,
    so the parent can tell how much CPU the idle peers took meanwhile."""
    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    def cpu_s():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    rss_start = current_rss_mib()
    t = time.perf_counter()
    info, generate = RUNNERS[spec["peer"]](spec)
    load_s = time.perf_counter() - t
    keepalive = info.pop("_keepalive", None)  # noqa: F841
    reply({"ready": True, "load_s": load_s, "cpu_s": cpu_s()})
    for line in requests:
        msg = json.loads(line)
        if msg.get("quit"):
            reply({"peer": spec["peer"], "info": info, "load_s": load_s,
                   "rss_start_mib": rss_start, "peak_rss_mib": peak_rss_mib(),
                   "cpu_s": cpu_s()})
            return
        w = spec["workloads"][msg["workload"]]
        ttft, decode_s, out = generate(spec["prompts"][w["prompt"]], w["n_gen"])
        reply({"ttft_s": ttft, "decode_s": decode_s, "tokens": out, "cpu_s": cpu_s()})


def main(argv):
    if argv[:1] == ["--serve"]:
        with open(argv[1]) as f:
            spec = json.load(f)
        # replies go over a copy of stdout; what the peers' libraries print
        # (to fd 1, from C or Python) goes to stderr instead of into a reply
        replies = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        serve_peer(spec, sys.stdin, replies)
        return 0
    if argv[:1] == ["--prepare"]:
        prepare_folders(argv[1], argv[2], want_ct2=argv[3:4] != ["--no-ct2"])
        return 0
    if argv[:1] == ["--bandwidth"]:
        result = measure_bandwidth(int(argv[1]), cache_dir=argv[2])
        with open(argv[3], "w") as f:
            json.dump(result, f)
        return 0
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = run_peer(spec)
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
