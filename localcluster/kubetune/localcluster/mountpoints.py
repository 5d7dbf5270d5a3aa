"""Mount points the kubelet had to create on the host, removed when no pod needs them.

A pod's mount namespace shares the host's filesystem, so `mkdir -p <mountPath>` for a
path like ``/etc/kubetune`` creates it on the host too. The kubelet creates missing
mountPaths itself, counts the pods using each, and removes the empty folders when the last
such pod ends (removing one earlier would detach a live pod's mount).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path


class MountPoints:
    def __init__(self) -> None:
        self._users: Counter[str] = Counter()

    def claim(self, targets: list[str]) -> list[str]:
        """Create missing folders for ``targets``; returns the ones created (to release)."""
        created: list[str] = []
        for target in targets:
            missing: list[Path] = []
            path = Path(target)
            while not path.exists() and path != path.parent:
                missing.append(path)
                path = path.parent
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)
            created += [str(p) for p in missing]
            # Folders an earlier pod created are shared: count this pod as a user too.
            for parent in [Path(target), *Path(target).parents]:
                if str(parent) in self._users and str(parent) not in created:
                    created.append(str(parent))
        for folder in created:
            self._users[folder] += 1
        return created

    def claim_file(self, target: str) -> list[str]:
        """Like ``claim`` for a file mount target (a termination message path such as
        /dev/termination-log): its folders and an empty file, created when missing."""
        path = Path(target)
        claimed = self.claim([str(path.parent)])
        if not path.exists():
            path.touch()
            claimed.append(target)
            self._users[target] += 1
        elif target in self._users:
            claimed.append(target)
            self._users[target] += 1
        return claimed

    def release(self, folders: list[str]) -> None:
        for folder in sorted(folders, key=len, reverse=True):  # deepest first
            self._users[folder] -= 1
            if self._users[folder] <= 0:
                del self._users[folder]
                try:
                    if os.path.isdir(folder):
                        os.rmdir(folder)
                    else:  # a file we created as a mount point; pods wrote to their own copies
                        os.unlink(folder)
                except OSError:
                    pass  # not empty (someone wrote there) or already gone: leave it

    def release_all(self) -> None:
        self.release([f for f, n in self._users.items() for _ in range(n)])
