"""`python -m emulators --help`: run every local emulator in one process."""
import sys

from emulators.runner import main

sys.exit(main())
