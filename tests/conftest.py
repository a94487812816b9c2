"""Test-session settings."""

import os

# In-process and child `sslsim` runs of the tests keep no persistent compilation cache; the
# one test of the cache sets its own directory.
os.environ.setdefault("SSLSIM_CACHE_DIR", "none")
