"""benchmarks/compare.py's interleaved mode keeps each system loaded in a child
(peers.py --serve) and asks it for one run at a time.  These tests drive that
protocol end to end with the numpy reference peer on a tiny model: pure
Python, so they need no compiled build of the checkout."""
import json
import os
import subprocess
import sys

import numpy as np

from fastattn import reference
from fastattn.loaders import load_model_files
from tinyllama_gguf import write_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child: compare.py puts the checkout first on sys.path, which the
# test process itself must not do.
DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import compare
spec = json.loads(sys.argv[2])
logs = []
w = compare.Worker(spec.pop("peer"), spec, 1, 60, logs.append)
out = {"ready": w.ready}
if "error" not in w.ready:
    out["runs"] = [w.run(0), w.run(1), w.run(0)]
    out["cpu_s"] = w.cpu_s()
    out["final"] = w.finish()
    out["after_finish"] = w.run(0)
print(json.dumps(out))
"""


def drive(spec):
    done = subprocess.run([sys.executable, "-c", DRIVER, os.path.join(ROOT, "benchmarks"),
                           json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_worker_runs_one_workload_per_request(tmp_path):
    path = str(write_tiny_llama(tmp_path / "tiny.gguf"))
    prompts = {"a": [5, 70, 80, 90], "b": [3, 1, 4, 1, 5, 9, 2, 6]}
    spec = {"peer": "numpy", "model": path, "threads": 1, "prompts": prompts,
            "workloads": [{"prompt": "a", "n_gen": 5}, {"prompt": "b", "n_gen": 3}]}
    got = drive(spec)
    assert got["ready"]["ready"] is True and got["ready"]["load_s"] > 0

    loaded = load_model_files(path)
    want_a = reference.generate_greedy(loaded.config, loaded.weights, prompts["a"], 5)
    want_b = reference.generate_greedy(loaded.config, loaded.weights, prompts["b"], 3)
    runs = got["runs"]
    assert [r["tokens"] for r in runs] == [want_a, want_b, want_a]
    for r in runs:
        assert r["decode_s"] > 0 and r["ttft_s"] == 0.0   # numpy times the whole call
    # the child's CPU time only grows, and /proc agrees with what it reports
    cpu = [r["cpu_s"] for r in runs]
    assert cpu == sorted(cpu) and cpu[-1] > 0
    assert got["cpu_s"] >= cpu[-1] - 0.05

    final = got["final"]
    assert final["peer"] == "numpy" and final["peak_rss_mib"] > final["rss_start_mib"] > 0
    assert final["info"]["weights"] == "float32 (dequantized)"
    assert "_keepalive" not in final["info"]
    assert "error" in got["after_finish"]                # the process has ended


def test_worker_that_cannot_load_reports_why(tmp_path):
    missing = str(tmp_path / "no-such-model.gguf")
    spec = {"peer": "numpy", "model": missing, "threads": 1, "prompts": {"a": [1]},
            "workloads": [{"prompt": "a", "n_gen": 2}]}
    got = drive(spec)
    error = got["ready"]["error"]
    assert error.startswith("exit ") or error.startswith("no reply")
    assert "no-such-model.gguf" in error


def test_library_output_on_stdout_does_not_break_replies(tmp_path):
    """A peer library printing to stdout, from Python or straight to fd 1 as C
    code does, must not land in the reply stream: the child moves fd 1 to
    stderr and replies on a copy of it."""
    path = str(write_tiny_llama(tmp_path / "tiny.gguf"))
    # make the numpy peer chatty during its runs, at both levels
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import fastattn.reference as r\n"
        "quiet = r.generate_greedy\n"
        "def chatty(*a, **k):\n"
        "    print('chatter from python', flush=True)\n"
        "    os.write(1, b'chatter from fd 1\\n')\n"
        "    return quiet(*a, **k)\n"
        "r.generate_greedy = chatty\n")
    spec = {"peer": "numpy", "model": path, "threads": 1, "prompts": {"a": [7, 8]},
            "workloads": [{"prompt": "a", "n_gen": 2}]}
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"),
                           "--serve", _write(tmp_path / "spec.json", spec)],
                          input='{"workload": 0}\n{"workload": 0}\n{"quit": true}\n',
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert replies[0]["ready"] and replies[3]["peer"] == "numpy"
    assert replies[1]["tokens"] == replies[2]["tokens"] and len(replies[1]["tokens"]) == 2
    assert np.isfinite(replies[1]["decode_s"])
    assert done.stderr.count("chatter from python") == 2
    assert done.stderr.count("chatter from fd 1") == 2


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)
