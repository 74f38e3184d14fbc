"""Write a Hugging Face checkpoint or GGUF file as a params directory (see `orbax_params`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from cbjax.convert.orbax_params import params_from_tensors, save_params
from cbjax.convert.sources import open_model_source
from cbjax.convert.staging import check_output, check_separate, staged_directory

logger = logging.getLogger(__name__)

# The --dtype choices, by the names transformers writes into config.json.
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def convert_to_orbax(
    src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Convert a Hugging Face directory or hub id, or a GGUF file, into the params directory `out`.

    Tensors keep their dtype unless `dtype` (a key of `DTYPES`) is given. GGUF tensors are
    dequantized to float32. Nothing appears at `out` unless the conversion completes.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported. Expected one of {sorted(DTYPES)}")
    check_output(out, overwrite)
    source = open_model_source(src)
    check_separate(source.path, out)
    with staged_directory(out, overwrite) as stage:
        params = params_from_tensors(source.tensors, source.config, str(source.path), DTYPES.get(dtype))
        logger.info("writing %s parameters of %s to %s", source.config.family, source.path, out)
        save_params(params, stage)
        source.write_model_files(stage, dtype)
    return Path(out)
