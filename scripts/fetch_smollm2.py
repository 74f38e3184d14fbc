"""Download the SmolLM2-135M-Instruct GGUF file into the cbjax cache and print its path."""

from __future__ import annotations

import argparse
import logging
import sys

from cbjax.fetch import FetchError, default_cache_dir, smollm2_gguf_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--cache-dir",
        help=f"folder for the model file (default: $CBJAX_CACHE, else ~/.cache/cbjax; now {default_cache_dir()})",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = smollm2_gguf_path(args.cache_dir)
    except FetchError as err:
        logging.getLogger("fetch_smollm2").error("%s", err)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
