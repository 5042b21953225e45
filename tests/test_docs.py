"""Documentation that runs: every ```python block of README.md, docs/API.md and
WORKSPACE.md is executed, so no example can rot.

Each block runs in a fresh copy of the names defined by the prelude, the one
block marked `# doc-test: prelude` (in docs/API.md: the toy-faces generator,
8 samples at layer 5 and a quick decomposition). A block opts out only with a
first line `# doc-test: skip -- <reason>`. ```bash / ```sh blocks and
unlabelled fences are not executed; a Python block must be fenced as
```python (other spellings such as ```py would escape the collector and fail).
"""

import inspect
import os
import re
import textwrap

import pytest

import panda_jax as pj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/API.md", "WORKSPACE.md")
PRELUDE = "# doc-test: prelude"
SKIP = re.compile(r"# doc-test: skip -- \S")
# An opening fence (optionally indented, e.g. inside a list) and its language.
OPENING = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n`]*$")
ESCAPING = {"py", "python3", "ipython", "pycon", "Python"}


class Block:
  """One fenced block: where it is and its code (dedented)."""

  def __init__(self, path: str, line: int, lang: str, code: str):
    self.path, self.line, self.lang, self.code = path, line, lang, code

  @property
  def id(self) -> str:
    return f"{self.path}:{self.line}"

  @property
  def first_line(self) -> str:
    return self.code.lstrip().split("\n", 1)[0].strip()


def _blocks(path: str) -> list:
  """Every fenced block of `path` (relative to the repository root)."""
  with open(os.path.join(ROOT, path)) as f:
    lines = f.read().split("\n")
  blocks, i = [], 0
  while i < len(lines):
    opening = OPENING.match(lines[i])
    if not opening:
      i += 1
      continue
    closing = opening["indent"] + "```"
    end = i + 1
    while end < len(lines) and lines[end].rstrip() != closing:
      end += 1
    assert end < len(lines), f"{path}:{i + 1}: unclosed fence"
    blocks.append(
      Block(path, i + 2, opening["lang"], textwrap.dedent("\n".join(lines[i + 1 : end])))
    )
    i = end + 1
  return blocks


ALL = [block for path in DOCS for block in _blocks(path)]
PYTHON = [block for block in ALL if block.lang == "python"]


def _run(block: Block, namespace: dict) -> None:
  """Executes the block; tracebacks name the document and its line."""
  code = "\n" * (block.line - 1) + block.code
  exec(compile(code, os.path.join(ROOT, block.path), "exec"), namespace)  # pylint: disable=exec-used


@pytest.fixture(scope="module")
def prelude() -> dict:
  """The names the prelude block defines (run once)."""
  (block,) = [b for b in PYTHON if b.first_line == PRELUDE]
  namespace = {"__name__": "__doc_prelude__"}
  _run(block, namespace)
  return namespace


def test_markers_are_well_formed():
  """One prelude; opt-outs give a reason; no Python block hides behind another fence name."""
  assert [b.path for b in PYTHON if b.first_line == PRELUDE] == ["docs/API.md"]
  for block in PYTHON:
    if "doc-test:" in block.first_line:
      assert block.first_line == PRELUDE or SKIP.match(block.first_line), (
        f"{block.id}: a marker is '{PRELUDE}' or '# doc-test: skip -- <reason>', "
        f"got {block.first_line!r}"
      )
  escaping = [b.id for b in ALL if b.lang in ESCAPING]
  assert not escaping, f"fence these Python blocks as ```python: {escaping}"
  assert len(PYTHON) >= 10, [b.id for b in PYTHON]


@pytest.mark.parametrize(
  "block", [b for b in PYTHON if b.first_line != PRELUDE], ids=lambda b: b.id
)
def test_python_block_runs(block, prelude):
  if SKIP.match(block.first_line):
    pytest.skip(block.first_line)
  _run(block, dict(prelude))


def _public():
  """Every public function and class of `pj` (modules and constants aside)."""
  return sorted(
    name
    for name, value in vars(pj).items()
    if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
  )


def test_api_reference_names_every_public_function():
  """docs/API.md documents each `pj.<name>` (so a new function cannot ship undocumented)."""
  with open(os.path.join(ROOT, "docs", "API.md")) as f:
    text = f.read()
  missing = [name for name in _public() if not re.search(rf"pj\.{name}\b", text)]
  assert not missing, f"docs/API.md does not mention {missing}"


def test_readme_points_at_the_api_reference():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  assert "docs/API.md" in readme
  assert "shared/API.md" not in readme  # outside the repository: a dead link for a user
