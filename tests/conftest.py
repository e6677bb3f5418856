"""Test setup: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax initialises its backends, so this runs at
collection time, before any test module imports jax.
"""

import os
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

# Most of a tiny-model test is compilation; cache it across test processes.
jax.config.update(
  'jax_compilation_cache_dir',
  os.environ.get(
    'VMOE_JSD_TEST_CACHE',
    os.path.join(tempfile.gettempdir(), 'vmoe_jsd_jax_cache'),
  ),
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

# Fixtures that ship with the tests (see tests/data/README.md): vmoe_parity/
# and vmoe_cases/, made with google-research/vmoe's own code.
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
