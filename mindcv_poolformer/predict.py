"""``python -m mindcv_poolformer.predict``: the prediction command (its code is ``deploy/predict.py``)."""

import sys

from .deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
