"""Subprocess for test_checkpoint: writes big checkpoints to one path in a loop until killed.

Usage: python tests/tasks/ckpt_writer.py PATH NUMEL FIRST_VERSION  (prints each version once it is on disk)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tasks.engine.checkpoint import FORMAT, save_checkpoint  # noqa: E402


def main() -> None:
    path, numel, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    while True:
        state = {"format": FORMAT, "version": version, "weights": torch.full((numel,), float(version)),
                 "tail": {"marker": torch.full((7,), float(version)), "text": f"version {version}"}}
        save_checkpoint(path, state)
        print(version, flush=True)
        version += 1


if __name__ == "__main__":
    main()
