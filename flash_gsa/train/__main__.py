"""`python -m flash_gsa.train ARGS` = `gsa train ARGS`; the form torchrun launches:

torchrun --nproc_per_node 8 -m flash_gsa.train --preset 1.3b --out runs/gsa-1.3b --data DATA --tokenizer TOK
"""

import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
