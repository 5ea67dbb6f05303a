"""The server image as the Dockerfile describes it (nothing builds it here): its final stage's user, environment,
ports and entrypoint, for the tests that hold the Dockerfile and the Kubernetes manifests to each other."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.kube import ROOT

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for k, args in self.instructions if k == keyword]

    @property
    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                out[key] = value
        return out

    @property
    def user(self) -> str:
        users = self.all("USER")
        return users[-1] if users else "root"

    @property
    def exposed_ports(self) -> set[int]:
        return {int(p.split("/")[0]) for args in self.all("EXPOSE") for p in args.split()}

    @property
    def entrypoint(self) -> list[str]:
        (args,) = self.all("ENTRYPOINT")
        parsed = json.loads(args)  # exec form is a JSON array; shell form is not JSON and fails here
        assert isinstance(parsed, list)
        return [str(a) for a in parsed]


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The build stages, each with its (KEYWORD, arguments) instructions; continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            out.append(Stage(base=words[0], name=words[2] if len(words) > 2 and words[1].upper() == "AS" else None))
        else:
            assert out, f"{keyword} before FROM"
            out[-1].instructions.append((keyword, args))
    return out


def runtime() -> Stage:
    """The final stage: what the image runs."""
    return stages()[-1]
