"""A small reader of the project's Dockerfile: its stages and their instructions (shared by test_deploy and test_serve_install)."""
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def copies(self) -> list[tuple[list[str], list[str], str]]:
        "(flags, sources, destination) of every COPY."
        out = []
        for args in self.args("COPY"):
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            out.append((flags, paths[:-1], paths[-1]))
        return out


def instructions(text: str) -> list[tuple[str, str]]:
    "Instructions with line continuations joined; comment lines (also inside continuations) dropped, as Docker does."
    logical, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#"): continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip(): logical.append(current.strip())
        current = ""
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), re.sub(r"\s+", " ", args.strip())))
    return out


def stages(path: Path = DOCKERFILE) -> list[Stage]:
    result = []
    for keyword, args in instructions(path.read_text()):
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            result.append(Stage(image=words[0], name=words[2] if len(words) == 3 and words[1].upper() == "AS" else None))
        else:
            result[-1].instructions.append((keyword, args))
    return result


def stage(name: str, path: Path = DOCKERFILE) -> Stage:
    "The stage `FROM ... AS name`."
    (found,) = [s for s in stages(path) if s.name == name]
    return found
