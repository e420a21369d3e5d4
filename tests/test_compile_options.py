"""The training XLA flags: merged into XLA_FLAGS without overriding what the user set."""

import os
import subprocess
import sys

from longformer_jax.compile_options import TRAINING_XLA_FLAGS, training_xla_flags


def test_flags_are_added_once_and_user_settings_win():
    flag = TRAINING_XLA_FLAGS[0]
    name = flag.split("=")[0]
    assert training_xla_flags("") == flag
    assert training_xla_flags("--xla_foo=1") == f"--xla_foo=1 {flag}"
    assert training_xla_flags(training_xla_flags("")) == flag
    assert training_xla_flags(f"{name}=true") == f"{name}=true"


def test_use_training_xla_flags_sets_the_environment_of_a_fresh_process():
    code = (
        "import os; from longformer_jax.compile_options import use_training_xla_flags as u; "
        "u(); print(os.environ['XLA_FLAGS'])"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_foo=1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["--xla_foo=1", *TRAINING_XLA_FLAGS]
