"""initpipeline.broker: kombu's filesystem transport with no message read before it is whole.

Real processes: a sender process against a consumer polling without a pause, and a real
worker meeting a message it cannot decode.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection
from kombu.exceptions import ChannelError
from kombu.transport import resolve_transport

from initpipeline.broker import Channel, FilesystemTransport
from initpipeline.celery_settings import filesystem_broker
from initpipeline.models import PipelineRun
from tests.conftest import ROOT, Stack

MESSAGES = 2000


def options(folder: Path) -> dict[str, object]:
    return dict(filesystem_broker(folder)["CELERY_BROKER_TRANSPORT_OPTIONS"])


def test_the_settings_select_this_transport(tmp_path: Path) -> None:
    name = filesystem_broker(tmp_path)["CELERY_BROKER_TRANSPORT"]
    assert resolve_transport(name) is FilesystemTransport
    with Connection("filesystem://localhost/", transport=name) as conn:
        assert isinstance(conn.default_channel, Channel)


SENDER = textwrap.dedent(
    """
    import json, sys
    from kombu import Connection
    from initpipeline.broker import FilesystemTransport
    options = json.loads(sys.argv[1])
    with Connection("filesystem://localhost/", transport=FilesystemTransport,
                    transport_options=options) as conn:
        channel = conn.default_channel
        for i in range(int(sys.argv[2])):
            channel._put("q", {"i": i, "pad": "x" * 20000})
    """
)


def test_a_consumer_polling_without_a_pause_reads_every_message_whole(tmp_path: Path) -> None:
    # kombu's own channel creates the file, then writes it: a consumer this eager takes
    # hundreds of the 2,000 files empty (JSONDecodeError; kombu#1551).
    opts = options(tmp_path / "broker")
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, json.dumps(opts), str(MESSAGES)], cwd=ROOT
    )
    got: list[int] = []
    with Connection(
        "filesystem://localhost/", transport=FilesystemTransport, transport_options=opts
    ) as conn:
        channel = conn.default_channel
        while len(got) < MESSAGES:
            try:
                got.append(channel._get("q")["i"])
            except Empty:
                finished = sender.poll()
                if finished is not None and channel._size("q") == 0:
                    break  # Sent all it would: what is missing was lost.
    assert sender.wait(timeout=60) == 0
    # Every message once (kombu orders by the millisecond only).
    assert sorted(got) == list(range(MESSAGES))
    broker = tmp_path / "broker"
    assert list((broker / "processed").iterdir()) == []
    assert list((broker / "queue").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("stack", ["filesystem"], indirect=True)
def test_a_message_that_cannot_be_decoded_is_set_aside_and_the_worker_goes_on(
    stack: Stack,
) -> None:
    broker = Path(stack.env["INITPIPELINE_BROKER_DIR"])
    filesystem_broker(broker)  # its folders, as every process of the stack makes them
    queue = broker / "queue"
    # Sorted before any message kombu names (milliseconds first): taken first.
    (queue / "0_cut-short.celery.msg").write_bytes(b'{"body": "eyJ')
    stack.start_worker()
    result = stack.manage("start_init", "--wait", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr + stack.log()
    assert PipelineRun.objects.get().state == "succeeded"
    log = stack.log()
    assert "Unrecoverable error" not in log
    assert (
        "broker message 0_cut-short.celery.msg could not be decoded (13 bytes): kept as "
    ) in log
    assert (broker / "processed" / "0_cut-short.celery.msg.bad").read_bytes() == b'{"body": "eyJ'


def test_a_missing_processed_folder_is_made_not_mistaken_for_a_taken_message(
    tmp_path: Path,
) -> None:
    opts = {**options(tmp_path / "broker"), "processed_folder": str(tmp_path / "elsewhere")}
    with Connection(
        "filesystem://localhost/", transport=FilesystemTransport, transport_options=opts
    ) as conn:
        channel = conn.default_channel
        channel._put("q", {"i": 1})
        assert channel._get("q") == {"i": 1}
        with pytest.raises(Empty):
            channel._get("q")


def test_a_processed_folder_on_another_filesystem_is_named_in_the_error(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the temporary folder's")
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        opts = {**options(tmp_path / "broker"), "processed_folder": str(elsewhere)}
        with Connection(
            "filesystem://localhost/", transport=FilesystemTransport, transport_options=opts
        ) as conn:
            channel = conn.default_channel
            channel._put("q", {"i": 1})
            with pytest.raises(ChannelError, match="both must be on one filesystem"):
                channel._get("q")
        # Still in the queue, for a consumer whose folders are right.
        assert len(list((tmp_path / "broker" / "queue").glob("*.q.msg"))) == 1
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
