"""Entry point for torchrun: `torchrun --nnodes M --nproc-per-node K -m meshlm.launch generate ...`.

Every process runs the same command line; rank 0 drives and prints, the other ranks serve its calls.
"""

import sys

from meshlm.cli import main

if __name__ == "__main__":
    sys.exit(main())
