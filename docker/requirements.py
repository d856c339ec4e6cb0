"""Print the requirements of the project's extras, read from pyproject.toml, one per line.

The image builds install these (pinned by constraints.txt) in a layer of their own, before the source is
copied in, so that a change to the source does not reinstall the dependencies.

    python docker/requirements.py pyproject.toml api > requirements.txt
"""

import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = project["name"]
    wanted, seen, found = list(extras), set(), list(project.get("dependencies", []))
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            own = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", requirement.strip())
            if own:  # e.g. "dandelion-grass[api,trainer]": the project's own extras
                wanted.extend(part.strip() for part in own.group(1).split(","))
            elif requirement not in found:
                found.append(requirement)
    return found


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as file:
        print("\n".join(requirements(tomllib.load(file), sys.argv[2:])))
