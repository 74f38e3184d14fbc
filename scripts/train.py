"""Train circuit breakers into a model: `python scripts/train.py --config configs/NAME.yaml [key=value ...]`.

Without --config it runs the CPU demo on SmolLM2-135M-Instruct (configs/smollm2_135m.yaml).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = REPO / "configs" / "smollm2_135m.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: the SmolLM2 demo)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run in train.output_dir and start again"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.steps=20 loss.alpha=5")
    args = parser.parse_intermixed_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from cbjax.distributed import initialize_distributed, setup_logging

    initialize_distributed()
    setup_logging()
    from cbjax.config import load_config
    from cbjax import demo, run_directory, trainer

    config = load_config(args.config, args.overrides)
    # Checked before the model loads, which can take minutes.
    run_directory.prepare(config, resume=args.resume, overwrite=args.overwrite)
    model_path = trainer.resolve_model_path(config.model.path)
    if config.demo.enabled:
        config = demo.prepare_data(config, model_path)

    setup = trainer.build_setup(config, model_path=model_path)
    last = trainer.train(config, resume=args.resume, overwrite=args.overwrite, setup=setup)

    if config.demo.enabled:
        print(demo.before_after_table(config, model_path, last["adapters"], trainer.lora_layers(config), last))
    return 0


if __name__ == "__main__":
    from cbjax.host_memory import reexec_with_huge_pages

    reexec_with_huge_pages()
    sys.exit(main())
