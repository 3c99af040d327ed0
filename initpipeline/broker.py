"""kombu's ``filesystem://`` transport, with no message read before it is whole.

kombu's filesystem channel creates a message's file under its final name, then writes it.
A consumer polling the folder (every 100 ms with ``filesystem_broker``) can take the file in
between and read nothing: ``JSONDecodeError`` rises out of the worker's consumer, Celery
calls it an unrecoverable error, and the worker stops (kombu#1551, open). A pool process
sending a retry or the next phase of a chain while its own worker polls is enough.

This channel writes each message under a name consumers skip and renames it into place,
so a consumer sees the whole file or nothing. A message that still cannot be decoded
(written by a process on plain kombu, or cut short by a full disk) is set aside under
``processed_folder`` with an error in the log, instead of stopping the worker; recovery
sends again a phase whose message was lost (recovery.py).

``filesystem_broker`` (celery_settings.py) selects it with ``CELERY_BROKER_TRANSPORT``;
the broker URL stays ``filesystem://``.
"""

from __future__ import annotations

import logging
import os
import uuid
from functools import cached_property
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

logger = logging.getLogger("initpipeline")


class Channel(filesystem.Channel):  # type: ignore[misc]
    """kombu's filesystem channel, writing by rename and reading past a bad message."""

    # kombu's two bases name the second parameter differently (message, payload).
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        # kombu's name: the milliseconds first, so that a sorted listing is the send order.
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        # A leading dot: kombu takes only names whose part after the first dot is
        # "<queue>.msg", and this one's is "<hex>.tmp".
        scratch = folder / f".{uuid.uuid4().hex}.tmp"
        try:
            with open(scratch, "wb") as fh:
                fh.write(str_to_bytes(dumps(payload)))
            os.rename(scratch, folder / name)
        except OSError as exc:
            scratch.unlink(missing_ok=True)
            raise ChannelError(f"Cannot add file {name!r} to directory") from exc

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        wanted = f"{queue}.msg"
        inbox = Path(self.data_folder_in)
        taken = self._taken_folder
        for name in sorted(os.listdir(inbox)):
            if name.partition(".")[2] != wanted:
                continue
            # A rename within the broker's folder: one consumer gets the file, the others
            # find it gone (kombu moves it to the temporary folder, maybe a copy).
            try:
                os.rename(inbox / name, taken / name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise ChannelError(
                    f"Cannot move file {name!r} from the queue to processed_folder {taken} "
                    "(both must be on one filesystem, writable by every process)"
                ) from exc
            try:
                payload = (taken / name).read_bytes()
            except OSError as exc:
                raise ChannelError(f"Cannot read file {name!r} from the queue") from exc
            try:
                message = loads(bytes_to_str(payload))
            except (ValueError, UnicodeDecodeError):
                self._set_aside(taken / name, len(payload))
                continue
            if not self.store_processed:
                (taken / name).unlink(missing_ok=True)
            return message
        raise Empty()

    @cached_property
    def _taken_folder(self) -> Path:
        """processed_folder, made once: a rename into a missing folder would look like a
        file another consumer took, and the message would never be read."""
        folder = Path(self.processed_folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _set_aside(path: Path, size: int) -> None:
        bad = path.with_name(path.name + ".bad")
        try:
            os.rename(path, bad)
        except OSError:
            bad = path
        logger.error(
            "broker message %s could not be decoded (%d bytes): kept as %s and skipped; "
            "a phase it carried is sent again by recovery",
            path.name,
            size,
            bad,
        )


class FilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    """kombu's filesystem transport with ``Channel`` above."""

    Channel = Channel
