"""ftctl.adapters: everything that touches the world (MLX training, files, processes, the system)."""

import os

# transformers (imported by mlx-lm for tokenizers) says "PyTorch was not found. Models won't be
# available..." on import: ftctl needs no PyTorch, so that advice is noise in every log it reaches.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
