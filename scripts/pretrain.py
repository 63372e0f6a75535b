"""ASCL pretraining: `accelerate launch scripts/pretrain.py [--config configs/X.yaml] [--flag value ...]`.

With no arguments it runs the quickstart (a narrow ResNet-18 on scikit-learn's bundled digits, CPU-friendly)
and writes the exported model to outputs/quickstart/final. `--help` lists every flag.
"""

import sys

from ascl_hf.pretraining import run_pretraining
from ascl_hf.pretraining_arguments import parse_pretraining_arguments

if __name__ == "__main__":
    exported = run_pretraining(parse_pretraining_arguments())
    if exported is not None:
        print(f"Exported model folder: {exported}")
    sys.exit(0)
