"""Offline side-by-side benchmark through vLLM; same as `vllm-medusa bench` (see its --help)."""

import sys

from vllm_medusa.bench import main

if __name__ == "__main__":
    sys.exit(main())
