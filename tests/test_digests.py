"""digests.py: algorithm-prefixed digests, the same on every host and every supported Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from initpipeline import digests
from initpipeline.exceptions import UnknownDigest
from tests.conftest import ROOT, missing_service
from tests.test_codehash import other_pythons

#: BLAKE3 and sha256 of b"initpipeline", as the reference implementations give them.
GOLDEN = {
    "blake3": "blake3:73ce5febb9a99739c1f6f5036cbe1c06f790521457fbae6171770835ae6b242f",
    "sha256": "sha256:3ca1815fbabbc2652da27e48e6b3110596c6be67d1cafad4e54922cf32f426c4",
}


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_a_file_digest_matches_the_golden_value(tmp_path: Path, algorithm: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"initpipeline")
    assert digests.of_file(path, algorithm) == (GOLDEN[algorithm], 12)


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_a_file_over_several_reads_hashes_as_its_bytes_do(tmp_path: Path, algorithm: str) -> None:
    data = os.urandom(2 * digests.CHUNK + 12345)
    (tmp_path / "big").write_bytes(data)
    hasher = digests.new(algorithm)
    hasher.update(data)
    assert digests.of_file(tmp_path / "big", algorithm) == (
        digests.of(hasher, algorithm),
        len(data),
    )


def test_names_keep_the_sha256_names_of_earlier_releases() -> None:
    hexdigest = "ab" * 32
    assert digests.name_part(f"sha256:{hexdigest}") == hexdigest
    assert digests.name_part(f"blake3:{hexdigest}") == f"blake3-{hexdigest}"
    assert digests.short(f"blake3:{hexdigest}") == "blake3:abababababab"


@pytest.mark.parametrize(
    ("digest", "message"),
    [
        ("md5:" + "0" * 32, "names a digest algorithm this release does not know"),
        ("0" * 64, "names a digest algorithm this release does not know"),
        ("sha256:../../etc/passwd", "is not a sha256 digest"),
        ("blake3:" + "A" * 64, "is not a blake3 digest"),
        ("blake3:" + "0" * 63, "is not a blake3 digest"),
    ],
)
def test_a_value_that_is_no_digest_this_release_knows_is_refused(digest: str, message: str) -> None:
    # Refused before it names a file (a key, a host record, a cached copy).
    with pytest.raises(UnknownDigest, match=message):
        digests.name_part(digest)


# -- the same digests on every supported Python ----------------------------------------------

#: The digests of the files named on its command line, by algorithm, as JSON.
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from initpipeline import digests
print(json.dumps({
    path: {a: digests.of_file(path, a)[0] for a in ("blake3", "sha256")}
    for path in sys.argv[2:]
}))
"""


def _blake3_pin() -> str:
    pins = (ROOT / "requirements.txt").read_text().splitlines()
    return next(line for line in pins if line.startswith("blake3=="))


def _with_blake3(python: str) -> dict[str, str]:
    """The environment under which ``python`` imports blake3: its own, or the pinned
    version installed for it (once) under var/."""
    if subprocess.run([python, "-c", "import blake3"], capture_output=True).returncode == 0:
        return dict(os.environ)
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = ROOT / "var" / f"python{version}-blake3"
    if not (target / "blake3").exists():
        installed = subprocess.run(
            [python, "-m", "pip", "install", "-q", "--target", str(target), _blake3_pin()],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if installed.returncode:
            missing_service(f"blake3 for {python}: {installed.stderr.strip()[-500:]}")
    return {**os.environ, "PYTHONPATH": str(target)}


@pytest.mark.slow
def test_digests_are_the_same_on_every_supported_python(tmp_path: Path) -> None:
    pythons = other_pythons()
    if not pythons:
        # As the fingerprints' test of the same (test_codehash.py).
        missing_service("no other Python 3.11-3.13 found through pyenv (pyenv install 3.12 3.13)")
    files = []
    for size in (0, 1, digests.CHUNK - 1, digests.CHUNK + 1, 3 * digests.CHUNK + 7):
        files.append(tmp_path / f"{size}.bin")
        files[-1].write_bytes(os.urandom(size))
    args = [str(ROOT), *map(str, files)]
    here = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    expected = json.loads(here.stdout)
    for python in pythons:
        there = subprocess.run(
            [python, "-c", PROBE, *args],
            env=_with_blake3(python),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert there.returncode == 0, f"{python}: {there.stderr}"
        assert json.loads(there.stdout) == expected, python
