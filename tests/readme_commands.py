"""The commands README.md and launch/README.md show, read from the files, for the tests that run
them as a user types them (tests/test_readme.py, tests/test_quickstart.py,
tests/test_prepare_data.py).

A command is every `python -m vim_jax.*` line of a fenced bash block (continuation lines joined,
comments dropped, `&&` chains split) and every inline code span that starts with
`python -m vim_jax.` and passes flags; whitespace is collapsed. Install and download lines (`pip`,
`curl`, `python -c`) are set-up, not our commands: .ci/run runs the install lines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import REPO_ROOT

READMES = ("README.md", "launch/README.md")
_FENCE = re.compile(r"```(?:bash|sh)\n(.*?)```", re.S)
_INLINE = re.compile(r"`(python -m vim_jax\.[^`]*)`")


def _normalize(command: str) -> str:
  return " ".join(command.split())


def _strip_comment(line: str) -> str:
  """`line` without a trailing `# ...` comment (a `#` outside quotes, after a space)."""
  quote = None
  for i, ch in enumerate(line):
    if ch in "'\"":
      quote = None if quote == ch else (quote or ch)
    elif ch == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
      return line[:i]
  return line


def commands(readme: str) -> list[str]:
  """The `python -m vim_jax.*` commands of one README (a path relative to the repository)."""
  text = open(os.path.join(REPO_ROOT, readme), encoding="utf-8").read()
  found = []
  for block in _FENCE.findall(text):
    joined = re.sub(r"\\\n", " ", block)
    for line in joined.splitlines():
      for part in _strip_comment(line).split("&&"):
        part = _normalize(part)
        if part.startswith("python -m vim_jax."):
          found.append(part)
  # Inline spans with arguments (a bare `python -m vim_jax.evaluate` names a command).
  found += [_normalize(c) for c in _INLINE.findall(text) if " --" in c]
  return list(dict.fromkeys(found))  # first appearance, once


def quickstart_line() -> str:
  """The README's quickstart line: the one command of the first bash block under
  '## Quickstart'."""
  text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
  section = text.split("\n## Quickstart", 1)[1]
  return _normalize(_FENCE.search(section).group(1))


def quickstart_command(smoke: bool = True) -> list[str]:
  """The `python -m vim_jax.main ...` part of the quickstart line as argv (after its venv and
  install steps), with `:smoke` added to its config. Fails, saying why, when the line no
  longer ends in the main command with a --config and a relative --workdir."""
  last = quickstart_line().split("&&")[-1].strip()
  argv = shlex.split(last)
  assert argv[:3] == ["python", "-m", "vim_jax.main"], (
      f"the README's quickstart line no longer ends in `python -m vim_jax.main`: {last!r}; "
      "update tests/readme_commands.py with it"
  )
  configs = [a for a in argv if a.startswith("--config=")]
  workdirs = [a for a in argv if a.startswith("--workdir=")]
  assert (
      len(configs) == 1 and len(workdirs) == 1
  ), f"expected one --config and one --workdir: {last!r}"
  assert not os.path.isabs(
      workdirs[0].split("=", 1)[1]
  ), "the quickstart's --workdir is meant to be relative (what new users type)"
  if smoke:
    argv[argv.index(configs[0])] = configs[0] + ":smoke"
  return [sys.executable] + argv[1:]


def scratch_repository(folder: str) -> str:
  """A copy of the repository's tracked files (the working tree's contents) in folder/repo,
  as a fresh clone would be: no .venv, no workdirs. Returns its path."""
  target = os.path.join(folder, "repo")
  listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True)
  if listed.returncode == 0 and listed.stdout:
    for name in listed.stdout.decode().split("\0"):
      if name and os.path.isfile(os.path.join(REPO_ROOT, name)):
        os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
        shutil.copy2(os.path.join(REPO_ROOT, name), os.path.join(target, name))
  else:  # not a git checkout (an unpacked archive): everything but local state
    shutil.copytree(
        REPO_ROOT,
        target,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "venv", "workdirs", "__pycache__", "*.egg-info", ".pytest_cache"
        ),
    )
  return target


def find(fragment: str, readme: str = "README.md") -> str:
  """The one command of `readme` containing `fragment`."""
  matches = [c for c in commands(readme) if fragment in c]
  assert len(matches) == 1, (
      f"{readme} has {len(matches)} commands containing {fragment!r}: "
      f"{matches}; update the test that runs it"
  )
  return matches[0]


def to_argv(command: str, variables: dict[str, str], edits=(), extra=()) -> list[str]:
  """argv for a README command: `edits` (old -> new substrings) applied, each $NAME replaced
  by variables[NAME], `extra` flags appended, `python` as this interpreter."""
  for old, new in edits:
    assert old in command, f"{old!r} is not in {command!r}"
    command = command.replace(old, new)
  for name, value in variables.items():
    command = command.replace(f"${name}", value)
  assert "$" not in command, f"a variable the test does not set: {command!r}"
  argv = shlex.split(command) + list(extra)
  assert argv[0] == "python", command
  return [sys.executable] + argv[1:]


def copy_run(run_dir: str, root: str, name: str) -> str:
  """A trained run copied to root/workdirs/<name>, as if trained from `root`: the weights
  paths its config.json recorded (the configs' relative defaults, made absolute from the folder
  the test process runs in) point at root/weights/, where the README's converters write."""
  target = os.path.join(root, "workdirs", name)
  shutil.copytree(run_dir, target)
  config = os.path.join(target, "config.json")
  text = open(config, encoding="utf-8").read()
  text = text.replace(os.path.join(os.getcwd(), "weights"), os.path.join(root, "weights"))
  with open(config, "w", encoding="utf-8") as f:
    f.write(text)
  return target


def put_inception_weights(root: str, flax_file: str) -> str:
  """The converted FID Inception file where the README's convert command writes it."""
  target = os.path.join(root, "weights", "pt_inception-2015-12-05.msgpack")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copy(flax_file, target)
  return target
