"""Old import path of the checkpoint folder writer; `sae_modules.formats.writing` and
`sae_modules.atomic_file` hold the code. Kept while sae_modules.train and sae_modules.shapes import it."""

from sae_modules.atomic_file import sha256_file
from sae_modules.formats.writing import CHECKPOINT_FILES, write_checkpoint_dir

__all__ = ["CHECKPOINT_FILES", "sha256_file", "write_checkpoint_dir"]
