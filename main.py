"""Seed 000's entry point: `python main.py --config FILE --data_dir DIR ...` runs `vitlab train`."""
import sys

sys.path.insert(0, "src")
from vitlab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
