"""What importing fastattn does to the process."""
import os
import subprocess
import sys


def _policy_after_import(env):
    code = "import os, fastattn; print(os.environ['OMP_WAIT_POLICY'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True, cwd=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))).stdout.strip()


def test_openmp_threads_sleep_between_calls_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy_after_import(env) == "PASSIVE"
    assert _policy_after_import({**env, "OMP_WAIT_POLICY": "active"}) == "active"
