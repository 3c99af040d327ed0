"""The README's "Add it to your project", followed to the letter in a fresh project.

Builds the wheel, makes a fresh venv, and runs every block of that section marked
``<!-- new-project: KIND [PATH] -->``, in order:

- ``shell``: each ``$`` line runs in the project's folder and must succeed (``cd`` moves;
  ``pip install "initpipeline[...]"`` installs the wheel just built; ``curl URL`` is a GET
  that must reach 200);
- ``write PATH`` / ``append PATH``: the block becomes, or ends, that file;
- ``serve``: each ``$`` line starts a process that keeps running (the worker, Gunicorn).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_for
from tests.servers import kill_group, spawn, wait_worker_ready

pytestmark = [pytest.mark.slow]

STEP = re.compile(r"<!-- new-project: (\w+)(?: (\S+))? -->\n```\w*\n(.*?)```", re.S)
# The answers the README promises for the page it shows, before and after the run.
PAGE = "/squares/12"
PAGE_ANSWER = {"n": 12, "square": 144}


def readme_steps() -> list[tuple[str, str, str]]:
    return STEP.findall((ROOT / "README.md").read_text())


def commands(block: str) -> list[str]:
    return [line[2:].strip() for line in block.splitlines() if line.startswith("$ ")]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


class NewProject:
    """A fresh venv and folder, and the processes started in them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.cwd = tmp
        self.port = free_port()
        self.venv = tmp / "venv"
        self.processes: list[subprocess.Popen[bytes]] = []
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DJANGO_", "CELERY_", "INITPIPELINE_", "GUNICORN_", "VIRTUAL"))
            and k not in ("PYTHONPATH", "PORT", "WEB_CONCURRENCY")
        }
        constraints = tmp / "constraints.txt"
        # The versions CI tests (extras are not allowed in a constraints file).
        constraints.write_text(re.sub(r"\[[^]]*\]", "", (ROOT / "requirements.txt").read_text()))
        self.env = env | {
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{env['PATH']}",
            "VIRTUAL_ENV": str(self.venv),
            "PIP_CONSTRAINT": str(constraints),
            "PYTHONUNBUFFERED": "1",
            "NO_COLOR": "1",
            # The README's address is Gunicorn's default; the test takes a free port.
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{self.port}",
        }
        self.wheel = self.build_wheel()
        self.check([sys.executable, "-m", "venv", str(self.venv)])

    def build_wheel(self) -> Path:
        # From a copy of what the wheel is made of: the checkout stays free of build/.
        src = self.tmp / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, src / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(ROOT / "initpipeline", src / "initpipeline", ignore=ignore)
        dist = self.tmp / "dist"
        self.check(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), "./src"],
            env=os.environ,
        )
        (wheel,) = dist.glob("initpipeline-*.whl")
        return wheel

    def check(
        self, cmd: list[str] | str, timeout: float = 300, env: Mapping[str, str] | None = None
    ) -> str:
        result = subprocess.run(
            cmd,
            shell=isinstance(cmd, str),
            cwd=self.cwd,
            env=self.env if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{output}"
        return output

    def url(self, readme_url: str) -> str:
        return readme_url.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")

    def shell(self, line: str) -> None:
        words = shlex.split(line, comments=True)
        if words[0] == "cd":
            self.cwd = self.cwd / words[1]
        elif words[0] == "curl":
            url = self.url(words[-1])
            wait_for(lambda: get(url)[0] == 200, 30, what=f"GET {url} answering 200")
        elif words[:2] == ["pip", "install"]:
            (spec,) = [w for w in words if w.startswith("initpipeline[")]
            self.check(
                line.replace(
                    f'"{spec}"', shlex.quote(spec.replace("initpipeline", str(self.wheel), 1))
                )
            )
        else:
            self.check(line)

    def serve(self, line: str) -> None:
        program = shlex.split(line)[0]
        log = self.tmp / f"{program}.log"
        proc = spawn(["bash", "-c", f"exec {line}"], self.env, log, cwd=self.cwd)
        self.processes.append(proc)
        if program == "celery":
            wait_worker_ready(proc, log)
        elif program == "gunicorn":

            def up() -> bool:
                assert proc.poll() is None, log.read_text(errors="replace")
                return get(self.url("http://127.0.0.1:8000/init/livez"))[0] == 200

            wait_for(up, 60, what="gunicorn answering /init/livez", log=log)
        else:
            raise AssertionError(f"the test does not know how to wait for {program!r}")

    def stop(self) -> None:
        for proc in self.processes:
            kill_group(proc)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[NewProject]:
    made = NewProject(tmp_path)
    yield made
    made.stop()


@pytest.mark.timeout(900)  # a wheel, a venv and pip: beyond pytest's 300 s on a slow host
def test_readme_steps_take_a_fresh_startproject_to_ready(project: NewProject) -> None:
    steps = readme_steps()
    assert [(kind, path) for kind, path, _ in steps] == [
        ("shell", ""),
        ("append", "mysite/settings.py"),
        ("write", "mysite/celery.py"),
        ("write", "myapp/init_phases.py"),
        ("write", "myapp/views.py"),
        ("write", "mysite/urls.py"),
        ("shell", ""),
        ("serve", ""),
        ("shell", ""),
    ]
    page = project.url(f"http://127.0.0.1:8000{PAGE}")
    for kind, path, block in steps:
        if kind == "shell" and "start_init" in block:
            # Before the deploy step, the page is warming up and the site not ready.
            assert get(page)[0] == 503
            assert get(project.url("http://127.0.0.1:8000/init/readyz"))[0] == 503
        if kind in ("write", "append"):
            target = project.cwd / path
            old = target.read_text() if kind == "append" else ""
            target.write_text(old + "\n" + block if old else block)
        else:
            run = project.shell if kind == "shell" else project.serve
            for line in commands(block):
                run(line)

    status, body = get(page)
    assert (status, json.loads(body)) == (200, PAGE_ANSWER)
