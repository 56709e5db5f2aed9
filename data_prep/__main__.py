"""`python -m data_prep ...` is the same as the `megalm-prep` console script."""
import sys

from data_prep.cli import main

sys.exit(main())
