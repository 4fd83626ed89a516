"""Run the N4 ablation: ``python run_ablation.py [--grid] [--config FILE] [--preset NAME] [KEY=VALUE ...]``.

See ``python run_ablation.py --help``; the runner lives in ``experiments/runner.py``.
"""

import sys

from experiments.runner import main

if __name__ == "__main__":
    sys.exit(main())
