"""``python serve.py [MODEL] [flags]``: same as ``kivi-vllm serve``."""

from kivi_vllm.cli import main

if __name__ == "__main__":
    import sys

    main(["serve", *sys.argv[1:]])
