"""Run a command as if on another machine: in a mount namespace of its own with an empty /tmp.

    unshare --mount --map-root-user python tests/private_tmp.py PATH... -- CMD...

Only the given paths under the real /tmp are seen inside (the repository when it was cloned there, the test's
model, the key file); nothing else is shared, so a server that reaches another "node" through an `ipc://`
file or a file rendezvous in /tmp fails instead of working by luck. unshare execs this script and it execs
CMD, so CMD keeps the pid the caller started.
"""

from __future__ import annotations

import os
import subprocess
import sys


def main(argv: list[str]) -> None:
    split = argv.index("--")
    keep, cmd = [os.path.realpath(p) for p in argv[:split]], argv[split + 1:]
    old = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)  # the real /tmp, still reachable once covered
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp"], check=True)
    for path in keep:
        rel = os.path.relpath(path, "/tmp")
        if rel.startswith(".."):
            continue  # outside /tmp: seen anyway
        is_dir = os.path.isdir(f"/proc/self/fd/{old}/{rel}")
        if is_dir:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "a").close()
        subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{old}/{rel}", path], check=True, pass_fds=(old,))
    os.close(old)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
