"""What importing fastattn does to the process."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# libgomp prints its settings (OMP_WAIT_POLICY among them) on stderr
SHOW = ("import ctypes, os, fastattn, fastattn._engine;"
        "print(os.environ.get('OMP_WAIT_POLICY', 'unset'));"
        "ctypes.CDLL('libgomp.so.1').omp_display_env(0)")


def _after_import(env):
    done = subprocess.run([sys.executable, "-c", SHOW], env=env, capture_output=True,
                          text=True, check=True, cwd=REPO)
    policy = [line.split("=", 1)[1].strip().strip("'")
              for line in done.stderr.splitlines() if "OMP_WAIT_POLICY" in line]
    return done.stdout.strip(), policy


def test_openmp_threads_sleep_between_calls_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    seen, policy = _after_import(env)
    assert policy == ["PASSIVE"]
    assert seen == "unset"  # children (llama.cpp, say) still get the user's environment

    seen, policy = _after_import({**env, "OMP_WAIT_POLICY": "active"})
    assert policy == ["ACTIVE"] and seen == "active"
